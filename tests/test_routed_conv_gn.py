"""fastmod.ops.routed_conv2d_group_norm_add_relu: the bottleneck's closing conv and
its GroupNorm + residual + ReLU epilogue in one CPU kernel (inference).

The fused kernel against the float64 reference (1x1 and 3x3, binary and scaled
gates, samples with every block off, norm groups narrower and wider than the gate
blocks, images whose size is no multiple of the vector width), the paths that run
the two ops instead (autograd, other dtypes, FASTMOD_ROUTED_CONV_DIRECT=0 inside
the kernel), opcheck, torch.compile and bad arguments.  RoutedBottleneck runs this op
without autograd when the whole-block op does not apply (stride 2, BatchNorms on
batch statistics): test_routed_bottleneck.py checks that path against the reference.
"""
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fastmod import _extension
from fastmod.ops import routed_conv2d_group_norm_add_relu as fused
from fastmod.ops import routed_conv2d_group_norm_add_relu_reference as reference

from _routed_helpers import assert_grads_match_reference, run_with_direct_setting

needs_ext = pytest.mark.skipif(not _extension.has_op("routed_conv2d_gn_add_relu"), reason="fastmod._C not built")
TOL = dict(rtol=1e-4, atol=1e-4)


def _case(n, cin, cout, k, h, w, G, gen, kind="random", affine=True):
    x = torch.randn(n, cin, h, w, generator=gen, dtype=torch.float64)
    wt = torch.randn(cout, cin, k, k, generator=gen, dtype=torch.float64) / (cin * k * k) ** 0.5
    g = (torch.rand(n, G, generator=gen) < 0.4).double()
    g[0] = 0.0  # a sample with every block off: the conv output is zero there
    if n > 1:
        g[1] = 1.0
    if kind == "soft":
        g = g * (torch.rand(n, G, generator=gen, dtype=torch.float64) + 0.25)
    r = torch.randn(n, cout, h, w, generator=gen, dtype=torch.float64)
    gw = torch.rand(cout, generator=gen, dtype=torch.float64) + 0.5 if affine else None
    gb = torch.randn(cout, generator=gen, dtype=torch.float64) if affine else None
    return x, wt, g, r, gw, gb


def _f32(*ts):
    return [None if t is None else t.float() for t in ts]


