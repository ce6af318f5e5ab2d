"""Routed convolution vs the dense vendor conv followed by masking (issue 4).

Shapes: BRN (ResNeXt bottleneck, 224x224 input: stage widths 64/128/256/256 at
56/28/14/7 pixels, cardinality 8/16/32; the block's out_ch is taken as 2 x width)
and FRN (ResNet-34 basic block: the filter-gated second 3x3 conv, G = Cout, at
64/128/256/512 channels).  Gate densities rho in {1.0, 0.57, 0.3, 0.1}: every
sample switches on round(rho * G) random blocks (at least one).

Each case is run for impl in {"routed" (fastmod kernel backend), "dense" (eager
routed_conv2d_reference: vendor conv + mask), "compiled" (torch.compile of it)};
"dense"/"compiled" do not depend on rho and run once per shape (rho=1.0).
pass_ = "fwd" (inference, no grad), "train" (fwd+bwd, router_grad="active") or
"train-exact" (routed only, router_grad="exact": also runs the off blocks' forward).

FASTMOD_BENCH_IMPLS (default routed,dense,compiled) picks the implementations.
GPU: N=64 and every shape.  CPU: N=8 and a subset (FASTMOD_BENCH_FULL=1/0 selects
all shapes / the subset on either device, FASTMOD_BENCH_N changes N).
"""
import os

import pytest
import torch

from conftest import DEVICE, sync
from fastmod.nn import RoutedBottleneck
from fastmod.ops import routed_conv2d, routed_conv2d_reference

FULL = os.environ.get("FASTMOD_BENCH_FULL", "1" if DEVICE == "cuda" else "0") == "1"
N = int(os.environ.get("FASTMOD_BENCH_N", 64 if DEVICE == "cuda" else 8))
DENSITIES = (1.0, 0.57, 0.3, 0.1)
# FASTMOD_BENCH_IMPLS=routed,dense skips the torch.compile baseline (slow to compile per shape).
IMPLS = tuple(os.environ.get("FASTMOD_BENCH_IMPLS", "routed,dense,compiled").split(","))
STAGES = ((64, 56), (128, 28), (256, 14), (256, 7))


def _cases():
    """(name, cin, cout, k, groups, gate_on, G, hw)."""
    cases = []
    for width, hw in STAGES:
        for c in (8, 16, 32):
            cases.append((f"brn3x3-w{width}-hw{hw}-c{c}", width, width, 3, c, "group", c, hw))
            cases.append((f"brn1x1out-w{width}-hw{hw}-c{c}", 2 * width, width, 1, 1, "out", c, hw))
            cases.append((f"brn1x1in-w{width}-hw{hw}-c{c}", width, 2 * width, 1, 1, "in", c, hw))
    for planes, hw in ((64, 56), (128, 28), (256, 14), (512, 7)):
        cases.append((f"frn3x3-{planes}", planes, planes, 3, 1, "out", planes, hw))
    if FULL:
        return cases
    keep = {"brn3x3-w64-hw56-c8", "brn3x3-w128-hw28-c16", "brn3x3-w256-hw14-c32", "brn1x1out-w128-hw28-c16",
            "brn1x1in-w128-hw28-c16", "frn3x3-64", "frn3x3-128", "frn3x3-256", "frn3x3-512"}
    return [c for c in cases if c[0] in keep]


def _gates(n, g, rho, device):
    k = max(1, round(rho * g))
    order = torch.rand(n, g, device=device).argsort(dim=1)
    return (order < k).float()


def _runs(impl, rho):
    return impl == "routed" or rho == 1.0


