"""fastmod.ops.routed_bottleneck_gn: the whole routed bottleneck (stride 1,
GroupNorm closing it, BatchNorms folded) in one CPU kernel, for inference.

The fused kernel against the float64 reference (1x1 and 3x3 middle convs, binary
and scaled gates, samples with every branch off or on, images whose size is no
multiple of the vector width, BN scales of zero), the paths that run separate ops
instead (autograd, other dtypes, FASTMOD_ROUTED_CONV_DIRECT=0 inside the kernel),
opcheck, torch.compile, bad arguments, and RoutedBottleneck's use of it.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmod import _extension
from fastmod.nn import RoutedBottleneck
from fastmod.nn import routed_conv as nn_routed
from fastmod.ops import routed_bottleneck_gn as fused
from fastmod.ops import routed_bottleneck_gn_reference as reference

from _routed_helpers import assert_grads_match_reference, run_with_direct_setting

needs_ext = pytest.mark.skipif(not _extension.has_op("routed_bottleneck_gn"), reason="fastmod._C not built")
TOL = dict(rtol=1e-4, atol=2e-4)


def _case(n, cin, width, cout, G, k, h, w, gen, kind="random"):
    """The op's ten tensor arguments (x ... residual), then gn_weight, gn_bias; float64."""
    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
    x = rnd(n, cin, h, w)
    w1 = rnd(width, cin, 1, 1, scale=cin ** -0.5)
    w2 = rnd(width, width // G, k, k, scale=(width // G * k * k) ** -0.5)
    w3 = rnd(cout, width, 1, 1, scale=width ** -0.5)
    s1, b1, s2, b2 = rnd(width), rnd(width), rnd(width), rnd(width)
    s1[0] = 0.0  # a zero BN scale (zero-init gammas): the row is relu(shift)
    g = (torch.rand(n, G, generator=gen) < 0.4).double()
    g[0] = 0.0  # a sample with every branch off: out = relu(GN(0) + residual)
    if n > 1:
        g[1] = 1.0
    if kind == "soft":
        g = g * (torch.rand(n, G, generator=gen, dtype=torch.float64) + 0.25)
    r = rnd(n, cout, h, w)
    gw, gb = torch.rand(cout, generator=gen, dtype=torch.float64) + 0.5, rnd(cout)
    return [x, g, w1, s1, b1, w2, s2, b2, w3, r], gw, gb


def _f32(ts):
    return [None if t is None else t.float() for t in ts]


@needs_ext
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("kind", ["random", "soft"])
@pytest.mark.parametrize("hw", [(5, 7), (8, 8), (1, 1), (7, 7)])
def test_matches_reference(k, kind, hw):
    gen = torch.Generator().manual_seed(k * 10 + hw[0])
    t, gw, gb = _case(3, 16, 16, 24, 4, k, *hw, gen=gen, kind=kind)
    want = reference(*t, 4, gw, gb)
    with torch.no_grad():
        got = fused(*_f32(t), 4, *_f32([gw, gb]), backend="cpu")
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want.float(), **TOL)


@needs_ext
def test_wide_branches_and_no_affine():
    # 16-channel branches (more rows than one register tile), GroupNorm without affine.
    gen = torch.Generator().manual_seed(1)
    t, _, _ = _case(2, 32, 32, 32, 2, 3, 6, 6, gen=gen)
    with torch.no_grad():
        got = fused(*_f32(t), 8, backend="cpu")
    torch.testing.assert_close(got, reference(*t, 8).float(), **TOL)


@needs_ext
def test_all_off_zero_batch_and_noncontiguous():
    gen = torch.Generator().manual_seed(2)
    t, gw, gb = _case(3, 8, 8, 8, 2, 3, 6, 6, gen=gen)
    t32 = _f32(t)
    with torch.no_grad():
        off = [t32[0], torch.zeros_like(t32[1])] + t32[2:]
        torch.testing.assert_close(fused(*off, 2, backend="cpu"), torch.relu(t32[-1]), **TOL)
        empty = fused(*[a[:0] if i in (0, 1, 9) else a for i, a in enumerate(t32)], 2, backend="cpu")
        assert empty.shape == (0, 8, 6, 6)
        strided = list(t32)
        strided[0] = t32[0].transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
        strided[9] = t32[9].transpose(2, 3).contiguous().transpose(2, 3)
        got = fused(*strided, 2, *_f32([gw, gb]), backend="cpu")
    torch.testing.assert_close(got, reference(*t, 2, gw, gb).float(), **TOL)