@needs_ext
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("kind", ["random", "soft"])
@pytest.mark.parametrize("num_groups", [2, 8])
@pytest.mark.parametrize("hw", [(5, 7), (8, 8), (1, 1)])
def test_matches_reference(k, kind, num_groups, hw):
    gen = torch.Generator().manual_seed(k * 100 + num_groups)
    x, wt, g, r, gw, gb = _case(3, 16, 16, k, *hw, G=4, gen=gen, kind=kind)
    want = reference(x, wt, g, r, num_groups, gw, gb, padding=k // 2)
    with torch.no_grad():
        got = fused(*_f32(x, wt, g, r), num_groups, *_f32(gw, gb), padding=k // 2, backend="cpu")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want.float(), **TOL)


@needs_ext
def test_without_affine_and_all_gates_off():
    gen = torch.Generator().manual_seed(1)
    x, wt, g, r, _, _ = _case(2, 8, 12, 1, 4, 5, G=2, gen=gen)
    g.zero_()  # out = relu(GroupNorm(0) + r) = relu(r)
    with torch.no_grad():
        got = fused(*_f32(x, wt, g, r), 3, backend="cpu")
    torch.testing.assert_close(got, torch.relu(r).float(), **TOL)
    torch.testing.assert_close(got, reference(x, wt, g, r, 3).float(), **TOL)


@needs_ext
def test_zero_batch_and_noncontiguous():
    gen = torch.Generator().manual_seed(2)
    x, wt, g, r, gw, gb = _case(3, 8, 8, 3, 6, 6, G=2, gen=gen)
    with torch.no_grad():
        empty = fused(*_f32(x[:0], wt, g[:0], r[:0]), 2, *_f32(gw, gb), padding=1, backend="cpu")
        assert empty.shape == (0, 8, 6, 6)
        xt = x.float().transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
        got = fused(xt, *_f32(wt, g, r), 2, *_f32(gw, gb), padding=1, backend="cpu")
    torch.testing.assert_close(got, reference(x, wt, g, r, 2, gw, gb, padding=1).float(), **TOL)


@needs_ext
def test_autograd_runs_the_two_ops():
    # With inputs that need gradients the call is routed_conv2d + group_norm_add_relu,
    # so every gradient exists and matches the reference's.
    gen = torch.Generator().manual_seed(3)
    assert_grads_match_reference(
        lambda x, wt, g, r, gw, gb: fused(x, wt, g, r, 4, gw, gb, router_grad="exact", backend="cpu"),
        lambda x, wt, g, r, gw, gb: reference(x, wt, g, r, 4, gw, gb, router_grad="exact"),
        list(_case(2, 8, 8, 1, 4, 4, G=4, gen=gen, kind="soft")), gen, TOL, rtol=1e-4, atol=1e-3)


def test_other_dtypes_and_reference_backend():
    gen = torch.Generator().manual_seed(4)
    args = _case(2, 8, 8, 3, 5, 5, G=2, gen=gen)
    want = reference(*args[:4], 2, *args[4:], padding=1)
    with torch.no_grad():
        torch.testing.assert_close(fused(*args[:4], 2, *args[4:], padding=1), want)  # float64: the two ops
        torch.testing.assert_close(fused(*args[:4], 2, *args[4:], padding=1, backend="reference"), want)


@needs_ext
def test_aten_path_inside_the_kernel():
    # FASTMOD_ROUTED_CONV_DIRECT=0 (read once per process) makes the kernel compute
    # the conv on the ATen path first; checked in a fresh process.
    script = """
import torch
from fastmod.ops import routed_conv2d_group_norm_add_relu as f, routed_conv2d_group_norm_add_relu_reference as ref
torch.manual_seed(0)
for k in (1, 3):
    x, w = torch.randn(3, 8, 5, 6), torch.randn(8, 8, k, k)
    g = (torch.rand(3, 4) < 0.5).float(); g[0] = 0
    r, gw, gb = torch.randn(3, 8, 5, 6), torch.rand(8) + 0.5, torch.randn(8)
    with torch.no_grad():
        got = f(x, w, g, r, 2, gw, gb, padding=k // 2, backend="cpu")
    torch.testing.assert_close(got, ref(x, w, g, r, 2, gw, gb, padding=k // 2), rtol=1e-4, atol=1e-4)
print("ok")
"""
    run_with_direct_setting(script)


@needs_ext
def test_opcheck():
    gen = torch.Generator().manual_seed(5)
    x, wt, g, r, gw, gb = _f32(*_case(2, 8, 8, 3, 4, 5, G=2, gen=gen))
    torch.library.opcheck(torch.ops.fastmod.routed_conv2d_gn_add_relu, (x, wt, g, r, [1, 1], 2, gw, gb, 1e-5))


@needs_ext
def test_compile_fullgraph():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(6)
    x, wt, g, r, gw, gb = _f32(*_case(2, 8, 8, 1, 4, 4, G=2, gen=gen))
    fn = torch.compile(lambda *a: fused(*a, 2, gw, gb, backend="cpu"), fullgraph=True)
    with torch.no_grad():
        got = fn(x, wt, g, r)
    torch.testing.assert_close(got, reference(x, wt, g, r, 2, gw, gb), **TOL)


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(padding=0, k=3), ValueError, "padding"),
    (dict(padding=1, k=2), ValueError, "odd"),
    (dict(padding=1.0, k=3), TypeError, "padding"),
    (dict(residual_shape=(2, 8, 3, 3)), ValueError, "residual"),
    (dict(num_groups=3), ValueError, "num_groups"),
])
def test_bad_arguments(kwargs, exc, word):
    k = kwargs.get("k", 1)
    x, wt, g = torch.randn(2, 8, 4, 4), torch.randn(8, 8, k, k), torch.ones(2, 2)
    r = torch.randn(*kwargs.get("residual_shape", (2, 8, 4, 4)))
    with torch.no_grad(), pytest.raises(exc, match=word):
        fused(x, wt, g, r, kwargs.get("num_groups", 2), padding=kwargs.get("padding", 0))


@needs_ext
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3), blocks=st.sampled_from([1, 2, 4]), per=st.integers(1, 5), cg=st.integers(1, 6),
       groups=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9), k=st.sampled_from([1, 3]),
       seed=st.integers(0, 2**16))
def test_hypothesis_shapes(n, blocks, per, cg, groups, h, w, k, seed):
    assume(cg * h * w > 1)  # F.group_norm (the reference) wants more than one value per group
    gen = torch.Generator().manual_seed(seed)
    args = _case(n, blocks * per, cg * groups, k, h, w, G=blocks, gen=gen, kind="soft")
    want = reference(*args[:4], groups, *args[4:], padding=k // 2)
    with torch.no_grad():
        got = fused(*_f32(*args[:4]), groups, *_f32(*args[4:]), padding=k // 2, backend="cpu")
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=2e-4)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="x"):
        fused([1.0], torch.randn(8, 8, 1, 1), torch.ones(2, 2), torch.randn(2, 8, 4, 4), 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_runs_the_two_ops():
    gen = torch.Generator().manual_seed(8)
    args = _case(2, 8, 8, 1, 4, 4, G=2, gen=gen)
    want = reference(*args[:4], 2, *args[4:])
    with torch.no_grad():
        got = fused(*[t.float().cuda() for t in args[:4]], 2, *[t.float().cuda() for t in args[4:]])
    torch.testing.assert_close(got.cpu(), want.float(), **TOL)
