"""The C++ CPU kernels fastmod::mixed_node_fwd / mixed_node_bwd, called directly
on canonical 4-D inputs [K|1, B|1, C|1, S|1] and compared with a float64
autograd implementation of their contract written out below.  (The public op,
its autograd/fake registration and opcheck are tested in test_mixed_node.py.)"""
import pytest
import torch
import torch.nn.functional as F

import fastmod  # noqa: F401

pytestmark = pytest.mark.skipif(not fastmod._extension.has_op("mixed_node_fwd"),
                                reason="fastmod._C has no mixed_node_fwd")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (rtol, atol relative to the largest expected magnitude)
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5),
       torch.float16: (1e-2, 4e-3), torch.bfloat16: (4e-2, 2e-2)}
K, B, C, S = 3, 2, 5, 7
# x2 shapes against a full x1 [K,B,C,S]: LNMN's textual parameter, attention
# map, an operand shared by all K nodes, a scalar, and x1 broadcast instead.
PATTERNS = {
    "full": ((K, B, C, S), (K, B, C, S)),
    "x2_KBC1": ((K, B, C, S), (K, B, C, 1)),
    "x2_KB1S": ((K, B, C, S), (K, B, 1, S)),
    "x2_1BCS": ((K, B, C, S), (1, B, C, S)),
    "x2_1BC1": ((K, B, C, S), (1, B, C, 1)),
    "x2_1111": ((K, B, C, S), (1, 1, 1, 1)),
    "x1_1BCS_x2_K1C1": ((1, B, C, S), (K, 1, C, 1)),
    "x1_K11S_x2_1BC1": ((K, 1, 1, S), (1, B, C, 1)),
}


def fwd(x1, x2, w, normalize):
    return torch.ops.fastmod.mixed_node_fwd(x1, x2, w, normalize)


def bwd(grad, x1, x2, w, normalize, need1=True, need2=True):
    return torch.ops.fastmod.mixed_node_bwd(grad, x1, x2, w, normalize, need1, need2)


def _ops(a, b):
    return [torch.minimum(a, b), torch.maximum(a, b), a + b, a * b, a, b]


def reference(x1, x2, w, normalize, grad):
    """(out, dx1, dx2, dw) in float64: zero-weight terms are left out of u, so
    0 * inf never appears; dw[k, i] = sum(du * op_i) for every i."""
    a = x1.detach().double().requires_grad_()
    b = x2.detach().double().requires_grad_()
    wd = w.double()
    full = torch.broadcast_shapes(x1.shape, x2.shape, (w.shape[0], 1, 1, 1))
    us = []
    for k in range(full[0]):
        ak, bk = a[k if a.shape[0] > 1 else 0], b[k if b.shape[0] > 1 else 0]
        terms = [wd[k, i] * op for i, op in enumerate(_ops(ak, bk)) if wd[k, i] != 0]
        u_k = sum(terms) if terms else torch.zeros((), dtype=torch.float64)
        us.append(u_k.expand(full[1:]))
    u = torch.stack(us)
    if u.requires_grad:
        u.retain_grad()
    else:
        u.requires_grad_()
    out = F.normalize(u, p=2, dim=2, eps=1e-12) if normalize else u
    out.backward(grad.double())
    du = u.grad
    af, bf = torch.broadcast_tensors(a.detach(), b.detach(), du)[:2]
    dw = torch.stack([(du * op).sum((1, 2, 3)) for op in _ops(af, bf)], dim=1)
    zeros = torch.zeros_like
    dx1 = a.grad if a.grad is not None else zeros(a)
    dx2 = b.grad if b.grad is not None else zeros(b)
    return out.detach(), dx1, dx2, dw


def assert_close(actual, expected, dtype, *, dw=False, equal_nan=False):
    rtol, atol = TOL[dtype]
    if dw:  # dw is accumulated in fp32/fp64 from the rounded inputs
        rtol, atol = (1e-10, 1e-10) if dtype == torch.float64 else (1e-4, 1e-5)
    finite = expected[expected.isfinite()]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol * scale,
                               equal_nan=equal_nan)


def weights(k, dtype, zero=()):
    w = torch.softmax(torch.randn(k, 6, dtype=torch.float64), dim=1)
    for idx in zero:
        w[idx] = 0
    return w.to(torch.float64 if dtype == torch.float64 else torch.float32)


