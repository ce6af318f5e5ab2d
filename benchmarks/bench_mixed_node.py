"""Mixed node at LNMN's shapes: fastmod vs eager reference vs torch.compile(reference).

GPU: B=64, D=384 (LNMN's map_dim), 14x14.  CPU: D=64 (same B and map), to keep
the run short on 2 cores.  Second operand full-size or B x D x 1 x 1; K=8 nodes.
"""
import pytest
import torch

from _harness import IMPLS, compiled, fresh_leaves, rounds, run, saved_bytes
from conftest import DEVICE
from fastmod import ops

D = 384 if DEVICE == "cuda" else 64
CASES = {
    "full": ((64, D, 14, 14), (64, D, 14, 14), None),
    "textual": ((64, D, 14, 14), (64, D, 1, 1), None),
    "k8": ((64, D, 14, 14), (8, 64, D, 1, 1), 8),
}


def _reference(x1, x2, alpha):
    return ops.mixed_node_reference(x1, x2, alpha)


def _fn(impl):
    if impl == "fastmod":
        return ops.mixed_node
    if impl == "eager":
        return _reference
    return compiled(_reference)


def _inputs(case):
    s1, s2, K = CASES[case]
    x1 = torch.randn(s1, device=DEVICE, requires_grad=True)
    x2 = torch.randn(s2, device=DEVICE, requires_grad=True)
    alpha = torch.randn(6 if K is None else (K, 6), device=DEVICE, requires_grad=True)
    return x1, x2, alpha


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_mixed_node(benchmark, impl, case, pass_):
    x1, x2, alpha = _inputs(case)
    fn = _fn(impl)
    out = fn(x1, x2, alpha)
    grad = torch.randn_like(out)
    io = x1.nbytes + x2.nbytes + out.nbytes  # forward: read both inputs, write the output
    if pass_ == "fwd":
        def step():
            with torch.no_grad():
                fn(x1, x2, alpha)
        nbytes = io
    else:
        def step():
            leaves = fresh_leaves(x1, x2, alpha)
            torch.autograd.grad(fn(*leaves), leaves, grad)
        nbytes = io + grad.nbytes + x1.nbytes + x2.nbytes + x1.nbytes + x2.nbytes  # + read g,x1,x2; write dx1,dx2
    saved = saved_bytes(lambda: fn(x1, x2, alpha))
    run(benchmark, step, group=f"mixed_node {pass_} {case} {tuple(out.shape)}", impl=impl, nbytes=nbytes,
        n_rounds=rounds(cpu=30, gpu=100), warmup=5, saved_for_backward_mb=round(saved / 2**20, 2))