@needs_ext
def test_autograd_runs_separate_ops():
    # With inputs that need gradients the call composes differentiable ops, so every
    # gradient exists and matches the reference's.
    gen = torch.Generator().manual_seed(3)
    t, gw, gb = _case(2, 8, 8, 8, 4, 3, 4, 4, gen=gen, kind="soft")
    assert_grads_match_reference(lambda *a: fused(*a[:10], 2, *a[10:], backend="cpu"),
                                 lambda *a: reference(*a[:10], 2, *a[10:]), t + [gw, gb], gen, TOL,
                                 rtol=1e-3, atol=2e-3)


def test_other_dtypes_and_reference_backend():
    gen = torch.Generator().manual_seed(4)
    t, gw, gb = _case(2, 8, 8, 8, 2, 3, 5, 5, gen=gen)
    want = reference(*t, 2, gw, gb)
    with torch.no_grad():
        torch.testing.assert_close(fused(*t, 2, gw, gb), want)  # float64: separate ops
        torch.testing.assert_close(fused(*t, 2, gw, gb, backend="reference"), want)
        half = fused(*[a.bfloat16() for a in t], 2, gw.bfloat16(), gb.bfloat16())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), want, rtol=0.05, atol=0.15)


@needs_ext
def test_aten_path_inside_the_kernel():
    # FASTMOD_ROUTED_CONV_DIRECT=0 (read once per process): the kernel runs the
    # unfused ATen ops; checked in a fresh process.
    script = """
import torch
from fastmod.ops import routed_bottleneck_gn as f, routed_bottleneck_gn_reference as ref
torch.manual_seed(0)
for k in (1, 3):
    x, g = torch.randn(3, 8, 5, 6), (torch.rand(3, 4) < 0.5).float()
    g[0] = 0
    w1, w2, w3 = torch.randn(8, 8, 1, 1), torch.randn(8, 2, k, k), torch.randn(12, 8, 1, 1)
    bn = [torch.randn(8) for _ in range(4)]
    r = torch.randn(3, 12, 5, 6)
    args = (x, g, w1, bn[0], bn[1], w2, bn[2], bn[3], w3, r, 3)
    with torch.no_grad():
        got = f(*args, backend="cpu")
    torch.testing.assert_close(got, ref(*args), rtol=1e-4, atol=1e-4)
print("ok")
"""
    run_with_direct_setting(script)


@needs_ext
def test_opcheck():
    gen = torch.Generator().manual_seed(5)
    t, gw, gb = _case(2, 8, 8, 8, 2, 3, 4, 5, gen=gen)
    torch.library.opcheck(torch.ops.fastmod.routed_bottleneck_gn, (*_f32(t), 2, *_f32([gw, gb]), 1e-5))


@needs_ext
def test_compile_fullgraph():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(6)
    t, gw, gb = _case(2, 8, 8, 8, 2, 3, 4, 4, gen=gen)
    t32, (gw32, gb32) = _f32(t), _f32([gw, gb])
    fn = torch.compile(lambda *a: fused(*a, 2, gw32, gb32, backend="cpu"), fullgraph=True)
    with torch.no_grad():
        got = fn(*t32)
    torch.testing.assert_close(got, reference(*t, 2, gw, gb).float(), **TOL)


def _bad(**change):
    x, g = torch.randn(2, 8, 4, 4), torch.ones(2, 2)
    args = dict(x=x, gates=g, conv1_weight=torch.randn(8, 8, 1, 1), bn1_scale=torch.ones(8), bn1_shift=torch.zeros(8),
                conv2_weight=torch.randn(8, 4, 3, 3), bn2_scale=torch.ones(8), bn2_shift=torch.zeros(8),
                conv3_weight=torch.randn(8, 8, 1, 1), residual=torch.randn(2, 8, 4, 4), num_groups=2)
    args.update(change)
    return args