def _time(benchmark, fn, extra):
    # One group per shape and pass; impl labels carry the density so
    # benchmarks/summarize.py can put routed@rho beside dense.
    rho = extra.pop("rho")
    benchmark.group = extra.pop("group")
    extra["impl"] = "dense" if extra["impl"] == "dense" else \
        ("compiled" if extra["impl"] == "compiled" else f"{extra['impl']}@{rho}")
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    fn()  # warm-up (and compilation)
    sync()

    def step():
        fn()
        sync()
    benchmark.pedantic(step, rounds=10 if DEVICE == "cpu" else 20, iterations=1, warmup_rounds=1)
    if DEVICE == "cuda":
        extra["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    benchmark.extra_info.update(extra)


_COMPILED = {}


def _reference_fn(impl):
    if impl == "dense":
        return routed_conv2d_reference
    if "ref" not in _COMPILED:
        _COMPILED["ref"] = torch.compile(routed_conv2d_reference)
    return _COMPILED["ref"]


@pytest.mark.parametrize("pass_", ["fwd", "train", "train-exact"])
@pytest.mark.parametrize("rho", DENSITIES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_routed_conv(benchmark, case, impl, rho, pass_):
    if not _runs(impl, rho):
        pytest.skip("dense/compiled do not depend on rho: measured at rho=1.0")
    if pass_ == "train-exact" and (impl != "routed" or rho == 1.0):
        pytest.skip('router_grad="exact" differs from "active" only for the routed kernels with off gates')
    name, cin, cout, k, groups, gate_on, G, hw = case
    dev = DEVICE
    x = torch.randn(N, cin, hw, hw, device=dev)
    w = torch.randn(cout, cin // groups, k, k, device=dev) / (cin // groups * k * k) ** 0.5
    gates = _gates(N, G, rho, dev)
    # "train-exact" is timed beside "train" (same group, labelled routed-exact@rho):
    # the cost of the off blocks' forward that the exact gate gradient needs.
    router_grad = "exact" if pass_ == "train-exact" else "active"
    kw = dict(padding=k // 2, groups=groups, gate_on=gate_on, router_grad=router_grad)
    # The kernel backend explicitly: "auto" keeps the dense path on GPUs (see routed_conv._select).
    kernel = "cuda" if DEVICE == "cuda" else None
    fn = (lambda *a: routed_conv2d(*a, backend=kernel, **kw)) if impl == "routed" else \
        (lambda *a, f=_reference_fn(impl): f(*a, **kw))
    flops = 2 * N * cout * (cin // groups) * k * k * hw * hw * (1 if impl != "routed" else gates.mean().item())
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                fn(x, w, gates)
    else:
        xr, wr, gr = (t.clone().requires_grad_(True) for t in (x, w, gates))
        dy = torch.randn(N, cout, hw, hw, device=dev)

        def run():
            fn(xr, wr, gr).backward(dy)
        flops *= 3
    label = "routed-exact" if pass_ == "train-exact" else impl
    group = f"routed_conv {name} hw{hw} {pass_.replace('-exact', '')}"
    _time(benchmark, run, {"density": gates.mean().item(), "N": N, "gflop": flops / 1e9, "rho": rho,
                           "impl": label, "group": group})


@pytest.mark.parametrize("pass_", ["fwd", "train"])
@pytest.mark.parametrize("rho", DENSITIES)
@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "compiled"])
@pytest.mark.parametrize("stage", STAGES[1:2] if not FULL else STAGES, ids=lambda s: f"w{s[0]}-hw{s[1]}")
def test_routed_bottleneck(benchmark, stage, impl, rho, pass_):
    if not _runs(impl, rho):
        pytest.skip("dense does not depend on rho: measured at rho=1.0")
    width, hw = stage
    c = 32
    block = RoutedBottleneck(2 * width, width, 2 * width, c, router_grad="active").to(DEVICE)
    block.use_kernels = impl == "routed"
    x = torch.randn(N, 2 * width, hw, hw, device=DEVICE)
    gates = _gates(N, c, rho, DEVICE)
    if pass_ == "fwd":
        block.eval()

        def run():
            with torch.no_grad():
                block(x, gates)
    else:
        xr, gr = x.clone().requires_grad_(True), gates.clone().requires_grad_(True)
        # A dense upstream gradient, as a block inside a network gets (sum().backward()
        # would hand it a broadcast scalar).
        dy = torch.randn(N, 2 * width, hw, hw, device=DEVICE)

        def run():
            block(xr, gr).backward(dy)
    _time(benchmark, run, {"density": gates.mean().item(), "N": N, "rho": rho, "impl": impl,
                           "group": f"RoutedBottleneck w{width} hw{hw} {pass_}"})
