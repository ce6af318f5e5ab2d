"""Gumbel-sigmoid straight-through gate: reference, C++ CPU and Triton backends."""
import math

import pytest
import torch

from conftest import kernel_devices_and_backends
from fastmod.ops import gumbel_sigmoid_gate, gumbel_sigmoid_gate_reference
from fastmod.ops import gumbel_gate as gg

PAIRS = kernel_devices_and_backends(gg.OP, gg.OP, gg._IMPLEMENTED)
BACKENDS = [b for _, b in PAIRS]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def _dev(backend):
    return next(d for d, b in PAIRS if b == backend)


def _logistic(u):
    u = u.double()
    return torch.log(u) - torch.log1p(-u)


def _call_with_noise(x, tau, hard, backend, seed_value=1234):
    """A public stochastic call and the uniforms it used (regenerated from the same generator state)."""
    g = torch.Generator(device=x.device).manual_seed(seed_value)
    out = gumbel_sigmoid_gate(x, tau, hard=hard, stochastic=True, generator=g, backend=backend)
    seed = gg._next_seed(backend, x.device, torch.Generator(device=x.device).manual_seed(seed_value))
    return out, gg._noise(x, seed, backend=backend)


def _boundary(x, u, tau):
    """Elements whose pre-activation is so close to 0 that a 1-ulp difference in t may flip the gate."""
    return (x.double() + _logistic(u)).abs() < 1e-4


def test_backends_present():
    assert "cpu" in BACKENDS, "fastmod._C with the gumbel gate ops must be built for the tests"


# --- the reference --------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.3, 1.0, 4.0])
def test_reference_is_appendix_b(tau):
    x = torch.randn(257, requires_grad=True)
    u = torch.rand(257)
    out = gumbel_sigmoid_gate_reference(x, tau, hard=True, noise=u)
    # Appendix B, literally
    x2 = x.detach().clone().requires_grad_()
    b_soft = torch.sigmoid((x2 + torch.log(u) - torch.log(1 - u)) / tau)
    paper = (b_soft > 0.5).float() - b_soft.detach() + b_soft
    torch.testing.assert_close(out, paper, atol=1e-6, rtol=0)
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    g = torch.randn(257)
    out.backward(g)
    paper.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)


def test_reference_deterministic_and_soft():
    x = torch.tensor([-3.0, -1e-30, 0.0, 1e-30, 2.0])
    assert gumbel_sigmoid_gate_reference(x, 1.0).tolist() == [0, 0, 0, 1, 1]
    torch.testing.assert_close(gumbel_sigmoid_gate_reference(x, 2.0, hard=False), torch.sigmoid(x / 2))


