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

from _routed_cases import DENSITIES, STAGES, bottleneck_runner, conv_cases, conv_runner
from conftest import DEVICE, sync
from fastmod.ops import routed_conv2d_reference

FULL = os.environ.get("FASTMOD_BENCH_FULL", "1" if DEVICE == "cuda" else "0") == "1"
N = int(os.environ.get("FASTMOD_BENCH_N", 64 if DEVICE == "cuda" else 8))
# FASTMOD_BENCH_IMPLS=routed,dense skips the torch.compile baseline (slow to compile per shape).
IMPLS = tuple(os.environ.get("FASTMOD_BENCH_IMPLS", "routed,dense,compiled").split(","))


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
    if impl != "compiled":
        return routed_conv2d_reference
    if "ref" not in _COMPILED:
        _COMPILED["ref"] = torch.compile(routed_conv2d_reference)
    return _COMPILED["ref"]


@pytest.mark.parametrize("pass_", ["fwd", "train", "train-exact"])
@pytest.mark.parametrize("rho", DENSITIES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", conv_cases(FULL), ids=lambda c: c.name)
def test_routed_conv(benchmark, case, impl, rho, pass_):
    if not _runs(impl, rho):
        pytest.skip("dense/compiled do not depend on rho: measured at rho=1.0")
    if pass_ == "train-exact" and (impl != "routed" or rho == 1.0):
        pytest.skip('router_grad="exact" differs from "active" only for the routed kernels with off gates')
    name, hw = case.name, case.hw
    # "train-exact" is timed beside "train" (same group, labelled routed-exact@rho):
    # the cost of the off blocks' forward that the exact gate gradient needs.
    run, gflop, density = conv_runner(case, impl, rho, pass_, N, DEVICE, reference=_reference_fn(impl))
    label = "routed-exact" if pass_ == "train-exact" else impl
    group = f"routed_conv {name} hw{hw} {pass_.replace('-exact', '')}"
    _time(benchmark, run, {"density": density, "N": N, "gflop": gflop, "rho": rho,
                           "impl": label, "group": group})


@pytest.mark.parametrize("pass_", ["fwd", "train"])
@pytest.mark.parametrize("rho", DENSITIES)
@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "compiled"])
@pytest.mark.parametrize("stage", STAGES[1:2] if not FULL else STAGES, ids=lambda s: f"w{s[0]}-hw{s[1]}")
def test_routed_bottleneck(benchmark, stage, impl, rho, pass_):
    if not _runs(impl, rho):
        pytest.skip("dense does not depend on rho: measured at rho=1.0")
    width, hw = stage
    run, density = bottleneck_runner(stage, impl, rho, pass_, N, DEVICE)
    _time(benchmark, run, {"density": density, "N": N, "rho": rho, "impl": impl,
                           "group": f"RoutedBottleneck w{width} hw{hw} {pass_}"})
