"""fastmod.ops.mixed_node against its reference, on every backend this machine can run."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import HAS_CUDA, kernel_devices_and_backends
from fastmod import ops

PAIRS = kernel_devices_and_backends("mixed_node", "mixed_node_fwd", ("triton", "cpu"))
IDS = [f"{d}-{b}" for d, b in PAIRS]

# (x1 shape, x2 shape, K): the broadcast patterns LNMN uses and some awkward ones.
CASES = [
    ((2, 3, 4, 5), (2, 3, 4, 5), None),    # two full maps
    ((2, 3, 4, 5), (2, 3, 1, 1), None),    # features x textual parameter
    ((2, 3, 4, 5), (2, 1, 4, 5), None),    # features x attention map
    ((2, 3, 4, 5), (3, 4, 5), None),       # shared across the batch
    ((2, 3, 4, 5), (2, 3, 4, 1), None),    # partial spatial broadcast (materialised)
    ((2, 3, 4, 5), (3, 2, 3, 1, 1), 3),    # K nodes, features shared by all nodes
    ((3, 2, 3, 4, 5), (3, 2, 1, 4, 5), 3),  # K nodes, attention maps
    ((1, 2, 3, 6), (3, 2, 3, 1), 3),       # K nodes, one spatial dim
    ((7,), (7,), None),                    # plain vectors
    ((2, 5), (1, 5), None),
]


def _run(fn, x1, x2, alpha, grad, **kw):
    leaves = [t for t in (x1, x2, alpha) if t.requires_grad]
    out = fn(x1, x2, alpha, **kw)
    grads = torch.autograd.grad(out, leaves, grad, allow_unused=True) if leaves else ()
    return out, grads


def _inputs(s1, s2, K, dtype, device, requires_grad=True):
    x1 = torch.randn(s1, dtype=dtype, device=device, requires_grad=requires_grad)
    x2 = torch.randn(s2, dtype=dtype, device=device, requires_grad=requires_grad)
    alpha = torch.randn(6 if K is None else (K, 6), device=device, dtype=torch.float64 if dtype == torch.float64
                        else torch.float32, requires_grad=requires_grad)
    return x1, x2, alpha


def _assert_close(got, want, dtype):
    tol = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5), torch.float16: (2e-2, 2e-2),
           torch.bfloat16: (8e-2, 8e-2)}[dtype]
    torch.testing.assert_close(got.to(torch.float64), want.to(torch.float64), rtol=tol[0], atol=tol[1],
                               equal_nan=True)


@pytest.mark.parametrize("device,backend", PAIRS, ids=IDS)
@pytest.mark.parametrize("s1,s2,K", CASES)
@pytest.mark.parametrize("normalize", [False, True])
def test_matches_reference_float64(device, backend, s1, s2, K, normalize):
    node_rank = len(s1 if len(s1) >= len(s2) else s2) - (K is not None)
    if normalize and node_rank < 2:
        pytest.skip("normalize needs a channel dim")
    x1, x2, alpha = _inputs(s1, s2, K, torch.float64, device)
    g = torch.randn(ops.mixed_node_reference(x1, x2, alpha, normalize=normalize).shape, dtype=torch.float64,
                    device=device)
    ref, rgrads = _run(ops.mixed_node_reference, x1, x2, alpha, g, normalize=normalize)
    out, grads = _run(ops.mixed_node, x1, x2, alpha, g, normalize=normalize, backend=backend)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    _assert_close(out, ref, torch.float64)
    for a, b in zip(grads, rgrads):
        assert a.shape == b.shape
        _assert_close(a, b, torch.float64)


@pytest.mark.parametrize("device,backend", PAIRS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("s1,s2,K", [CASES[1], CASES[2], CASES[5]])
@pytest.mark.parametrize("normalize", [False, True])
def test_low_precision(device, backend, dtype, s1, s2, K, normalize):
    x1, x2, alpha = _inputs(s1, s2, K, dtype, device)
    # Reference in float64 on the same (rounded) inputs: the kernel accumulates in fp32.
    x1r, x2r, ar = (t.detach().double().requires_grad_() for t in (x1, x2, alpha))
    ref = ops.mixed_node_reference(x1r, x2r, ar, normalize=normalize)
    g = torch.randn_like(ref)
    ref, rgrads = _run(ops.mixed_node_reference, x1r, x2r, ar, g, normalize=normalize)
    out, grads = _run(ops.mixed_node, x1, x2, alpha, g.to(dtype), normalize=normalize, backend=backend)
    assert out.dtype == dtype
    _assert_close(out, ref, dtype)
    for a, b in zip(grads, rgrads):
        assert a.dtype == (dtype if a.shape != alpha.shape else alpha.dtype)
        # Gradients summed over broadcast dims grow with the reduction: compare relative to their scale.
        scale = b.abs().max().clamp_min(1.0)
        _assert_close(a / scale, b / scale, dtype)


@pytest.mark.parametrize("device,backend", PAIRS, ids=IDS)
def test_ties_split_gradient_like_torch(device, backend):
    x1 = torch.randn(2, 3, 4, 4, device=device, dtype=torch.float64)
    x2 = x1.clone()
    x2[:, :, :2] += 1.0  # half tied, half not
    for mode_alpha in (torch.tensor([5.0, 0, 0, 0, 0, 0]), torch.tensor([0, 5.0, 0, 0, 0, 0])):
        a = mode_alpha.double().to(device)
        leaves = [x1.clone().requires_grad_(), x2.clone().requires_grad_()]
        g = torch.randn(2, 3, 4, 4, device=device, dtype=torch.float64)
        got = torch.autograd.grad(ops.mixed_node(*leaves, a, backend=backend, mode="hard"), leaves, g)
        want_leaves = [x1.clone().requires_grad_(), x2.clone().requires_grad_()]
        fn = torch.minimum if mode_alpha[0] > 0 else torch.maximum
        want = torch.autograd.grad(fn(*want_leaves), want_leaves, g)
        for a_, b_ in zip(got, want):
            torch.testing.assert_close(a_, b_)
        tied = (x1 == x2)
        torch.testing.assert_close(got[0][tied], 0.5 * g[tied])


@pytest.mark.parametrize("device,backend", PAIRS, ids=IDS)
def test_nan_propagates_like_reference(device, backend):
    x1, x2, alpha = _inputs((2, 3, 2, 2), (2, 3, 2, 2), None, torch.float32, device)
    with torch.no_grad():
        x1[0, 0, 0, 0] = float("nan")
        x2[1, 2, 1, 1] = float("nan")
    g = torch.randn(2, 3, 2, 2, device=device)
    ref, rg = _run(ops.mixed_node_reference, x1, x2, alpha, g)
    out, og = _run(ops.mixed_node, x1, x2, alpha, g, backend=backend)
    assert torch.equal(out.isnan(), ref.isnan())
    for a, b in zip(og[:2], rg[:2]):
        assert torch.equal(a.isnan(), b.isnan())
        _assert_close(a, b, torch.float32)
    # min alone, hard mode: NaN in either input gives NaN out, like torch.minimum.
    hard = ops.mixed_node(x1, x2, torch.tensor([9.0, 0, 0, 0, 0, 0], device=device), mode="hard", backend=backend)
    assert torch.equal(hard.isnan(), torch.minimum(x1, x2).isnan())


@pytest.mark.parametrize("device,backend", PAIRS, ids=IDS)
def test_masked_and_hard_ops_never_leak_inf(device, backend):
    x1 = torch.randn(2, 3, 2, 2, device=device, requires_grad=True)
    x2 = torch.full((2, 3, 2, 2), float("inf"), device=device, requires_grad=True)
    alpha = torch.zeros(6, device=device, requires_grad=True)
    mask = torch.tensor([False, False, False, False, True, False], device=device)
    out = ops.mixed_node(x1, x2, alpha, op_mask=mask, backend=backend)
    torch.testing.assert_close(out, x1 / 6)  # choose1 only, weight 1/6 (no renormalisation)
    out.sum().backward()
    assert torch.isfinite(x1.grad).all() and torch.isfinite(alpha.grad).all()
    hard = ops.mixed_node(x1, x2, torch.tensor([0, 0, 0, 0, 1.0, 0], device=device), mode="hard", backend=backend)
    torch.testing.assert_close(hard, x1)


@pytest.mark.parametrize("device,backend", PAIRS, ids=IDS)
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_modes_and_mask_match_reference(device, backend, mode):
    x1, x2, alpha = _inputs((3, 2, 4, 3, 3), (2, 4, 1, 1), 3, torch.float32, device)
    mask = torch.tensor([True, False, True, True, False, True], device=device)
    g = torch.randn(3, 2, 4, 3, 3, device=device)
    ref, rg = _run(ops.mixed_node_reference, x1, x2, alpha, g, mode=mode, op_mask=mask, normalize=True)
    out, og = _run(ops.mixed_node, x1, x2, alpha, g, mode=mode, op_mask=mask, normalize=True, backend=backend)
    _assert_close(out, ref, torch.float32)
    for a, b in zip(og, rg):
        if b is None:
            assert a is None or not a.abs().sum()
        else:
            _assert_close(a, b, torch.float32)
    if mode == "hard":
        assert og[2] is None or torch.count_nonzero(og[2]) == 0


@pytest.mark.parametrize("device,backend", PAIRS, ids=IDS)
@pytest.mark.parametrize("mask_shape", [(3, 6), (3, 1), (6,)])
def test_per_node_masks_and_argmax_ties(device, backend, mask_shape):
    """Masks per node (or broadcast), argmax ties (the first maximum wins, as torch.argmax)
    and NaN alphas, in both modes, against the float64 reference: the Triton kernels make
    the weights from alpha themselves."""
    x1, x2, alpha = _inputs((3, 2, 4, 5), (3, 2, 4, 5), 3, torch.float64, device)
    with torch.no_grad():
        alpha[0] = torch.tensor([0.5, 2.0, 2.0, -1.0, 2.0, 0.0])   # a three-way tie
        alpha[2, 3] = float("nan")                                  # argmax: the NaN
    mask = torch.rand(mask_shape, device=device) > 0.3
    mask.view(-1)[0] = True
    g = torch.randn(3, 2, 4, 5, dtype=torch.float64, device=device)
    for mode in ("soft", "hard"):
        ref, rg = _run(ops.mixed_node_reference, x1, x2, alpha, g, mode=mode, op_mask=mask)
        out, og = _run(ops.mixed_node, x1, x2, alpha, g, mode=mode, op_mask=mask, backend=backend)
        torch.testing.assert_close(out, ref, equal_nan=True, atol=1e-12, rtol=1e-12)
        for a, b in zip(og, rg):
            if b is None:
                assert a is None or not a.abs().sum()
            else:
                torch.testing.assert_close(a, b, equal_nan=True, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("device,backend", PAIRS, ids=IDS)
@pytest.mark.parametrize("normalize", [False, True])
def test_gradcheck(device, backend, normalize):
    x1, x2, alpha = _inputs((2, 3, 2, 2), (2, 3, 1, 1), None, torch.float64, device)
    assert torch.autograd.gradcheck(lambda a, b, c: ops.mixed_node(a, b, c, normalize=normalize, backend=backend),
                                    (x1, x2, alpha))


@pytest.mark.parametrize("device,backend", PAIRS, ids=IDS)
def test_empty_and_noncontiguous(device, backend):
    e1 = torch.randn(0, 3, 4, 4, device=device, requires_grad=True)
    e2 = torch.randn(0, 3, 1, 1, device=device, requires_grad=True)
    out = ops.mixed_node(e1, e2, torch.zeros(6, device=device), backend=backend)
    assert out.shape == (0, 3, 4, 4)
    out.sum().backward()
    assert e1.grad.shape == e1.shape and e2.grad.shape == e2.shape
    # A size-1 dim broadcast against a size-0 dim gives 0 (not max(1, 0)).
    z1 = torch.randn(3, 0, 4, 5, device=device, requires_grad=True)
    z2 = torch.randn(1, 1, 4, 1, device=device, requires_grad=True)
    out = ops.mixed_node(z1, z2, torch.zeros(3, 6, device=device), backend=backend)
    assert out.shape == (3, 0, 4, 5)
    out.sum().backward()
    assert torch.count_nonzero(z2.grad) == 0
    base = torch.randn(4, 5, 6, 3, device=device)
    x1 = base.permute(0, 3, 1, 2)                      # [4, 3, 5, 6], channels-last strides
    x2 = torch.randn(4, 6, 5, 3, device=device).transpose(1, 3)[:, :, ::1, :]  # odd strides
    alpha = torch.randn(6, device=device)
    _assert_close(ops.mixed_node(x1, x2, alpha, normalize=True, backend=backend),
                  ops.mixed_node_reference(x1, x2, alpha, normalize=True), torch.float32)


@pytest.mark.parametrize("device,backend", PAIRS, ids=IDS)
def test_saves_only_inputs_for_backward(device, backend):
    x1, x2, alpha = _inputs((2, 8, 4, 4), (2, 8, 4, 4), None, torch.float32, device)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ops.mixed_node(x1, x2, alpha, normalize=True, backend=backend)
    inputs = x1.nbytes + x2.nbytes
    small = sum(n for n in saved.values() if n <= 2 * alpha.nbytes)  # softmax output and w: 6 floats each
    assert sum(saved.values()) - small == inputs
    assert small <= 2 * alpha.nbytes
    out.sum().backward()


@pytest.mark.parametrize("device,backend", PAIRS, ids=IDS)
def test_torch_compile_fullgraph(device, backend):
    if backend == "triton" and not HAS_CUDA:
        pytest.skip("inductor does not compile Triton ops for CPU tensors")
    x1, x2, alpha = _inputs((2, 3, 4, 4), (2, 3, 1, 1), None, torch.float32, device)
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b, c: ops.mixed_node(a, b, c, normalize=True, backend=backend), fullgraph=True)
    out = fn(x1, x2, alpha)
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (x1, x2, alpha)]
    for t in (x1, x2, alpha):
        t.grad = None
    ref = ops.mixed_node_reference(x1, x2, alpha, normalize=True)
    ref.square().sum().backward()
    _assert_close(out, ref, torch.float32)
    for a, t in zip(grads, (x1, x2, alpha)):
        _assert_close(a, t.grad, torch.float32)


def test_opcheck_registered_ops():
    for device, backend in PAIRS:
        x1, x2, alpha = _inputs((1, 2, 3, 4), (1, 2, 3, 1), None, torch.float32, device)
        w = torch.softmax(alpha.detach(), -1).reshape(1, 6).requires_grad_()
        g = torch.randn(1, 2, 3, 4, device=device)
        if backend == "cpu":
            op = torch.ops.fastmod.mixed_node_fwd.default
            bwd = torch.ops.fastmod.mixed_node_bwd.default
            for normalize in (False, True):
                torch.library.opcheck(op, (x1, x2, w, normalize))
                torch.library.opcheck(bwd, (g, x1.detach(), x2.detach(), w.detach(), normalize, True, True))
            continue
        if device == "cpu":
            continue  # Triton's interpreter runs kernels even on fake tensors: only checkable on a GPU
        # The Triton ops take alpha [K, 6] and the op mask, and make the weights themselves.
        op = torch.ops.fastmod.mixed_node_triton_fwd.default
        bwd = torch.ops.fastmod.mixed_node_triton_bwd.default
        a2 = alpha.detach().reshape(1, 6).requires_grad_()
        mask = torch.tensor([[True, False, True, True, True, True]], device=device)
        for normalize, m, hard in ((False, None, False), (True, mask, False), (False, mask, True)):
            torch.library.opcheck(op, (x1, x2, a2, m, hard, normalize))
            torch.library.opcheck(bwd, (g, x1.detach(), x2.detach(), a2.detach(), m, hard, normalize,
                                        True, True, True))


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_hypothesis_shapes(data):
    rank = data.draw(st.integers(1, 4), label="rank")
    full = data.draw(st.lists(st.integers(1, 5), min_size=rank, max_size=rank), label="full")
    s1 = [d if data.draw(st.booleans()) else 1 for d in full]
    s2 = [d if data.draw(st.booleans()) else 1 for d in full]
    normalize = rank >= 2 and data.draw(st.booleans())
    for device, backend in PAIRS:
        x1, x2, alpha = _inputs(s1, s2, None, torch.float64, device)
        g = torch.randn(torch.broadcast_shapes(x1.shape, x2.shape), dtype=torch.float64, device=device)
        ref, rg = _run(ops.mixed_node_reference, x1, x2, alpha, g, normalize=normalize)
        out, og = _run(ops.mixed_node, x1, x2, alpha, g, normalize=normalize, backend=backend)
        _assert_close(out, ref, torch.float64)
        for a, b in zip(og, rg):
            _assert_close(a, b, torch.float64)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(x1=torch.zeros(2, 3), x2=torch.zeros(4, 3)), ValueError, "not broadcastable"),
    (dict(alpha=torch.zeros(5)), ValueError, "alpha"),
    (dict(alpha=torch.zeros(2, 3, 6)), ValueError, "alpha"),
    (dict(x1=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "x1"),
    (dict(x2=torch.zeros(2, 3, dtype=torch.float64)), TypeError, "x2"),
    (dict(x1=[[1.0]]), TypeError, "x1"),
    (dict(mode="median"), ValueError, "mode"),
    (dict(op_mask=torch.ones(6)), TypeError, "op_mask"),
    (dict(op_mask=torch.ones(4, dtype=torch.bool)), ValueError, "op_mask"),
    (dict(normalize="yes"), TypeError, "normalize"),
    (dict(x1=torch.zeros(3), x2=torch.zeros(3), normalize=True), ValueError, "channel"),
    (dict(alpha=torch.zeros(4, 6)), ValueError, "K"),
    (dict(backend="fortran"), ValueError, "backend"),
])
def test_bad_input(kwargs, exc, match):
    args = dict(x1=torch.zeros(2, 3), x2=torch.zeros(2, 3), alpha=torch.zeros(6))
    args.update(kwargs)
    x1, x2, alpha = args.pop("x1"), args.pop("x2"), args.pop("alpha")
    with pytest.raises(exc, match=match):
        ops.mixed_node(x1, x2, alpha, **args)


def test_device_mismatch():
    with pytest.raises(ValueError, match="x2"):
        ops.mixed_node(torch.zeros(2, 3), torch.zeros(2, 3, device="meta"), torch.zeros(6))


def test_row_align_hints():
    """The tiled kernels' ALIGN* values: a power of two (at most 16) dividing S and an
    S-contiguous operand's k, b and c strides; 1 for an operand broadcast over S."""
    import sys

    import fastmod.ops.mixed_node  # noqa: F401  (loads the Triton wrapper where Triton exists)
    impl = sys.modules.get("fastmod.ops._mixed_node_triton")
    if impl is None:
        pytest.skip("needs Triton")
    assert impl._row_align(196) == 4 and impl._row_align(256) == 16 and impl._row_align(7) == 1
    assert impl._row_align(196, [0, 384 * 196, 196, 1]) == 4
    assert impl._row_align(196, [0, 384, 1, 0]) == 1       # broadcast over S
    assert impl._row_align(256, [0, 24, 256, 1]) == 8      # a b stride of 24 limits it
    assert impl._row_align(12, [0, 12, 12, 1]) == 4