# --- kernels against the reference -----------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hard", [True, False])
def test_stochastic_matches_reference(backend, dtype, hard):
    dev = _dev(backend)
    shape = (6, 5, 67) if backend != "triton" else (3, 5, 67)  # ragged last block
    tau = 0.7
    x = (torch.randn(shape, device=dev) * 2).to(dtype).requires_grad_()
    out, u = _call_with_noise(x, tau, hard, backend)
    assert out.dtype == dtype and out.shape == x.shape
    xr = x.detach().float().requires_grad_()
    ref = gumbel_sigmoid_gate_reference(xr, tau, hard=hard, noise=u)
    keep = ~_boundary(xr.detach(), u, tau)
    torch.testing.assert_close(out.float()[keep], ref[keep], atol=TOL[dtype], rtol=0)
    if hard:
        assert set(out.float().unique().tolist()) <= {0.0, 1.0}
    g = torch.randn(shape, device=dev).to(dtype)
    out.backward(g)
    ref.backward(g.float())
    torch.testing.assert_close(x.grad.float()[keep], xr.grad[keep], atol=TOL[dtype], rtol=2e-2 if dtype != torch.float32 else 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hard", [True, False])
def test_deterministic_matches_reference(backend, hard):
    dev = _dev(backend)
    x = (torch.randn(4, 3, 50, device=dev) * 3).requires_grad_()
    out = gumbel_sigmoid_gate(x, 1.5, hard=hard, stochastic=False, backend=backend)
    xr = x.detach().clone().requires_grad_()
    ref = gumbel_sigmoid_gate_reference(xr, 1.5, hard=hard)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau", [0.25, 1.0, 3.0])
def test_straight_through_gradient_formula(backend, tau):
    """dP̃ = dP · B̃(1 − B̃)/τ with the call's own noise: τ scales the gradient as stated."""
    dev = _dev(backend)
    x = torch.randn(300, device=dev, requires_grad=True)
    out, u = _call_with_noise(x, tau, True, backend)
    g = torch.randn(300, device=dev)
    out.backward(g)
    s = torch.sigmoid((x.detach().double() + _logistic(u)) / tau)
    torch.testing.assert_close(x.grad.double(), g.double() * s * (1 - s) / tau, atol=1e-6, rtol=1e-5)


def test_cpu_and_triton_draw_the_same_noise():
    if not {"cpu", "triton"} <= set(BACKENDS):
        pytest.skip("needs both the C++ CPU op and Triton (interpreter)")
    x = torch.randn(5, 999)
    seed = torch.tensor([0x1234_5678_9ABC_DEF], dtype=torch.int64)
    dev = _dev("triton")  # the interpreter here, the GPU where there is one
    u_cpu = gg._noise(x, seed, backend="cpu")
    u_tri = gg._noise(x.to(dev), seed.to(dev), backend="triton").cpu()
    assert torch.equal(u_cpu, u_tri)
    for hard in (True, False):
        a = torch.ops.fastmod.gumbel_sigmoid_gate(x, seed, 0.5, hard)
        b = torch.ops.fastmod.gumbel_sigmoid_gate_triton(x.to(dev), seed.to(dev), 0.5, hard).cpu()
        torch.testing.assert_close(a, b, atol=2e-6, rtol=0)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton")
def test_triton_block_size_does_not_change_the_stream(monkeypatch):
    """Small inputs get smaller blocks (kernels/gumbel_gate.block_for); the noise,
    the gate and its gradient are the same for every block size."""
    from fastmod.kernels import gumbel_gate as gk
    assert gk.block_for(64 * 8 * 32) == gk.MIN_BLOCK and gk.block_for(1 << 24) == gk.BLOCK
    dev = _dev("triton")
    x = torch.randn(3, 999, device=dev)  # ragged last block at every size
    seed = torch.tensor([0x1234_5678_9ABC_DEF], dtype=torch.int64, device=dev)
    results = []
    for min_programs in (1, 10 ** 9):  # always BLOCK, always MIN_BLOCK
        monkeypatch.setattr(gk, "MIN_PROGRAMS", min_programs)
        xr = x.clone().requires_grad_(True)
        y = torch.ops.fastmod.gumbel_sigmoid_gate_triton(xr, seed, 0.5, True)
        y.backward(torch.ones_like(y))
        results.append((gg._noise(x, seed, backend="triton"), y.detach(), xr.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton")
@pytest.mark.parametrize("hard", [True, False])
def test_triton_host_seed_is_the_seed_tensor(hard):
    """An eager Triton call passes its seed as a host integer (one launch, no seed-drawing
    kernel); the kernels draw the same stream from it as from a seed tensor of that value."""
    dev = _dev("triton")
    assert isinstance(gg._next_seed("triton", torch.device(dev)), int)
    assert isinstance(gg._next_seed("cpu", torch.device("cpu")), torch.Tensor)
    key = gg._host_key(123, 8)
    x = torch.randn(3, 700, device=dev, requires_grad=True)
    seed = torch.tensor([key], dtype=torch.int64, device=dev)
    ops = torch.ops.fastmod
    a = ops.gumbel_sigmoid_gate_triton(x, None, 0.5, hard, key)
    b = ops.gumbel_sigmoid_gate_triton(x, seed, 0.5, hard)
    assert torch.equal(a, b)
    g = torch.randn_like(x)
    (ga,) = torch.autograd.grad(a, x, g)
    (gb,) = torch.autograd.grad(b, x, g)
    assert torch.equal(ga, gb)
    assert torch.equal(ops.gumbel_sigmoid_noise_triton(x.detach(), None, key),
                       ops.gumbel_sigmoid_noise_triton(x.detach(), seed))
    with pytest.raises(ValueError, match="seed"):
        ops.gumbel_sigmoid_noise_triton(x.detach(), None)


def test_host_key_is_an_int64_above_2_to_62():
    """Every host key has one Triton type (int64) and successive offsets give new keys."""
    keys = {gg._host_key(s, off) for s in (0, 1, 2 ** 63 - 1, 2 ** 64 - 1) for off in range(0, 400, 4)}
    assert len(keys) == 400
    assert all(2 ** 62 <= k < 2 ** 63 for k in keys)


@pytest.mark.skipif("triton" not in BACKENDS or _dev("triton") != "cuda", reason="needs Triton on a GPU")
def test_cuda_host_seed_advances_the_philox_offset():
    gen = torch.Generator(device="cuda").manual_seed(9)
    k1 = gg._next_seed("triton", torch.device("cuda"), gen)
    assert gen.get_offset() == 4
    k2 = gg._next_seed("triton", torch.device("cuda"), gen)
    assert k1 != k2 and gen.get_offset() == 8
    gen.manual_seed(9)
    assert gg._next_seed("triton", torch.device("cuda"), gen) == k1


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_range(backend):
    x = torch.empty(4096 if backend == "triton" else 1 << 16, device=_dev(backend))
    u = gg._noise(x, gg._draw_seed(x.device), backend=backend)
    assert u.dtype == torch.float32
    assert u.min() >= 2 ** -24 and u.max() <= 1 - 2 ** -24
    n = u.numel()
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)


# --- statistics ----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("tau", [0.1, 1.0, 5.0])
def test_bernoulli_property(backend, tau):
    """P(gate = 1) = sigmoid(P̃) for any τ: frequencies within a 5-sigma binomial bound."""
    dev = "cpu" if backend == "reference" else _dev(backend)
    n = 4096 if backend == "triton" else 40000
    logits = torch.tensor([-3.0, -1.0, -0.2, 0.0, 0.5, 2.0], device=dev)
    x = logits.repeat(n, 1)
    freq = gumbel_sigmoid_gate(x, tau, stochastic=True, backend=backend).double().mean(0)
    p = torch.sigmoid(logits.double())
    bound = 5 * torch.sqrt(p * (1 - p) / n)
    assert ((freq - p).abs() <= bound).all(), (freq, p, bound)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeding_and_fresh_noise(backend):
    dev = _dev(backend)
    x = torch.zeros(2000, device=dev)
    torch.manual_seed(11)
    a = gumbel_sigmoid_gate(x, stochastic=True, backend=backend)
    b = gumbel_sigmoid_gate(x, stochastic=True, backend=backend)
    torch.manual_seed(11)
    a2 = gumbel_sigmoid_gate(x, stochastic=True, backend=backend)
    assert torch.equal(a, a2)                      # manual_seed reproduces
    assert not torch.equal(a, b)                   # successive calls draw fresh noise
    g1 = torch.Generator(device=dev).manual_seed(5)
    g2 = torch.Generator(device=dev).manual_seed(5)
    assert torch.equal(gumbel_sigmoid_gate(x, generator=g1, stochastic=True, backend=backend),
                       gumbel_sigmoid_gate(x, generator=g2, stochastic=True, backend=backend))
    # bits of successive calls are independent: agreement rate ~ 1/2
    agree = (a == b).double().mean().item()
    assert abs(agree - 0.5) < 5 * math.sqrt(0.25 / x.numel())


@pytest.mark.parametrize("backend", BACKENDS)
def test_elements_uncorrelated(backend):
    dev = _dev(backend)
    n = 4096 if backend == "triton" else 1 << 16
    u = gg._noise(torch.empty(n, device=dev), gg._draw_seed(torch.device(dev)), backend=backend).double()
    bound = 5 / math.sqrt(n)
    for lag in (1, 2, 3, 4, 5, 256, 1024):  # inside a Philox block, across blocks and tiles
        c = torch.corrcoef(torch.stack([u[:-lag], u[lag:]]))[0, 1].item()
        assert abs(c) < bound, (lag, c)
    # the four Philox words of one counter are uncorrelated with each other
    w = u[: n // 4 * 4].view(-1, 4).T
    off_diag = torch.corrcoef(w)[~torch.eye(4, dtype=torch.bool)]
    assert off_diag.abs().max().item() < 5 / math.sqrt(n // 4)


# --- modes, extremes, dtypes, errors --------------------------------------------


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_eval_mode_is_deterministic(backend):
    dev = "cpu" if backend == "reference" else _dev(backend)
    x = torch.randn(3, 4, 33, device=dev)
    with torch.no_grad():  # stochastic=None -> deterministic when grad is off
        a = gumbel_sigmoid_gate(x, 0.5, backend=backend)
        b = gumbel_sigmoid_gate(x, 0.5, backend=backend)
    assert torch.equal(a, b) and torch.equal(a, (x > 0).float())
    with torch.enable_grad():  # ... and stochastic when it is on
        c = gumbel_sigmoid_gate(torch.zeros(4000, device=dev), backend=backend)
    assert 0 < c.mean() < 1


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stochastic", [True, False])
def test_extreme_logits(backend, dtype, stochastic):
    dev = "cpu" if backend == "reference" else _dev(backend)
    inf = float("inf")
    x = torch.tensor([inf, -inf, 1e4, -1e4, 60.0, -60.0], device=dev).to(dtype).requires_grad_()
    for hard in (True, False):
        out = gumbel_sigmoid_gate(x, 0.5, hard=hard, stochastic=stochastic, backend=backend)
        assert out.float().tolist() == [1, 0, 1, 0, 1, 0]
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert torch.isfinite(grad).all() and (grad.float().abs() < 1e-20).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_and_sizes(backend):
    dev = _dev(backend)
    x = torch.randn(40, 30, device=dev).T  # non-contiguous
    with torch.no_grad():
        assert torch.equal(gumbel_sigmoid_gate(x, backend=backend), (x > 0).float())
    empty = torch.empty(0, 3, device=dev, requires_grad=True)
    out = gumbel_sigmoid_gate(empty, stochastic=True, backend=backend)
    assert out.shape == (0, 3)
    out.sum().backward()


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the C++ CPU op")
def test_float64_gradcheck():
    seed = torch.tensor([99], dtype=torch.int64)
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    for s in (seed, None):
        assert torch.autograd.gradcheck(lambda t: torch.ops.fastmod.gumbel_sigmoid_gate(t, s, 0.7, False), (x,))
    ref = lambda t: gumbel_sigmoid_gate_reference(t, 0.7, hard=False, noise=torch.full_like(t, 0.3))  # noqa: E731
    assert torch.autograd.gradcheck(ref, (x,))


def test_bad_input():
    x = torch.randn(3)
    with pytest.raises(TypeError, match="logits"):
        gumbel_sigmoid_gate(torch.ones(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="logits"):
        gumbel_sigmoid_gate([1.0, 2.0])
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="tau"):
            gumbel_sigmoid_gate(x, bad)
        with pytest.raises(ValueError, match="tau"):
            gumbel_sigmoid_gate_reference(x, bad)
    with pytest.raises(TypeError, match="tau"):
        gumbel_sigmoid_gate(x, None)
    with pytest.raises(ValueError, match="generator"):
        gumbel_sigmoid_gate(torch.empty(3, device="meta"), generator=torch.Generator())
    with pytest.raises(TypeError, match="generator"):
        gumbel_sigmoid_gate(x, generator=3)
    with pytest.raises(TypeError, match="stochastic"):
        gumbel_sigmoid_gate(x, stochastic=1)
    with pytest.raises(TypeError, match="hard"):
        gumbel_sigmoid_gate(x, hard=None)
    with pytest.raises(ValueError, match="backend"):
        gumbel_sigmoid_gate(x, backend="nope")
    with pytest.raises(TypeError, match="noise"):
        gumbel_sigmoid_gate_reference(x, noise=torch.ones(3, dtype=torch.int64))


# --- torch.library / torch.compile ------------------------------------------------


def _opcheck_cases(backend):
    dev = _dev(backend)
    seed = torch.tensor([7], dtype=torch.int64, device=dev)
    suffix = "_triton" if backend == "triton" else ""
    gate = getattr(torch.ops.fastmod, "gumbel_sigmoid_gate" + suffix)
    bwd = getattr(torch.ops.fastmod, "gumbel_sigmoid_gate_backward" + suffix)
    noise = getattr(torch.ops.fastmod, "gumbel_sigmoid_noise" + suffix)
    x = torch.randn(3, 40, device=dev, requires_grad=True)
    cases = [(gate, (x, s, t, h)) for s in (seed, None) for t, h in ((0.5, True), (2.0, False))]
    cases.append((gate, (torch.randn(3, 40, device=dev, dtype=torch.float16, requires_grad=True), seed, 1.0, True)))
    cases.append((bwd, (torch.randn(3, 40, device=dev), torch.randn(3, 40, device=dev), seed, 0.5)))
    cases.append((bwd, (torch.randn(3, 40, device=dev), torch.randn(3, 40, device=dev), None, 0.5)))
    cases.append((noise, (torch.randn(3, 40, device=dev), seed)))
    if backend == "triton":  # eager calls' host-integer seed
        key = gg._host_key(7, 0)
        cases.append((gate, (x, None, 0.5, True, key)))
        cases.append((bwd, (torch.randn(3, 40, device=dev), torch.randn(3, 40, device=dev), None, 0.5, key)))
        cases.append((noise, (torch.randn(3, 40, device=dev), None, key)))
    if backend == "cpu":  # the CPU training-step pair behind the C++ autograd kernel
        for dtype, soft_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                  (torch.float64, torch.float64)):
            xs = torch.randn(3, 40, dtype=dtype)
            cases.append((torch.ops.fastmod.gumbel_sigmoid_gate_hard_train, (xs, seed, 0.5)))
            cases.append((torch.ops.fastmod.gumbel_sigmoid_gate_backward_soft,
                          (torch.randn(3, 40, dtype=dtype), torch.rand(3, 40, dtype=soft_dtype), 0.5)))
    return cases


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the C++ CPU op")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_cpu_training_step_saves_only_the_soft_gate(dtype):
    """The C++ autograd kernel keeps B~ (float32, float64 for float64) for the hard gate when
    a gradient is needed, and nothing is written besides the gate when none is."""
    x = torch.randn(4, 50, dtype=dtype, requires_grad=True)
    seed = torch.tensor([11], dtype=torch.int64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = torch.ops.fastmod.gumbel_sigmoid_gate(x, seed, 0.5, True)
    assert len(saved) == 1 and saved[0].shape == x.shape
    assert saved[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    gate, soft = torch.ops.fastmod.gumbel_sigmoid_gate_hard_train(x.detach(), seed, 0.5)
    assert torch.equal(out, gate) and torch.equal(saved[0], soft)
    u = torch.ops.fastmod.gumbel_sigmoid_noise(x.detach(), seed).double()
    expect = torch.sigmoid((x.detach().double() + torch.log(u / (1 - u))) / 0.5)
    torch.testing.assert_close(soft.double(), expect, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            torch.ops.fastmod.gumbel_sigmoid_gate(x, seed, 0.5, True)
        assert saved == []


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the C++ CPU op")
@pytest.mark.parametrize("hard", [True, False])
def test_cpu_sampled_op_draws_the_python_seed(hard):
    """Eager CPU calls draw their seed in C++ (gumbel_sigmoid_gate_sampled): the same seed
    as _draw_seed's torch.randint, and the generator left in the same state after."""
    x = torch.randn(5, 300, requires_grad=True)
    sampled, gate = torch.ops.fastmod.gumbel_sigmoid_gate_sampled, torch.ops.fastmod.gumbel_sigmoid_gate
    for make_gen in (lambda: None, lambda: torch.Generator().manual_seed(21)):
        torch.manual_seed(8)
        gen = make_gen()
        a = sampled(x, 0.7, hard, gen)
        after_a = torch.rand(4, generator=gen)
        torch.manual_seed(8)
        gen = make_gen()
        b = gate(x, gg._draw_seed(x.device, gen), 0.7, hard)
        assert torch.equal(a, b)
        assert torch.equal(after_a, torch.rand(4, generator=gen))
        g = torch.randn_like(x)
        assert torch.equal(*(torch.autograd.grad(y, x, g)[0] for y in (a, b)))
    # the public call takes this path, and _call_with_noise's regenerated noise matches it
    assert gg._HAS_SAMPLED
    out, u = _call_with_noise(x.detach(), 0.7, hard, "cpu")
    expect = gumbel_sigmoid_gate_reference(x.detach(), 0.7, hard=hard, noise=u)
    torch.testing.assert_close(out, expect, atol=2e-6, rtol=0)
    # eager only (the seed is written into a real tensor): schema and autograd checks
    torch.library.opcheck(sampled.default, (x, 0.5, hard, None),
                          test_utils=("test_schema", "test_autograd_registration"))
    with pytest.raises(RuntimeError, match="CPU tensor"):
        sampled(torch.randn(3, device="meta"), 0.5, hard, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    utils = None
    if backend == "triton" and _dev(backend) == "cpu":
        # Triton's interpreter runs kernels even on fake tensors: the fake/AOT checks need a GPU
        utils = ("test_schema", "test_autograd_registration")
    for op, args in _opcheck_cases(backend):
        if utils is None:
            torch.library.opcheck(op, args)
        else:
            torch.library.opcheck(op, args, test_utils=utils)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def f(x):
        return gumbel_sigmoid_gate(x, 0.5, stochastic=True) * 2.0

    cf = torch.compile(f, fullgraph=True)
    x = torch.zeros(3, 400, requires_grad=True)
    a, b = cf(x), cf(x)
    assert set(a.unique().tolist()) <= {0.0, 2.0}
    assert not torch.equal(a, b)  # the seed is drawn per call, not baked in
    torch.manual_seed(3)
    c = cf(x)
    torch.manual_seed(3)
    assert torch.equal(c, cf(x))
    c.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0

    cg = torch.compile(lambda t: gumbel_sigmoid_gate(t, 0.5, stochastic=False), fullgraph=True)
    y = torch.randn(5, 7)
    assert torch.equal(cg(y), (y > 0).float())
