"""fastmod.ops.fused_norm: routed_batch_norm_relu and group_norm_add_relu.

Each kernel backend (C++ CPU, float32; Triton, on CUDA or in its CPU interpreter)
against the PyTorch reference run in float64: outputs, every gradient, running
statistics; the kernels' edges (off blocks, samples with every block off, 1x1
images, one channel per group, non-contiguous inputs); float16/bfloat16 on Triton;
opcheck; torch.compile; bad arguments.
"""
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmod import _extension, backends
from fastmod.ops import (group_norm_add_relu, group_norm_add_relu_reference, routed_batch_norm_relu,
                         routed_batch_norm_relu_reference)

needs_ext = pytest.mark.skipif(not _extension.has_op("routed_batch_norm_relu"), reason="fastmod._C not built")
# Triton runs on CUDA tensors, or on CPU ones under TRITON_INTERPRET=1 (tests/conftest.py).
DEVICE = {"cpu": "cpu", "triton": "cuda" if torch.cuda.is_available() else "cpu"}
needs_triton = pytest.mark.skipif(not backends.available("triton", torch.device(DEVICE["triton"])),
                                  reason="triton cannot run here")
KERNELS = [pytest.param("cpu", marks=needs_ext), pytest.param("triton", marks=needs_triton)]
TOL = dict(rtol=1e-4, atol=1e-4)


def _gates(n, g, kind, gen):
    if kind == "on":
        return torch.ones(n, g)
    if kind == "off":
        return torch.zeros(n, g)
    gates = (torch.rand(n, g, generator=gen) < 0.5).float()
    gates[0] = 0.0  # a sample with every block off
    if n > 1:
        gates[1] = 1.0
    if kind == "soft":  # non-binary: any non-zero gate is "on" (the mask is gates != 0)
        gates = gates * (0.1 + torch.rand(n, g, generator=gen))
    return gates