@pytest.mark.skipif(not any(b == "triton" for _, b in PAIRS), reason="no Triton backend here")
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("s1,s2", [((2, 8, 4, 4), (2, 8, 1, 1)), ((2, 8, 4, 3), (2, 8, 4, 3)),
                                   ((2, 8, 4, 2), (1, 8, 4, 2))])
def test_triton_aligned_rows(monkeypatch, s1, s2, normalize):
    """Shapes whose S is a multiple of 2, 4 or 16 take the tiled kernels' row-alignment
    hints (x // A * A of each hinted size must give it back unchanged)."""
    import sys

    impl = sys.modules["fastmod.ops._mixed_node_triton"]
    device = "cuda" if HAS_CUDA else "cpu"
    x1, x2, alpha = _inputs(s1, s2, None, torch.float64, device)
    g = torch.randn(ops.mixed_node_reference(x1, x2, alpha).shape, dtype=torch.float64, device=device)
    ref, rg = _run(ops.mixed_node_reference, x1, x2, alpha, g, normalize=normalize)
    monkeypatch.setitem(impl.CONFIG, "fwd_flat", False)  # the tiled kernels carry the hints
    monkeypatch.setitem(impl.CONFIG, "bwd_flat", False)
    out, og = _run(ops.mixed_node, x1, x2, alpha, g, normalize=normalize, backend="triton")
    _assert_close(out, ref, torch.float64)
    for a, b in zip(og, rg):
        _assert_close(a, b, torch.float64)


