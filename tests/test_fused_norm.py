"""fastmod.ops.fused_norm: routed_batch_norm_relu and group_norm_add_relu.

The C++ CPU kernels (float32) against the PyTorch reference run in float64: outputs,
every gradient, running statistics; the kernels' edges (off blocks, samples with every
block off, 1x1 images, one channel per group, non-contiguous inputs); opcheck;
torch.compile; bad arguments.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmod import _extension
from fastmod.ops import (group_norm_add_relu, group_norm_add_relu_reference, routed_batch_norm_relu,
                         routed_batch_norm_relu_reference)

needs_ext = pytest.mark.skipif(not _extension.has_op("routed_batch_norm_relu"), reason="fastmod._C not built")
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


def _run(fn, tensors, grad, **kw):
    """Output and gradients of fn over ``tensors`` (None entries pass through)."""
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in tensors]
    y = fn(*leaves, **kw)
    y.backward(grad.to(y.dtype))
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def _assert_same(got, want):
    y, grads = got
    yr, grads_r = want
    torch.testing.assert_close(y, yr.float(), **TOL)
    for i, (g, gr) in enumerate(zip(grads, grads_r)):
        if gr is None:
            assert g is None
        else:
            torch.testing.assert_close(g, gr.float(), **TOL, msg=lambda m: f"grad {i}: {m}")


# ---- routed_batch_norm_relu -----------------------------------------------------------

@needs_ext
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kind", ["random", "soft", "on", "off"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("hw", [(1, 1), (5, 7), (16, 16)])
def test_routed_bn_relu_matches_reference(training, kind, affine, hw):
    gen = torch.Generator().manual_seed(hash((training, kind, affine, hw)) % 1000)
    n, c, g = 5, 12, 4
    gates = _gates(n, g, kind, gen)
    x = _masked_input(n, c, *hw, gates, gen)
    w = torch.rand(c, generator=gen) + 0.5 if affine else None
    b = torch.randn(c, generator=gen) if affine else None
    rm, rv = torch.randn(c, generator=gen) * 0.1, torch.rand(c, generator=gen) + 0.5
    rm64, rv64 = rm.double(), rv.double()
    dy = torch.randn(x.shape, generator=gen)
    got = _run(lambda x_, w_, b_: routed_batch_norm_relu(x_, gates, rm, rv, w_, b_, training, 0.3, 1e-3,
                                                         backend="cpu"), [x, w, b], dy)
    want = _run(lambda x_, w_, b_: routed_batch_norm_relu_reference(x_, gates.double(), rm64, rv64, w_, b_,
                                                                    training, 0.3, 1e-3),
                [x.double(), *(t.double() if t is not None else None for t in (w, b))], dy)
    _assert_same(got, want)
    torch.testing.assert_close(rm, rm64.float(), **TOL)
    torch.testing.assert_close(rv, rv64.float(), **TOL)


@needs_ext
def test_routed_bn_relu_off_blocks_are_exactly_zero():
    gen = torch.Generator().manual_seed(1)
    gates = _gates(4, 4, "random", gen)
    x = torch.randn(4, 8, 6, 6, generator=gen).requires_grad_(True)  # off blocks NOT zero: ignored
    y = routed_batch_norm_relu(x, gates, None, None, training=True, backend="cpu")
    y.backward(torch.randn(y.shape, generator=gen))
    off = (gates == 0).repeat_interleave(2, 1)
    assert (y[off] == 0).all() and (x.grad[off] == 0).all()
    # and the on blocks do not see what the off blocks held
    y2 = routed_batch_norm_relu(x.detach() * (~off)[:, :, None, None], gates, None, None, training=True,
                                backend="cpu")
    torch.testing.assert_close(y.detach(), y2)


@needs_ext
def test_routed_bn_relu_layouts():
    gen = torch.Generator().manual_seed(2)
    gates = _gates(3, 2, "random", gen)
    x = _masked_input(3, 6, 5, 5, gates, gen)
    want = routed_batch_norm_relu_reference(x, gates, None, None, training=True)
    for xi in (x.to(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        torch.testing.assert_close(routed_batch_norm_relu(xi, gates, None, None, training=True, backend="cpu"),
                                   want, **TOL)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_routed_bn_relu_other_dtypes_run_the_reference(dtype):
    gates = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    x = torch.randn(2, 4, 3, 3).to(dtype)
    got = routed_batch_norm_relu(x, gates, None, None, training=True)
    assert got.dtype == dtype
    torch.testing.assert_close(got, routed_batch_norm_relu_reference(x, gates, None, None, training=True))
    with pytest.raises(TypeError, match="float32"):
        routed_batch_norm_relu(x, gates, None, None, training=True, backend="cpu")


@needs_ext
@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 5), g=st.integers(1, 4), cb=st.integers(1, 3), h=st.integers(1, 9),
       w=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_routed_bn_relu_hypothesis(n, g, cb, h, w, seed):
    gen = torch.Generator().manual_seed(seed)
    gates = _gates(n, g, "random", gen)
    x = _masked_input(n, g * cb, h, w, gates, gen)
    dy = torch.randn(x.shape, generator=gen)
    got = _run(lambda x_: routed_batch_norm_relu(x_, gates, None, None, training=True, backend="cpu"), [x], dy)
    want = _run(lambda x_: routed_batch_norm_relu_reference(x_, gates.double(), None, None, training=True),
                [x.double()], dy)
    _assert_same(got, want)


# ---- group_norm_add_relu -----------------------------------------------------------------

@needs_ext
@pytest.mark.parametrize("groups,c", [(4, 16), (1, 5), (6, 6)])
@pytest.mark.parametrize("hw", [(1, 1), (7, 5), (14, 14)])
@pytest.mark.parametrize("affine", [True, False])
def test_gn_add_relu_matches_reference(groups, c, hw, affine):
    gen = torch.Generator().manual_seed(groups * 100 + c + hw[0])
    x = torch.randn(3, c, *hw, generator=gen) * 3 + 1
    r = torch.randn(3, c, *hw, generator=gen)
    w = torch.rand(c, generator=gen) + 0.5 if affine else None
    b = torch.randn(c, generator=gen) if affine else None
    dy = torch.randn(x.shape, generator=gen)
    got = _run(lambda *t: group_norm_add_relu(t[0], t[1], groups, t[2], t[3], 1e-5, backend="cpu"),
               [x, r, w, b], dy)
    want = _run(lambda *t: group_norm_add_relu_reference(t[0], t[1], groups, t[2], t[3], 1e-5),
                [x.double(), r.double(), *(t.double() if t is not None else None for t in (w, b))], dy)
    if hw == (1, 1) and c == groups:  # one value per group: GN(x) = bias, dx = 0 up to rounding
        want = (want[0], [want[1][0] * 0, *want[1][1:]])
    _assert_same(got, want)


@needs_ext
def test_gn_add_relu_noncontiguous_and_zero_batch():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 6, 6, generator=gen).to(memory_format=torch.channels_last)
    r = torch.randn(2, 8, 6, 6, generator=gen)[..., ::1].transpose(2, 3)
    torch.testing.assert_close(group_norm_add_relu(x, r, 4, backend="cpu"),
                               group_norm_add_relu_reference(x, r, 4), **TOL)
    e = torch.randn(0, 8, 6, 6)
    assert group_norm_add_relu(e, e, 4).shape == e.shape


# ---- inplace=True (inference) ------------------------------------------------------------

@needs_ext
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_inplace_matches_out_of_place(backend, layout):
    gen = torch.Generator().manual_seed(6)
    gates = _gates(4, 4, "random", gen)
    x = _masked_input(4, 8, 5, 6, gates, gen)
    r = torch.randn(4, 8, 5, 6, generator=gen)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    rm, rv = torch.randn(8, generator=gen) * 0.1, torch.rand(8, generator=gen) + 0.5
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

@needs_ext
def test_opcheck():
    gen = torch.Generator().manual_seed(4)
    gates = _gates(3, 2, "random", gen)
    x = _masked_input(3, 4, 5, 5, gates, gen).requires_grad_(True)
    w, b = (torch.rand(4, generator=gen) + 0.5).requires_grad_(True), torch.randn(4).requires_grad_(True)
    rm, rv = torch.zeros(4), torch.ones(4)
    for training in (True, False):
        torch.library.opcheck(torch.ops.fastmod.routed_batch_norm_relu.default,
                              (x, gates, w, b, rm, rv, training, 1e-5))
    r = torch.randn(3, 4, 5, 5, generator=gen).requires_grad_(True)
    torch.library.opcheck(torch.ops.fastmod.group_norm_add_relu.default, (x, r, w, b, 2, 1e-5))
    xd, rd, wd, bd = (t.detach() for t in (x, r, w, b))
    torch.library.opcheck(torch.ops.fastmod.routed_batch_norm_relu_.default,
                          (xd.clone(), gates, wd, bd, rm, rv, False, 1e-5))
    torch.library.opcheck(torch.ops.fastmod.group_norm_add_relu_.default, (xd.clone(), rd, wd, bd, 2, 1e-5))


@needs_ext
def test_compile_fullgraph():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(5)
    gates = _gates(3, 2, "random", gen)
    x = _masked_input(3, 4, 5, 5, gates, gen)
    r = torch.randn(3, 4, 5, 5, generator=gen)
    rm, rv = torch.zeros(4), torch.ones(4)

    def block(x_, r_):
        y = routed_batch_norm_relu(x_, gates, rm, rv, training=True, momentum=0.1, backend="cpu")
        return group_norm_add_relu(y, r_, 2, backend="cpu")

    fn = torch.compile(block, fullgraph=True)
    xs, rs = x.clone().requires_grad_(True), r.clone().requires_grad_(True)
    y = fn(xs, rs)
    y.sum().backward()
    rm_ref, rv_ref = torch.zeros(4), torch.ones(4)
    y_ref = group_norm_add_relu_reference(
        routed_batch_norm_relu_reference(x, gates, rm_ref, rv_ref, training=True), r, 2)
    torch.testing.assert_close(y.detach(), y_ref, **TOL)
    torch.testing.assert_close(rm, rm_ref, **TOL)
    assert xs.grad is not None and rs.grad is not None


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
    (lambda: group_norm_add_relu(X, X, 2, backend="triton"), ValueError, "backend"),
])
def test_bad_arguments(call, exc, word):
    with pytest.raises(exc, match=word):
        call()