def check(x1, x2, w, normalize, *, grad=None, equal_nan=False):
    dtype = x1.dtype
    full = torch.broadcast_shapes(x1.shape, x2.shape, (w.shape[0], 1, 1, 1))
    if grad is None:
        grad = torch.randn(full, dtype=torch.float64).to(dtype)
    out = fwd(x1, x2, w, normalize)
    dx1, dx2, dw = bwd(grad, x1, x2, w, normalize)
    r_out, r_dx1, r_dx2, r_dw = reference(x1, x2, w, normalize, grad)
    assert out.dtype == dtype and out.shape == full and out.is_contiguous()
    assert dx1.dtype == dtype and dx1.shape == x1.shape and dx1.is_contiguous()
    assert dx2.dtype == dtype and dx2.shape == x2.shape and dx2.is_contiguous()
    assert dw.dtype == w.dtype and dw.shape == w.shape
    assert_close(out, r_out, dtype, equal_nan=equal_nan)
    assert_close(dx1, r_dx1, dtype, equal_nan=equal_nan)
    assert_close(dx2, r_dx2, dtype, equal_nan=equal_nan)
    assert_close(dw, r_dw, dtype, dw=True, equal_nan=equal_nan)
    return out, dx1, dx2, dw


def rand(shape, dtype):
    return torch.randn(shape, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_broadcast_patterns(pattern, dtype, normalize):
    s1, s2 = PATTERNS[pattern]
    check(rand(s1, dtype), rand(s2, dtype), weights(K, dtype), normalize)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_noncontiguous_and_stride0(dtype, normalize):
    # channels-last-like x1 (s-stride C), a strided slice, an expanded x2 with
    # stride 0 over a dim of size > 1 (not broadcast: dx2 keeps that size), and
    # a non-contiguous grad.
    x1 = rand((K, B, S, C), dtype).transpose(2, 3)
    x2 = rand((K, B, 2 * C, 1), dtype)[:, :, ::2].expand(K, B, C, S)
    grad = rand((K, B, S, C), dtype).transpose(2, 3)
    out, dx1, dx2, _ = check(x1, x2, weights(K, dtype), normalize, grad=grad)
    assert dx2.shape == (K, B, C, S)
    x1s = rand((K, B, C, 2 * S), dtype)[..., 1::2]
    x2s = rand((1, 1, 1, 1), dtype).expand(K, B, C, S)
    check(x1s, x2s, weights(K, dtype), normalize, grad=rand((1, 1, 1, 1), dtype).expand(K, B, C, S))


@pytest.mark.parametrize("shape2", [(1, 2, 3, 1), (1, 2, 3, 2500), (1, 1, 1, 2500)])
def test_long_s(shape2):
    # S longer than one kernel block, split across tasks or walked in sub-blocks.
    x1 = rand((1, 2, 3, 2500), torch.float32)
    check(x1, rand(shape2, torch.float32), weights(1, torch.float32), True)
    check(x1, rand(shape2, torch.float32), weights(1, torch.float32), False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_ties_split_gradient(dtype):
    x1 = rand((K, B, C, S), dtype)
    x2 = torch.where(torch.rand(K, B, C, S) < 0.5, x1, rand((K, B, C, S), dtype))
    for normalize in (False, True):
        check(x1, x2, weights(K, dtype), normalize)
    # only min/max on: at a tie each input gets exactly half
    w = torch.zeros(1, 6)
    w[0, 0] = 1.0
    x = torch.ones(1, 1, 1, 4)
    dx1, dx2, _ = bwd(torch.ones(1, 1, 1, 4), x, x.clone(), w, False)
    assert torch.equal(dx1, torch.full_like(x, 0.5)) and torch.equal(dx2, torch.full_like(x, 0.5))


@pytest.mark.parametrize("normalize", [False, True])
def test_nan_propagates_like_minimum_maximum(normalize):
    x1 = rand((K, B, C, S), torch.float32)
    x2 = rand((K, B, C, S), torch.float32)
    x1[0, 0, 1, 2] = float("nan")
    x2[1, 1, 3, 4] = float("nan")
    x2[2, 0, 0, 0] = x1[2, 0, 0, 0] = float("nan")
    out, *_ = check(x1, x2, weights(K, torch.float32), normalize, equal_nan=True)
    assert out[0, 0, 1, 2].isnan() and out[1, 1, 3, 4].isnan()


@pytest.mark.parametrize("normalize", [False, True])
def test_zero_weights_skip_inf(normalize):
    # x2 = +-inf: only min (+inf) / max (-inf) and choose1 are weighted, so
    # out and every dx stay finite; dw of the unweighted ops sees the infs.
    x1 = rand((2, B, C, S), torch.float32)
    x2 = torch.full((2, B, C, S), float("inf"))
    x2[1] = -float("inf")
    w = torch.tensor([[0.5, 0, 0, 0, 0.5, 0], [0, 0.3, 0, 0, 0.7, 0]])
    out, dx1, dx2, dw = check(x1, x2, w, normalize, equal_nan=True)
    assert out.isfinite().all() and dx1.isfinite().all() and dx2.isfinite().all()
    assert torch.equal(dx2, torch.zeros_like(dx2))
    assert not dw[:, 2:4].isfinite().any()


def test_zero_norm_column():
    # u == 0 over all of C: F.normalize clamps the norm to eps, du = grad / eps.
    x1 = rand((1, 2, 3, 4), torch.float64)
    x1[:, :, :, 1] = 0
    x2 = x1.clone()
    check(x1, x2, weights(1, torch.float64), True)


@pytest.mark.parametrize("normalize", [False, True])
def test_need_dx_flags(normalize):
    x1, x2 = rand((K, B, C, S), torch.float32), rand((1, B, C, 1), torch.float32)
    w, grad = weights(K, torch.float32), rand((K, B, C, S), torch.float32)
    full = bwd(grad, x1, x2, w, normalize)
    for need1, need2 in [(True, False), (False, True), (False, False)]:
        dx1, dx2, dw = bwd(grad, x1, x2, w, normalize, need1, need2)
        assert (dx1.numel() == 0) != need1 and (dx2.numel() == 0) != need2
        if need1:
            torch.testing.assert_close(dx1, full[0])
        if need2:
            torch.testing.assert_close(dx2, full[1])
        torch.testing.assert_close(dw, full[2])


@pytest.mark.parametrize("s1,s2", [((K, 0, C, S), (1, 1, C, 1)), ((K, 0, C, S), (K, 1, C, S)),
                                   ((0, B, C, S), (1, B, C, S))])
def test_empty(s1, s2):
    x1, x2 = rand(s1, torch.float32), rand(s2, torch.float32)
    w = weights(max(s1[0], s2[0]) if 0 not in (s1[0], s2[0]) else 0, torch.float32)
    full = torch.broadcast_shapes(s1, s2, (w.shape[0], 1, 1, 1))
    assert fwd(x1, x2, w, True).shape == full
    dx1, dx2, dw = bwd(torch.zeros(full), x1, x2, w, True)
    assert dx1.shape == s1 and dx2.shape == s2 and dw.shape == w.shape
    assert not dx1.any() and not dx2.any() and not dw.any()


def test_more_nodes_than_inputs():
    # x1, x2 with K = 1 and w with K = 3: every node sees the same inputs.
    x1, x2 = rand((1, B, C, S), torch.float32), rand((1, B, C, 1), torch.float32)
    check(x1, x2, weights(3, torch.float32), True)


def test_single_thread_matches():
    x1, x2 = rand((K, B, C, S), torch.float32), rand((1, 1, 1, 1), torch.float32)
    w, grad = weights(K, torch.float32), rand((K, B, C, S), torch.float32)
    many = bwd(grad, x1, x2, w, True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = bwd(grad, x1, x2, w, True)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(many, one):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("call", [
    lambda: fwd(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.rand(1, 6), False),
    lambda: fwd(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4).double(), torch.rand(1, 6), False),
    lambda: fwd(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.rand(1, 5), False),
    lambda: fwd(torch.randn(2, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.rand(3, 6), False),
    lambda: fwd(torch.randn(1, 2, 3, 4), torch.randn(1, 3, 3, 4), torch.rand(1, 6), False),
    lambda: fwd(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.rand(1, 6).double(), False),
    lambda: fwd(torch.ones(1, 2, 3, 4, dtype=torch.int32), torch.ones(1, 2, 3, 4, dtype=torch.int32),
                torch.rand(1, 6), False),
    lambda: bwd(torch.randn(1, 2, 3, 5), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4),
                torch.rand(1, 6), False),
    lambda: bwd(torch.randn(1, 2, 3, 4).double(), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4),
                torch.rand(1, 6), False),
])
def test_bad_input_raises(call):
    with pytest.raises(RuntimeError):
        call()


def test_baseline_isa_kernels_match(tmp_path):
    # The kernels are also built for the baseline ISA (picked on CPUs without
    # AVX2, or with FASTMOD_CPU_BASELINE=1): run them in a subprocess.
    import os
    import subprocess
    import sys

    x1, x2 = rand((K, B, C, S), torch.float32), rand((1, B, C, 1), torch.float32)
    w, grad = weights(K, torch.float32), rand((K, B, C, S), torch.float32)
    torch.save((x1, x2, w, grad), tmp_path / "inputs.pt")
    script = (
        "import sys, torch, fastmod\n"
        "assert fastmod._extension.has_op('mixed_node_fwd')\n"
        "x1, x2, w, grad = torch.load(sys.argv[1])\n"
        "out = [torch.ops.fastmod.mixed_node_fwd(x1, x2, w, n) for n in (False, True)]\n"
        "out += [t for n in (False, True) for t in torch.ops.fastmod.mixed_node_bwd(grad, x1, x2, w, n, True, True)]\n"
        "torch.save(out, sys.argv[2])\n")
    env = dict(os.environ, FASTMOD_CPU_BASELINE="1")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                   env=env, check=True, timeout=120)
    baseline = torch.load(tmp_path / "out.pt")
    here = [fwd(x1, x2, w, n) for n in (False, True)]
    here += [t for n in (False, True) for t in bwd(grad, x1, x2, w, n)]
    for a, b in zip(here, baseline):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
