"""Shapes and runners of the routed-convolution benchmarks, shared by the pytest
suite (bench_routed_conv.py) and the interleaved ratio script
(interleaved_routed_conv.py), so both time exactly the same work."""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

from fastmod.nn import RoutedBottleneck
from fastmod.ops import routed_conv2d, routed_conv2d_reference

DENSITIES = (1.0, 0.57, 0.3, 0.1)
STAGES = ((64, 56), (128, 28), (256, 14), (256, 7))
# The CPU subset (FASTMOD_BENCH_FULL=0).
SUBSET = {"brn3x3-w64-hw56-c8", "brn3x3-w128-hw28-c16", "brn3x3-w256-hw14-c32", "brn1x1out-w128-hw28-c16",
          "brn1x1in-w128-hw28-c16", "frn3x3-64", "frn3x3-128", "frn3x3-256", "frn3x3-512",
          "brn3x3s2-w128-hw56-c32"}


class ConvCase(NamedTuple):
    """One routed conv: ``hw`` is the input's height and width (the output's at stride 1)."""
    name: str
    cin: int
    cout: int
    k: int
    groups: int
    gate_on: str
    G: int
    hw: int
    stride: int = 1


def conv_cases(full: bool) -> list[ConvCase]:
    cases = []
    for width, hw in STAGES:
        for c in (8, 16, 32):
            cases.append(ConvCase(f"brn3x3-w{width}-hw{hw}-c{c}", width, width, 3, c, "group", c, hw))
            cases.append(ConvCase(f"brn1x1out-w{width}-hw{hw}-c{c}", 2 * width, width, 1, 1, "out", c, hw))
            cases.append(ConvCase(f"brn1x1in-w{width}-hw{hw}-c{c}", width, 2 * width, 1, 1, "in", c, hw))
    # The stride-2 grouped 3x3 that opens stages 2-4 (its input at the previous stage's size).
    for (width, _), (_, hw) in zip(STAGES[1:], STAGES[:-1]):
        cases.append(ConvCase(f"brn3x3s2-w{width}-hw{hw}-c32", width, width, 3, 32, "group", 32, hw, 2))
    for planes, hw in ((64, 56), (128, 28), (256, 14), (512, 7)):
        cases.append(ConvCase(f"frn3x3-{planes}", planes, planes, 3, 1, "out", planes, hw))
    return cases if full else [c for c in cases if c.name in SUBSET]


def gates(n: int, g: int, rho: float, device) -> torch.Tensor:
    """Every sample switches on round(rho * g) random blocks (at least one)."""
    k = max(1, round(rho * g))
    order = torch.rand(n, g, device=device).argsort(dim=1)
    return (order < k).float()


def conv_runner(case, impl: str, rho: float, pass_: str, n: int, device, reference=routed_conv2d_reference,
                backend: str | None = None, dtype: torch.dtype = torch.float32):
    """(run, gflop, density): run() does one pass of the case.  impl "routed" runs the
    fastmod kernel backend (``backend``, default "cuda" on GPUs and automatic on the
    CPU), anything else ``reference`` (the dense conv + mask).
    pass_: "fwd" (no grad), "train" (fwd + bwd, router_grad="active") or
    "train-exact" (router_grad="exact").  Every tensor in ``dtype``."""
    _name, cin, cout, k, groups, gate_on, G, hw, stride = case
    ho = -(-hw // stride)  # "same" padding
    x = torch.randn(n, cin, hw, hw, device=device, dtype=dtype)
    w = (torch.randn(cout, cin // groups, k, k, device=device) / (cin // groups * k * k) ** 0.5).to(dtype)
    g = gates(n, G, rho, device).to(dtype)
    router_grad = "exact" if pass_ == "train-exact" else "active"
    kw = dict(stride=stride, padding=k // 2, groups=groups, gate_on=gate_on, router_grad=router_grad)
    # On a GPU a kernel backend explicitly ("auto" keeps the dense path for most
    # cases there): FASTMOD_ROUTED_CONV_GPU's choice, else "cuda".
    kernel = backend or (os.environ.get("FASTMOD_ROUTED_CONV_GPU", "cuda") if torch.device(device).type == "cuda"
                         else None)
    fn = (lambda *a: routed_conv2d(*a, backend=kernel, **kw)) if impl == "routed" else \
        (lambda *a: reference(*a, **kw))
    flops = 2 * n * cout * (cin // groups) * k * k * ho * ho * (g.mean().item() if impl == "routed" else 1)
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                fn(x, w, g)
        return run, flops / 1e9, g.mean().item()
    xr, wr, gr = (t.clone().requires_grad_(True) for t in (x, w, g))
    dy = torch.randn(n, cout, ho, ho, device=device, dtype=dtype)

    def run():
        # A training step starts with no gradients (optimizer.zero_grad(), set_to_none
        # by default), so backward hands over the new ones instead of adding them
        # into last step's.
        xr.grad = wr.grad = gr.grad = None
        fn(xr, wr, gr).backward(dy)
    return run, 3 * flops / 1e9, g.mean().item()


def bottleneck_runner(stage, impl: str, rho: float, pass_: str, n: int, device, cardinality: int = 32):
    """(run, density) for a whole RoutedBottleneck(2w, w, 2w, c) block; impl "routed"
    = kernel path, else the reference path; pass_ "fwd" (eval, no grad) or "train"."""
    width, hw = stage
    block = RoutedBottleneck(2 * width, width, 2 * width, cardinality, router_grad="active").to(device)
    block.use_kernels = impl == "routed"
    x = torch.randn(n, 2 * width, hw, hw, device=device)
    g = gates(n, cardinality, rho, device)
    if pass_ == "fwd":
        block.eval()

        def run():
            with torch.no_grad():
                block(x, g)
        return run, g.mean().item()
    xr, gr = x.clone().requires_grad_(True), g.clone().requires_grad_(True)
    # A dense upstream gradient, as a block inside a network gets (sum().backward()
    # would hand it a broadcast scalar).
    dy = torch.randn(n, 2 * width, hw, hw, device=device)

    def run():
        block.zero_grad(set_to_none=True)  # a fresh training step (see conv_runner)
        xr.grad = gr.grad = None
        block(xr, gr).backward(dy)
    return run, g.mean().item()


def target(rho: float, pass_: str) -> float:
    """Issue 4's bound on routed / dense: rho + 0.10 (inference), rho + 0.15 (training),
    1.10 at rho = 1."""
    if rho == 1.0:
        return 1.10
    return rho + (0.10 if pass_ == "fwd" else 0.15)
