"""Where a whole model's step spends its time, fastmod's kernels on against the
reference path (the steps of benchmarks/bench_models.py): wall time per step, GPU
kernel time and launches, and the kernels that take the most GPU time, so a model
that runs slower with kernels on shows which kernels (or the host) cost it.

    python scripts/profile_models.py [--models qgmrn-brn,qgmrn-frn] [--passes infer,train] [--top 10]
        [--host 25]

--host N adds, per step, the N Python functions with the most host time of their own
(cProfile over five steps): where the host time goes when the wall time is far
above the GPU time (the H100 run of 2026-11-27: QGMRN-BRN inference 19.6 ms wall on
5.4 ms of GPU kernels with fastmod's kernels on, 7.1 ms on 6.4 ms off).

GPU only; exits 2 without one.
"""
import argparse
import cProfile
import io
import os
import pstats
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from profile_routed_cuda import kernel_times  # noqa: E402  (scripts/ is sys.path[0])
from profile_routed_triton import wall_us  # noqa: E402


def host_profile(step, top):
    """The ``top`` functions by own host time over five steps (cProfile)."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    lines = out.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
    print("\n".join("      " + line for line in lines[start:] if line.strip()), flush=True)


def report(name, pass_, impl, step, top, host=0):
    rows = {}  # kernel time and launches of one step, after three warm-up steps
    for kname, (us, k) in kernel_times(step).items():
        us0, k0 = rows.get(kname[:70], (0.0, 0))
        rows[kname[:70]] = (us0 + us, k0 + k)
    wall = wall_us(step, 5) / 1e3
    gpu = sum(us for us, _ in rows.values()) / 1e3
    launches = sum(k for _, k in rows.values())
    print(f"{name:10s} {pass_:5s} {impl:9s}: wall {wall:8.2f} ms, GPU kernels {gpu:8.2f} ms in {launches} launches",
          flush=True)
    for kname, (us, k) in sorted(rows.items(), key=lambda r: -r[1][0])[:top]:
        print(f"      {us / 1e3:7.2f} ms x{k:<4d} {kname}", flush=True)
    if host:
        host_profile(step, host)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qgmrn-brn,qgmrn-frn")
    p.add_argument("--passes", default="infer,train")
    p.add_argument("--impls", default="fastmod,reference",
                   help="comma-separated: fastmod, reference, fastmod-nonorm (kernels on, the blocks' "
                        "BN/GN epilogues left to PyTorch)")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--host", type=int, default=0, metavar="N",
                   help="also the N Python functions with the most own host time (cProfile)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no GPU", file=sys.stderr)
        sys.exit(2)
    from bench_models import make_step

    from fastmod.ops import fused_norm
    has_kernel = fused_norm.has_kernel
    for name in args.models.split(","):
        for pass_ in args.passes.split(","):
            for impl in args.impls.split(","):
                # "fastmod-nonorm": kernels on, but the blocks keep PyTorch's BN/GN epilogues
                fused_norm.has_kernel = (lambda *a, **k: False) if impl == "fastmod-nonorm" else has_kernel
                step = make_step(name, "reference" if impl == "reference" else "fastmod", pass_)
                report(name, pass_, impl, step, args.top, args.host)
    fused_norm.has_kernel = has_kernel


if __name__ == "__main__":
    main()