@pytest.mark.skipif(not any(b == "triton" for _, b in PAIRS), reason="no Triton backend here")
@pytest.mark.parametrize("s1,s2,K", [
    ((2, 3, 2, 3), (2, 3, 1, 1), None), ((2, 3, 2, 3), (2, 1, 2, 3), None), ((2, 3, 2, 3), (1, 3, 2, 3), None),
    ((2, 3, 2, 3), (3, 2, 3, 1, 1), 3), ((3, 2, 3, 2, 3), (2, 1, 2, 3), 3), ((2, 3, 2, 3), (1, 1, 1, 1), None),
    ((2, 3, 2, 3), (2, 3, 2, 3), None), ((3, 2, 3, 2, 3), (3, 2, 3, 2, 3), 3)])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("c_iters", [1, 2])
@pytest.mark.parametrize("layout", ["flat", "tiles", "tiles-atomic"])
def test_triton_tiny_tiles_exercise_atomics(monkeypatch, s1, s2, K, normalize, c_iters, layout):
    """Tiles far smaller than the problem: several C programs and S blocks per row,
    so every reduction path (in-register, across K, atomics) is taken; with
    c_iters = 2 a backward program also walks two C chunks (a ragged last one).
    Both kernels each way (flat blocks of C * S, and [C, S] tiles); "tiles-atomic"
    also sums a node-shared operand's gradient with atomics (k_inner off) and splits
    S under an operand broadcast over it (s_cap_reduced)."""
    import sys

    impl = sys.modules["fastmod.ops._mixed_node_triton"]
    monkeypatch.setitem(impl.CONFIG, "fwd_tile", 4)
    monkeypatch.setitem(impl.CONFIG, "bwd_tile", 4)
    monkeypatch.setitem(impl.CONFIG, "s_cap", 2)
    monkeypatch.setitem(impl.CONFIG, "bwd_c_iters", c_iters)
    flat = layout == "flat"
    monkeypatch.setitem(impl.CONFIG, "fwd_flat", flat)  # flat blocks of C * S, or [C, S] tiles
    monkeypatch.setitem(impl.CONFIG, "bwd_flat", flat)
    if layout == "tiles-atomic":
        monkeypatch.setitem(impl.CONFIG, "k_inner", False)
        monkeypatch.setitem(impl.CONFIG, "s_cap_reduced", 2)
    device = "cuda" if HAS_CUDA else "cpu"
    x1, x2, alpha = _inputs(s1, s2, K, torch.float64, device)
    g = torch.randn(ops.mixed_node_reference(x1, x2, alpha).shape, dtype=torch.float64, device=device)
    ref, rg = _run(ops.mixed_node_reference, x1, x2, alpha, g, normalize=normalize)
    out, og = _run(ops.mixed_node, x1, x2, alpha, g, normalize=normalize, backend="triton")
    _assert_close(out, ref, torch.float64)
    for a, b in zip(og, rg):
        _assert_close(a, b, torch.float64)
