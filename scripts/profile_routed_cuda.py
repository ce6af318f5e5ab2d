"""Where the GPU time of routed_conv2d's CUDA kernels goes: one profiled call per case,
kernels listed by total GPU time (routed at rho = 0.57 next to the dense cuDNN conv +
mask), so the next kernel work starts from a measurement, not a guess.

    python scripts/profile_routed_cuda.py [--cases frn3x3-512,brn3x3-w128-hw28-c16] [--rho 0.57]

GPU only; exits 2 without one.
"""
import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from _routed_cases import conv_cases, conv_runner  # noqa: E402

DEFAULT_CASES = "frn3x3-512,frn3x3-128,brn3x3-w128-hw28-c16,brn1x1out-w128-hw28-c16"


def kernel_times(run) -> dict:
    """{kernel name: (GPU us, launches)} of one profiled run() after three warm-up
    calls (cuDNN heuristics, caching allocator, Triton compiles)."""
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    rows = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            us, n = rows.get(e.name, (0.0, 0))
            rows[e.name] = (us + e.device_time, n + 1)
    return rows


def _profile(run, top):
    rows = kernel_times(run)
    total = sum(us for us, _ in rows.values())
    lines = [f"    {us:9.1f} us  x{n:<3d} {name[:110]}"
             for name, (us, n) in sorted(rows.items(), key=lambda r: -r[1][0])[:top]]
    return total, lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated case names (benchmarks/_routed_cases.py)")
    p.add_argument("--rho", type=float, default=0.57, help="gate density of the routed runs")
    p.add_argument("--passes", default="fwd,train", help="comma-separated: fwd, train, train-exact")
    p.add_argument("--top", type=int, default=6, help="kernels listed per run")
    p.add_argument("-n", type=int, default=64, help="batch size")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no GPU: nothing to profile", file=sys.stderr)
        sys.exit(2)
    wanted = args.cases.split(",")
    cases = [c for c in conv_cases(full=True) if c.name in wanted]
    for case in cases:
        for pass_ in args.passes.split(","):
            for impl, rho in (("dense", 1.0), ("routed", args.rho)):
                run, _gflop, density = conv_runner(case, impl, rho, pass_, args.n, "cuda")
                total, lines = _profile(run, args.top)
                print(f"{case.name} {pass_} {impl} density={density:.2f}: {total:.1f} us of kernels")
                print("\n".join(lines))


if __name__ == "__main__":
    main()