def _masked_input(n, c, h, w, gates, gen):
    """A routed conv's output: its off blocks are zero."""
    x = torch.randn(n, c, h, w, generator=gen) * 2 + 0.3
    return x * (gates != 0).float().repeat_interleave(c // gates.shape[1], 1)[:, :, None, None]


def _run(fn, tensors, grad, device="cpu", **kw):
    """Output and gradients (on the CPU) of fn over ``tensors`` moved to ``device``
    (None entries pass through)."""
    leaves = [t.detach().clone().to(device).requires_grad_(True) if t is not None else None for t in tensors]
    y = fn(*leaves, **kw)
    y.backward(grad.to(device, y.dtype))
    return y.detach().cpu(), [t.grad.cpu() if t is not None else None for t in leaves]


def _assert_same(got, want, tol=TOL):
    y, grads = got
    yr, grads_r = want
    torch.testing.assert_close(y.double(), yr.double(), **tol)
    for i, (g, gr) in enumerate(zip(grads, grads_r)):
        if gr is None:
            assert g is None
        else:
            torch.testing.assert_close(g.double(), gr.double(), **tol, msg=lambda m: f"grad {i}: {m}")


# ---- routed_batch_norm_relu -----------------------------------------------------------

@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kind", ["random", "soft", "on", "off"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("hw", [(1, 1), (5, 7), (16, 16)])
def test_routed_bn_relu_matches_reference(backend, training, kind, affine, hw):
    dev = DEVICE[backend]
    gen = torch.Generator().manual_seed(hash((training, kind, affine, hw)) % 1000)
    n, c, g = 5, 12, 4
    gates = _gates(n, g, kind, gen)
    x = _masked_input(n, c, *hw, gates, gen)
    w = torch.rand(c, generator=gen) + 0.5 if affine else None
    b = torch.randn(c, generator=gen) if affine else None
    rm, rv = torch.randn(c, generator=gen) * 0.1, torch.rand(c, generator=gen) + 0.5
    rm64, rv64 = rm.double(), rv.double()
    rm, rv = rm.to(dev), rv.to(dev)
    dy = torch.randn(x.shape, generator=gen)
    got = _run(lambda x_, w_, b_: routed_batch_norm_relu(x_, gates.to(dev), rm, rv, w_, b_, training, 0.3, 1e-3,
                                                         backend=backend), [x, w, b], dy, dev)
    want = _run(lambda x_, w_, b_: routed_batch_norm_relu_reference(x_, gates.double(), rm64, rv64, w_, b_,
                                                                    training, 0.3, 1e-3),
                [x.double(), *(t.double() if t is not None else None for t in (w, b))], dy)
    _assert_same(got, want)
    torch.testing.assert_close(rm.cpu(), rm64.float(), **TOL)
    torch.testing.assert_close(rv.cpu(), rv64.float(), **TOL)


@pytest.mark.parametrize("backend", KERNELS)
def test_routed_bn_relu_off_blocks_are_exactly_zero(backend):
    dev = DEVICE[backend]
    gen = torch.Generator().manual_seed(1)
    gates = _gates(4, 4, "random", gen).to(dev)
    x = torch.randn(4, 8, 6, 6, generator=gen).to(dev).requires_grad_(True)  # off blocks NOT zero: ignored
    y = routed_batch_norm_relu(x, gates, None, None, training=True, backend=backend)
    y.backward(torch.randn(y.shape, generator=gen).to(dev))
    off = (gates == 0).repeat_interleave(2, 1)
    assert (y[off] == 0).all() and (x.grad[off] == 0).all()
    # and the on blocks do not see what the off blocks held
    y2 = routed_batch_norm_relu(x.detach() * (~off)[:, :, None, None], gates, None, None, training=True,
                                backend=backend)
    torch.testing.assert_close(y.detach(), y2)


@pytest.mark.parametrize("backend", KERNELS)
def test_routed_bn_relu_layouts(backend):
    dev = DEVICE[backend]
    gen = torch.Generator().manual_seed(2)
    gates = _gates(3, 2, "random", gen)
    x = _masked_input(3, 6, 5, 5, gates, gen)
    want = routed_batch_norm_relu_reference(x, gates, None, None, training=True)
    gates_t = gates.t().contiguous().t().to(dev)  # non-contiguous gates too
    for xi in (x.to(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        got = routed_batch_norm_relu(xi.to(dev), gates_t, None, None, training=True, backend=backend)
        torch.testing.assert_close(got.cpu(), want, **TOL)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_routed_bn_relu_cpu_backend_other_dtypes_run_the_reference(dtype):
    gates = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    x = torch.randn(2, 4, 3, 3).to(dtype)
    got = routed_batch_norm_relu(x, gates, None, None, training=True)
    assert got.dtype == dtype
    torch.testing.assert_close(got, routed_batch_norm_relu_reference(x, gates, None, None, training=True))
    with pytest.raises(TypeError, match="float32"):
        routed_batch_norm_relu(x, gates, None, None, training=True, backend="cpu")


@pytest.mark.parametrize("backend", KERNELS)
@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 5), g=st.integers(1, 4), cb=st.integers(1, 3), h=st.integers(1, 9),
       w=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_routed_bn_relu_hypothesis(backend, n, g, cb, h, w, seed):
    dev = DEVICE[backend]
    gen = torch.Generator().manual_seed(seed)
    gates = _gates(n, g, "random", gen)
    x = _masked_input(n, g * cb, h, w, gates, gen)
    dy = torch.randn(x.shape, generator=gen)
    got = _run(lambda x_: routed_batch_norm_relu(x_, gates.to(dev), None, None, training=True, backend=backend),
               [x], dy, dev)
    want = _run(lambda x_: routed_batch_norm_relu_reference(x_, gates.double(), None, None, training=True),
                [x.double()], dy)
    _assert_same(got, want)


# ---- group_norm_add_relu -----------------------------------------------------------------

@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("groups,c", [(4, 16), (1, 5), (6, 6)])
@pytest.mark.parametrize("hw", [(1, 1), (7, 5), (14, 14)])
@pytest.mark.parametrize("affine", [True, False])
def test_gn_add_relu_matches_reference(backend, groups, c, hw, affine):
    gen = torch.Generator().manual_seed(groups * 100 + c + hw[0])
    x = torch.randn(3, c, *hw, generator=gen) * 3 + 1
    r = torch.randn(3, c, *hw, generator=gen)
    w = torch.rand(c, generator=gen) + 0.5 if affine else None
    b = torch.randn(c, generator=gen) if affine else None
    dy = torch.randn(x.shape, generator=gen)
    got = _run(lambda *t: group_norm_add_relu(t[0], t[1], groups, t[2], t[3], 1e-5, backend=backend),
               [x, r, w, b], dy, DEVICE[backend])
    want = _run(lambda *t: group_norm_add_relu_reference(t[0], t[1], groups, t[2], t[3], 1e-5),
                [x.double(), r.double(), *(t.double() if t is not None else None for t in (w, b))], dy)
    if hw == (1, 1) and c == groups:  # one value per group: GN(x) = bias, dx = 0 up to rounding
        want = (want[0], [want[1][0] * 0, *want[1][1:]])
    _assert_same(got, want)


@pytest.mark.parametrize("backend", KERNELS)
def test_gn_add_relu_noncontiguous_and_zero_batch(backend):
    dev = DEVICE[backend]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 6, 6, generator=gen).to(memory_format=torch.channels_last)
    r = torch.randn(2, 8, 6, 6, generator=gen)[..., ::1].transpose(2, 3)
    torch.testing.assert_close(group_norm_add_relu(x.to(dev), r.to(dev), 4, backend=backend).cpu(),
                               group_norm_add_relu_reference(x, r, 4), **TOL)
    e = torch.randn(0, 8, 6, 6, device=dev)
    assert group_norm_add_relu(e, e, 4, backend=backend).shape == e.shape
    gates = torch.ones(0, 2, device=dev)
    assert routed_batch_norm_relu(e, gates, None, None, training=True, backend=backend).shape == e.shape


# ---- inplace=True (inference) ------------------------------------------------------------

@pytest.mark.parametrize("backend", [*KERNELS, "reference"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_inplace_matches_out_of_place(backend, layout):
    dev = DEVICE.get(backend, "cpu")
    gen = torch.Generator().manual_seed(6)
    gates = _gates(4, 4, "random", gen).to(dev)
    x = _masked_input(4, 8, 5, 6, gates.cpu(), gen).to(dev)
    r = torch.randn(4, 8, 5, 6, generator=gen).to(dev)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    rm, rv = (torch.randn(8, generator=gen) * 0.1).to(dev), (torch.rand(8, generator=gen) + 0.5).to(dev)
    for training in (True, False):
        stats = [(rm.clone(), rv.clone()) for _ in range(2)]
        want = routed_batch_norm_relu(x, gates, *stats[0], training=training, backend=backend)
        xi = x.clone()
        got = routed_batch_norm_relu(xi, gates, *stats[1], training=training, inplace=True, backend=backend)
        assert got is xi
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(stats[1], stats[0], rtol=0, atol=0)
    want = group_norm_add_relu(x, r, 4, backend=backend)
    xi = x.clone()
    got = group_norm_add_relu(xi, r, 4, inplace=True, backend=backend)
    assert got is xi
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_ext
def test_inplace_refuses_tensors_autograd_needs():
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    g = torch.ones(2, 2)
    with pytest.raises(ValueError, match="inplace"):
        routed_batch_norm_relu(x, g, None, None, training=True, inplace=True)
    with pytest.raises(ValueError, match="inplace"):
        group_norm_add_relu(x, x.detach(), 2, inplace=True)
    with pytest.raises(ValueError, match="inplace"):
        group_norm_add_relu(x.detach().clone(), x.detach(), 2, torch.ones(4, requires_grad=True), inplace=True)
    with pytest.raises(TypeError, match="inplace"):
        group_norm_add_relu(x.detach(), x.detach(), 2, inplace=1)
    with torch.no_grad():  # fine without autograd
        group_norm_add_relu(x.detach().clone(), x.detach(), 2, inplace=True)


# ---- registration, compile, bad input ---------------------------------------------------

def _ops(backend):
    """The backend's torch.ops.fastmod entries: (bn, gn, bn_, gn_)."""
    sfx = "_triton" if backend == "triton" else ""
    return [getattr(torch.ops.fastmod, name + sfx + tail).default
            for tail in ("", "_") for name in ("routed_batch_norm_relu", "group_norm_add_relu")]


@pytest.mark.parametrize("backend", KERNELS)
def test_opcheck(backend):
    dev = DEVICE[backend]
    bn, gn, bn_, gn_ = _ops(backend)
    kw = {}
    if backend == "triton" and dev == "cpu":
        # Triton's interpreter runs kernels even on fake tensors: the fake/AOT checks need a GPU
        kw = dict(test_utils=("test_schema", "test_autograd_registration"))
    opcheck = functools.partial(torch.library.opcheck, **kw)
    gen = torch.Generator().manual_seed(4)
    gates = _gates(3, 2, "random", gen).to(dev)
    x = _masked_input(3, 4, 5, 5, gates.cpu(), gen).to(dev).requires_grad_(True)
    w = (torch.rand(4, generator=gen) + 0.5).to(dev).requires_grad_(True)
    b = torch.randn(4, generator=gen).to(dev).requires_grad_(True)
    rm, rv = torch.zeros(4, device=dev), torch.ones(4, device=dev)
    for training in (True, False):
        opcheck(bn, (x, gates, w, b, rm, rv, training, 1e-5))
    r = torch.randn(3, 4, 5, 5, generator=gen).to(dev).requires_grad_(True)
    opcheck(gn, (x, r, w, b, 2, 1e-5))
    xd, rd, wd, bd = (t.detach() for t in (x, r, w, b))
    opcheck(bn_, (xd.clone(), gates, wd, bd, rm, rv, False, 1e-5))
    opcheck(gn_, (xd.clone(), rd, wd, bd, 2, 1e-5))


@pytest.mark.parametrize("backend", KERNELS)
def test_compile_fullgraph(backend):
    dev = DEVICE[backend]
    if backend == "triton" and dev == "cpu":
        pytest.skip("Triton's interpreter runs kernels on fake tensors: compiling Triton ops needs a GPU")
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(5)
    gates = _gates(3, 2, "random", gen)
    x = _masked_input(3, 4, 5, 5, gates, gen)
    r = torch.randn(3, 4, 5, 5, generator=gen)
    rm, rv = torch.zeros(4, device=dev), torch.ones(4, device=dev)
    gates_d = gates.to(dev)

    def block(x_, r_):
        y = routed_batch_norm_relu(x_, gates_d, rm, rv, training=True, momentum=0.1, backend=backend)
        return group_norm_add_relu(y, r_, 2, backend=backend)

    fn = torch.compile(block, fullgraph=True)
    xs, rs = x.to(dev).requires_grad_(True), r.to(dev).requires_grad_(True)
    y = fn(xs, rs)
    y.sum().backward()
    rm_ref, rv_ref = torch.zeros(4), torch.ones(4)
    y_ref = group_norm_add_relu_reference(
        routed_batch_norm_relu_reference(x, gates, rm_ref, rv_ref, training=True), r, 2)
    torch.testing.assert_close(y.detach().cpu(), y_ref, **TOL)
    torch.testing.assert_close(rm.cpu(), rm_ref, **TOL)
    assert xs.grad is not None and rs.grad is not None


@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_triton_half_dtypes(dtype, tol):
    """float16/bfloat16 tensors (float32 arithmetic inside) against the float64
    reference on the same rounded inputs; tolerance a few units of the output's
    last place (values up to ~8)."""
    dev = DEVICE["triton"]
    gen = torch.Generator().manual_seed(7)
    gates = _gates(4, 4, "random", gen)
    x = _masked_input(4, 8, 5, 6, gates, gen).to(dtype)
    r = torch.randn(4, 8, 5, 6, generator=gen).to(dtype)
    w, b = (torch.rand(8, generator=gen) + 0.5).to(dtype), torch.randn(8, generator=gen).to(dtype)
    dy = torch.randn(x.shape, generator=gen)
    close = dict(rtol=tol, atol=tol)
    got = _run(lambda x_, w_, b_: routed_batch_norm_relu(x_, gates.to(dev), None, None, w_, b_, True,
                                                         backend="triton"), [x, w, b], dy, dev)
    assert got[0].dtype == dtype and all(g.dtype == dtype for g in got[1])
    want = _run(lambda x_, w_, b_: routed_batch_norm_relu_reference(x_, gates.double(), None, None, w_, b_, True),
                [x.double(), w.double(), b.double()], dy)
    _assert_same(got, want, close)
    got = _run(lambda *t: group_norm_add_relu(*t[:2], 2, *t[2:], backend="triton"), [x, r, w, b], dy, dev)
    want = _run(lambda *t: group_norm_add_relu_reference(*t[:2], 2, *t[2:]),
                [t.double() for t in (x, r, w, b)], dy)
    _assert_same(got, want, close)


@needs_triton
@pytest.mark.parametrize("hw", [(40, 40), (33, 17)])
def test_triton_loops_over_blocks(hw):
    """Images wider than one program block (1024 pixels for the routed BN, 512 and
    4 channels per tile for the GroupNorm here): every kernel loop takes several turns."""
    dev = DEVICE["triton"]
    gen = torch.Generator().manual_seed(8)
    gates = _gates(3, 2, "random", gen)
    x = _masked_input(3, 8, *hw, gates, gen)
    r = torch.randn(x.shape, generator=gen)
    dy = torch.randn(x.shape, generator=gen)
    got = _run(lambda x_: routed_batch_norm_relu(x_, gates.to(dev), None, None, training=True,
                                                 backend="triton"), [x], dy, dev)
    want = _run(lambda x_: routed_batch_norm_relu_reference(x_, gates.double(), None, None, training=True),
                [x.double()], dy)
    _assert_same(got, want)
    got = _run(lambda x_, r_: group_norm_add_relu(x_, r_, 1, backend="triton"), [x, r], dy, dev)
    want = _run(lambda x_, r_: group_norm_add_relu_reference(x_, r_, 1), [x.double(), r.double()], dy)
    _assert_same(got, want)


@needs_triton
def test_triton_float64_runs_the_reference():
    dev = DEVICE["triton"]
    gates = torch.tensor([[1.0, 0.0], [0.0, 1.0]], device=dev)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, device=dev)
    torch.testing.assert_close(routed_batch_norm_relu(x, gates, None, None, training=True),
                               routed_batch_norm_relu_reference(x, gates, None, None, training=True))
    with pytest.raises(TypeError, match="float32, float16, bfloat16"):
        routed_batch_norm_relu(x, gates, None, None, training=True, backend="triton")


X = torch.randn(2, 4, 3, 3)
G = torch.ones(2, 2)


@pytest.mark.parametrize("call,exc,word", [
    (lambda: routed_batch_norm_relu(X[0], G, None, None, training=True), ValueError, "x must be 4-D"),
    (lambda: routed_batch_norm_relu(X, torch.ones(2, 3), None, None, training=True), ValueError, "gates"),
    (lambda: routed_batch_norm_relu(X, torch.ones(3, 2), None, None, training=True), ValueError, "gates"),
    (lambda: routed_batch_norm_relu(X.int(), G, None, None, training=True), TypeError, "x must be a floating"),
    (lambda: routed_batch_norm_relu(X, G, None, None, training=False), ValueError, "running_mean"),
    (lambda: routed_batch_norm_relu(X, G, torch.zeros(4), None), ValueError, "running_var"),
    (lambda: routed_batch_norm_relu(X, G, torch.zeros(3), torch.ones(3)), ValueError, "running_mean"),
    (lambda: routed_batch_norm_relu(X, G, None, None, torch.ones(5), training=True), ValueError, "weight"),
    (lambda: routed_batch_norm_relu(X, G, None, None, training=1), TypeError, "training"),
    (lambda: routed_batch_norm_relu(X, G, None, None, training=True, eps=0.0), ValueError, "eps"),
    (lambda: routed_batch_norm_relu(X, G, None, None, training=True, momentum="x"), TypeError, "momentum"),
    (lambda: routed_batch_norm_relu(X[:1, :, :1, :1], G[:1], None, None, training=True), ValueError,
     "more than 1 value"),
    (lambda: group_norm_add_relu(X, X[:1], 2), ValueError, "residual"),
    (lambda: group_norm_add_relu(X, X.double(), 2), TypeError, "residual"),
    (lambda: group_norm_add_relu(X, X, 3), ValueError, "num_groups"),
    (lambda: group_norm_add_relu(X, X, 2.0), TypeError, "num_groups"),
    (lambda: group_norm_add_relu(X, X, 2, torch.ones(3)), ValueError, "weight"),
    (lambda: group_norm_add_relu(X, X, 2, backend="cuda"), ValueError, "backend"),
])
def test_bad_arguments(call, exc, word):
    with pytest.raises(exc, match=word):
        call()
