"""routed_conv2d: every kernel backend against the dense-conv-plus-mask reference."""
import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import HAS_CUDA, kernel_devices_and_backends, requires_cuda
from fastmod import _extension
from fastmod.ops import routed_conv2d, routed_conv2d_reference

PAIRS = kernel_devices_and_backends("routed_conv2d", "routed_conv2d", ("cpu", "cuda"))
needs_ext = pytest.mark.skipif(not _extension.has_op("routed_conv2d"), reason="fastmod._C not built")
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 6e-2}


def make_gates(kind, n, g, dtype=torch.float32, device="cpu"):
    if kind == "random":
        gates = (torch.rand(n, g) < 0.5).to(dtype)
        gates[0, 0] = 1.0  # at least one on and, for n*g > 1, usually one off
        if n * g > 1:
            gates.view(-1)[-1] = 0.0
    elif kind == "on":
        gates = torch.ones(n, g, dtype=dtype)
    elif kind == "off":
        gates = torch.zeros(n, g, dtype=dtype)
    else:  # non-binary, with exact zeros
        gates = torch.rand(n, g, dtype=dtype) * (torch.rand(n, g) < 0.6)
    return gates.to(device)


def problem(mode, k, stride, dtype=torch.float32, device="cpu", n=3, cin=8, cout=8, hw=7, blocks=4,
            bias=True):
    groups = blocks if mode == "group" else 1
    x = torch.randn(n, cin, hw, hw, dtype=dtype, device=device)
    w = torch.randn(cout, cin // groups, k, k, dtype=dtype, device=device) / (cin // groups * k * k) ** 0.5
    b = torch.randn(cout, dtype=dtype, device=device) if bias else None
    kw = dict(stride=stride, padding=k // 2, groups=groups, gate_on=mode)
    return x, w, b, kw


def run_both(x, w, gates, b, kw, backend, router_grad=None, upcast=False):
    """(outputs, grads) of backend and reference (reference on fp32 upcasts if asked)."""
    results = []
    for fn, extra in ((routed_conv2d, {"backend": backend}), (routed_conv2d_reference, {})):
        ins = [t if t is None else t.detach().clone() for t in (x, w, gates, b)]
        if upcast and fn is routed_conv2d_reference:
            ins = [t if t is None else t.float() for t in ins]
        for t in ins:
            if t is not None:
                t.requires_grad_(True)
        xx, ww, gg, bb = ins
        y = fn(xx, ww, gg, bb, router_grad=router_grad, **kw, **extra)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
        y.backward(dy)
        results.append((y.detach(), [t.grad for t in ins if t is not None]))
    return results


def assert_close(a, b, dtype):
    tol = TOL[dtype]
    scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
    torch.testing.assert_close(a.to(b.dtype), b, atol=tol * scale, rtol=tol)


@needs_ext
@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("mode", ["group", "out", "in"])
@pytest.mark.parametrize("k,stride", [(1, 1), (3, 1), (3, 2), (1, 2)])
@pytest.mark.parametrize("kind", ["random", "on", "off", "nonbinary"])
def test_matches_reference_fp32(device, backend, mode, k, stride, kind):
    x, w, b, kw = problem(mode, k, stride, device=device)
    gates = make_gates(kind, x.shape[0], 4, device=device)
    (y, grads), (yr, gr) = run_both(x, w, gates, b, kw, backend)
    assert_close(y, yr, torch.float32)
    for a, r in zip(grads, gr):
        assert_close(a, r, torch.float32)


@needs_ext
@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("mode", ["group", "out", "in"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_matches_reference_dtypes(device, backend, mode, dtype):
    x, w, b, kw = problem(mode, 3, 2, dtype=dtype, device=device)
    gates = make_gates("nonbinary", x.shape[0], 4, dtype=dtype, device=device)
    (y, grads), (yr, gr) = run_both(x, w, gates, b, kw, backend, upcast=dtype != torch.float64)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_close(y, yr, dtype)
    for a, r in zip(grads, gr):
        assert_close(a, r, dtype)


@needs_ext
@pytest.mark.parametrize("mode", ["group", "out", "in"])
def test_router_grad_active(mode):
    x, w, b, kw = problem(mode, 3, 1)
    gates = make_gates("nonbinary", x.shape[0], 4)
    (y, grads), (yr, gr) = run_both(x, w, gates, b, kw, "cpu", router_grad="active")
    for a, r in zip(grads, gr):
        assert_close(a, r, torch.float32)
    gg = grads[2]
    assert (gg[gates == 0] == 0).all()
    # exact differs from active exactly on the off gates
    (_, grads_exact), _ = run_both(x, w, gates, b, kw, "cpu", router_grad="exact")
    assert_close(grads_exact[2][gates != 0], gg[gates != 0], torch.float32)
    assert (grads_exact[2][gates == 0] != 0).any()


@needs_ext
@pytest.mark.parametrize("mode", ["group", "out"])
def test_off_blocks_exactly_zero(mode):
    x, w, b, kw = problem(mode, 3, 1)
    gates = make_gates("random", x.shape[0], 4)
    y = routed_conv2d(x, w, gates, b, backend="cpu", **kw)
    blocks = y.view(x.shape[0], 4, -1)
    assert (blocks[gates == 0] == 0).all()
    assert (blocks[gates != 0] != 0).any()


@needs_ext
@pytest.mark.parametrize("mode", ["group", "out", "in"])
def test_gradcheck_float64(mode):
    x, w, b, kw = problem(mode, 3, 2, dtype=torch.float64, n=2, cin=4, cout=4, hw=5, blocks=2)
    gates = torch.tensor([[1.0, 0.0], [0.5, 2.0]], dtype=torch.float64)
    ins = [t.requires_grad_(True) for t in (x, w, gates, b)]
    for rg in ("exact", "active"):
        # gradcheck perturbs gates; keep exact zeros by checking gates only in "exact" mode
        fn = lambda xx, ww, gg, bb: routed_conv2d(xx, ww, gg, bb, backend="cpu", router_grad=rg, **kw)  # noqa: E731
        if rg == "active":
            ins[2].requires_grad_(False)
        assert torch.autograd.gradcheck(fn, tuple(ins), eps=1e-6, atol=1e-6, fast_mode=True)


@needs_ext
@pytest.mark.parametrize("layout", ["noncontiguous", "channels_last"])
@pytest.mark.parametrize("mode", ["group", "in"])
def test_layouts(layout, mode):
    x, w, b, kw = problem(mode, 3, 1)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
        w = w.to(memory_format=torch.channels_last)
    else:
        x = torch.randn(x.shape[0], x.shape[1], x.shape[2], 2 * x.shape[3])[..., ::2]
    gates = make_gates("random", x.shape[0], 4)
    (y, grads), (yr, gr) = run_both(x, w, gates, b, kw, "cpu")
    assert_close(y, yr, torch.float32)
    for a, r in zip(grads, gr):
        assert_close(a, r, torch.float32)


@needs_ext
@pytest.mark.parametrize("mode", ["group", "out", "in"])
def test_empty_batch(mode):
    x, w, b, kw = problem(mode, 3, 1, n=0)
    gates = torch.zeros(0, 4, requires_grad=True)
    y = routed_conv2d(x, w.requires_grad_(), gates, b, backend="cpu", **kw)
    assert y.shape == (0, 8, 7, 7)
    y.sum().backward()
    assert w.grad.abs().sum() == 0


@needs_ext
def test_opcheck():
    for mode in ("group", "out", "in"):
        x, w, b, kw = problem(mode, 3, 1)
        gates = make_gates("nonbinary", x.shape[0], 4)
        args = (x, w.requires_grad_(), gates.requires_grad_(), b, [1, 1], [1, 1], [1, 1], kw["groups"], mode, True)
        torch.library.opcheck(torch.ops.fastmod.routed_conv2d.default, args)


@needs_ext
def test_compile_fullgraph():
    torch._dynamo.reset()
    x, w, b, kw = problem("group", 3, 1)
    gates = make_gates("random", x.shape[0], 4)
    fn = torch.compile(lambda *a: routed_conv2d(*a, backend="cpu", **kw), fullgraph=True)
    ins = [t.clone().requires_grad_(True) for t in (x, w, gates, b)]
    y = fn(*ins)
    y.sum().backward()
    yr = routed_conv2d_reference(x, w, gates, b, **kw)
    assert_close(y.detach(), yr, torch.float32)
    assert ins[1].grad is not None


@needs_ext
@settings(max_examples=25, deadline=None)
@given(mode=st.sampled_from(["group", "out", "in"]), n=st.integers(0, 3), blocks=st.sampled_from([1, 2, 4]),
       per=st.integers(1, 3), hw=st.integers(1, 6), k=st.sampled_from([1, 2, 3]), stride=st.integers(1, 3),
       dil=st.integers(1, 2), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_hypothesis_shapes(mode, n, blocks, per, hw, k, stride, dil, bias, seed):
    torch.manual_seed(seed)
    cin = cout = blocks * per
    pad = (dil * (k - 1)) // 2
    if hw + 2 * pad < dil * (k - 1) + 1:
        return
    groups = blocks if mode == "group" else 1
    x = torch.randn(n, cin, hw, hw, dtype=torch.float64)
    w = torch.randn(cout, cin // groups, k, k, dtype=torch.float64)
    b = torch.randn(cout, dtype=torch.float64) if bias else None
    gates = make_gates("nonbinary", n, blocks, torch.float64)
    kw = dict(stride=stride, padding=pad, dilation=dil, groups=groups, gate_on=mode)
    (y, grads), (yr, gr) = run_both(x, w, gates, b, kw, "cpu")
    assert_close(y, yr, torch.float64)
    for a, r in zip(grads, gr):
        assert_close(a, r, torch.float64)


BAD = [
    (dict(x=torch.randn(2, 8, 5)), ValueError, "x"),
    (dict(x=torch.randn(2, 8, 5, 5).long()), TypeError, "x"),
    (dict(weight=torch.randn(8, 2, 3, 3).double()), TypeError, "weight"),
    (dict(gates=torch.ones(3, 4)), ValueError, "gates"),
    (dict(gates=torch.ones(2, 3)), ValueError, "G=3"),
    (dict(gates=[[1.0]]), TypeError, "gates"),
    (dict(groups=2), ValueError, "groups"),
    (dict(gate_on="outs"), ValueError, "gate_on"),
    (dict(router_grad="all"), ValueError, "router_grad"),
    (dict(stride=0), ValueError, "stride"),
    (dict(padding=-1), ValueError, "padding"),
    (dict(padding="same"), TypeError, "padding"),
    (dict(stride=(1, 1, 1)), TypeError, "stride"),
    (dict(bias=torch.randn(7)), ValueError, "bias"),
    (dict(gate_on="out", groups=4, weight=torch.randn(8, 2, 3, 3)), ValueError, "groups=1"),
    (dict(gate_on="out", groups=1, weight=torch.randn(6, 8, 3, 3), bias=None), ValueError, "gates.shape"),
    (dict(x=torch.randn(2, 8, 1, 1), padding=0), ValueError, "empty"),
    (dict(backend="tpu"), ValueError, "backend"),
]


@pytest.mark.parametrize("override,exc,word", BAD)
def test_bad_inputs(override, exc, word):
    args = dict(x=torch.randn(2, 8, 5, 5), weight=torch.randn(8, 2, 3, 3), gates=torch.ones(2, 4),
                bias=torch.randn(8), groups=4, gate_on="group", padding=0)
    args.update(override)
    if args["gate_on"] == "out" and "weight" not in override:
        args["weight"] = torch.randn(8, 8, 3, 3)
    with pytest.raises(exc, match=word):
        routed_conv2d(args.pop("x"), args.pop("weight"), args.pop("gates"), args.pop("bias"), **args)


@requires_cuda
@needs_ext
@pytest.mark.parametrize("mode,k,stride,dtype", list(itertools.product(
    ["group", "out", "in"], [1, 3], [1, 2], [torch.float32, torch.float16, torch.bfloat16])))
@pytest.mark.parametrize("kind", ["random", "on", "off", "nonbinary"])
def test_cuda_matches_reference(mode, k, stride, dtype, kind, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 means fp32 here
    x, w, b, kw = problem(mode, k, stride, dtype=dtype, device="cuda", n=5, cin=16, cout=16, hw=9)
    gates = make_gates(kind, 5, 4, device="cuda")
    for rg in ("exact", "active"):
        (y, grads), (yr, gr) = run_both(x, w, gates, b, kw, "cuda", router_grad=rg,
                                        upcast=dtype != torch.float32)
        assert_close(y, yr, dtype)
        for a, r in zip(grads, gr):
            assert_close(a, r, dtype)
    if mode != "in":
        y = routed_conv2d(x, w, gates, b, backend="cuda", **kw)
        assert (y.view(5, 4, -1)[gates == 0] == 0).all()


@needs_ext
@pytest.mark.parametrize("mode", ["group", "out", "in"])
def test_partial_requires_grad(mode):
    x, w, b, kw = problem(mode, 3, 1)
    gates = make_gates("nonbinary", x.shape[0], 4)
    for which in range(3):  # only x, only weight, only gates need a gradient
        ins = [t.clone() for t in (x, w, gates)]
        ins[which].requires_grad_(True)
        y = routed_conv2d(*ins, b, backend="cpu", **kw)
        (g,) = torch.autograd.grad(y.square().sum(), ins[which])
        ref = [t.clone() for t in (x, w, gates)]
        ref[which].requires_grad_(True)
        (gr,) = torch.autograd.grad(routed_conv2d_reference(*ref, b, **kw).square().sum(), ref[which])
        assert_close(g, gr, torch.float32)


@needs_ext
def test_inference_mode():
    x, w, b, kw = problem("out", 3, 1, n=4)
    gates = make_gates("random", 4, 4)
    with torch.inference_mode():
        y = routed_conv2d(x, w, gates, b, backend="cpu", **kw)
    assert_close(y, routed_conv2d_reference(x, w, gates, b, **kw), torch.float32)


@needs_ext
@pytest.mark.parametrize("mode", ["group", "out", "in"])
def test_larger_shapes(mode):
    """Shapes where oneDNN picks its blocked algorithms (a threading bug hid here)."""
    x, w, b, kw = problem(mode, 3, 1, n=4, cin=64, cout=64, hw=28, blocks=16)
    gates = make_gates("random", 4, 16)
    (y, grads), (yr, gr) = run_both(x, w, gates, b, kw, "cpu", router_grad="active")
    assert_close(y, yr, torch.float32)
    for a, r in zip(grads, gr):
        assert_close(a, r, torch.float32)