@pytest.mark.parametrize("change,exc,word", [
    (dict(conv2_weight=torch.randn(8, 4, 2, 2)), ValueError, "conv2_weight"),
    (dict(conv1_weight=torch.randn(8, 8, 3, 3)), ValueError, "conv1_weight"),
    (dict(conv3_weight=torch.randn(8, 8)), ValueError, "conv3_weight"),
    (dict(bn2_shift=torch.zeros(4)), ValueError, "bn2_shift"),
    (dict(conv2_weight=torch.randn(8, 2, 3, 3)), ValueError, "conv2_weight"),  # groups != G
    (dict(gates=torch.ones(2, 3)), ValueError, "conv1_weight"),  # G does not divide width
    (dict(residual=torch.randn(2, 8, 3, 3)), ValueError, "residual"),
    (dict(num_groups=3), ValueError, "num_groups"),
    (dict(bn1_scale=torch.ones(8, dtype=torch.float64)), TypeError, "dtype"),
    (dict(x=[1.0]), TypeError, "x"),
    (dict(gates=torch.ones(2, 2, dtype=torch.int64)), TypeError, "gates"),
])
def test_bad_arguments(change, exc, word):
    with torch.no_grad(), pytest.raises(exc, match=word):
        fused(**_bad(**change))


def _module(stride=1, seed=7):
    torch.manual_seed(seed)
    block = RoutedBottleneck(32, 16, 48, cardinality=4, stride=stride)
    for m in block.modules():  # BN statistics and affines off their init
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    for p in block.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    return block.eval()


@needs_ext
@pytest.mark.parametrize("rho", [0.0, 0.3, 1.0])
def test_module_inference_uses_it(monkeypatch, rho):
    calls = []
    real = nn_routed.routed_bottleneck_gn
    monkeypatch.setattr(nn_routed, "routed_bottleneck_gn", lambda *a, **k: calls.append(1) or real(*a, **k))
    block = _module()
    x, gates = torch.randn(3, 32, 6, 7), (torch.rand(3, 4) < rho).float()
    with torch.no_grad():
        got = block(x, gates)
        block.use_kernels = False
        want = block(x, gates)
    assert calls == [1]
    torch.testing.assert_close(got, want, **TOL)


@needs_ext
@pytest.mark.parametrize("stride,train", [(2, False), (1, True)])
def test_module_other_cases_do_not(monkeypatch, stride, train):
    # Stride 2, or BatchNorms on batch statistics (train mode under no_grad): the
    # block runs its ops one by one.
    monkeypatch.setattr(nn_routed, "routed_bottleneck_gn", lambda *a, **k: pytest.fail("whole-block op used"))
    block = _module(stride).train(train)
    x, gates = torch.randn(3, 32, 6, 6), (torch.rand(3, 4) < 0.5).float()
    with torch.no_grad():
        got = block(x, gates)
        block.use_kernels = False
        want = block(x, gates)
    torch.testing.assert_close(got, want, **TOL)


@needs_ext
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3), G=st.sampled_from([1, 2, 4]), cb=st.integers(1, 5), cin=st.integers(1, 9),
       cg=st.integers(1, 4), groups=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9),
       k=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
def test_hypothesis_shapes(n, G, cb, cin, cg, groups, h, w, k, seed):
    gen = torch.Generator().manual_seed(seed)
    t, gw, gb = _case(n, cin, G * cb, cg * groups, G, k, h, w, gen=gen, kind="soft")
    if cg * h * w == 1:
        return  # F.group_norm (the reference) wants more than one value per group
    want = reference(*t, groups, gw, gb)
    with torch.no_grad():
        got = fused(*_f32(t), groups, *_f32([gw, gb]), backend="cpu")
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=3e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_runs_separate_ops():
    gen = torch.Generator().manual_seed(8)
    t, gw, gb = _case(2, 8, 8, 8, 2, 3, 4, 4, gen=gen)
    want = reference(*t, 2, gw, gb)
    with torch.no_grad():
        got = fused(*[a.float().cuda() for a in t], 2, gw.float().cuda(), gb.float().cuda())
    torch.testing.assert_close(got.cpu(), want.float(), **TOL)
