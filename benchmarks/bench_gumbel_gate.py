"""Gumbel-sigmoid straight-through gate: fastmod vs eager reference vs torch.compile(reference).

Shapes: [64, 8, 32] (BRN, c = 32), [64, 16, 512] (FRN-like filter routing) and 16M
elements; forward and forward + backward of the stochastic hard gate (τ = 0.5).
The reference draws its noise with torch.rand, as a plain-PyTorch gate would.
"""
import pytest
import torch

from _harness import IMPLS, compiled, fresh_leaves, rounds, run, saved_bytes
from conftest import DEVICE
from fastmod.ops import gumbel_sigmoid_gate, gumbel_sigmoid_gate_reference

SHAPES = {"64x8x32": (64, 8, 32), "64x16x512": (64, 16, 512), "16M": (16 * 1024 * 1024,)}
TAU = 0.5


def _reference(x):
    return gumbel_sigmoid_gate_reference(x, TAU, hard=True, noise=torch.rand(x.shape, device=x.device))


def _fastmod(x):
    return gumbel_sigmoid_gate(x, TAU, hard=True, stochastic=True)


def _fn(impl):
    if impl == "fastmod":
        return _fastmod
    if impl == "eager":
        return _reference
    return compiled(_reference)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_gumbel_gate(benchmark, impl, shape, pass_):
    x = torch.randn(SHAPES[shape], device=DEVICE, requires_grad=True)
    fn = _fn(impl)
    grad = torch.randn_like(x)
    if pass_ == "fwd":
        def step():
            with torch.enable_grad():  # the training-time forward (autograd graph recorded)
                fn(x)
        nbytes = 2 * x.nbytes  # read logits, write gates
    else:
        def step():
            leaf, = fresh_leaves(x)
            torch.autograd.grad(fn(leaf), (leaf,), grad)
        nbytes = 5 * x.nbytes  # + read grad and logits, write grad_in
    big = x.numel() >= 1 << 22
    saved = saved_bytes(lambda: fn(x))
    run(benchmark, step, group=f"gumbel_gate {pass_} {shape}", impl=impl, nbytes=nbytes,
        n_rounds=rounds(cpu=3 if big else 50, gpu=100), warmup=1 if big and DEVICE == "cpu" else 2,
        saved_for_backward_mb=round(saved / 2**20, 3))
