"""The Triton grouped weight gradient (routed_conv_group_wgrad_kernel) on a GPU, each
variant in its own process (a fault there kills the CUDA context): its error against a
float64 reference, and its GPU time next to cuDNN's grad_weight of the gated dy (fp32 in
TF32 on both sides when cuDNN may use it, its default).

    python scripts/check_group_wgrad.py [--cases brn3x3-w64-hw56-c8,...] [--dtypes float32,bfloat16]
        [--rhos 1.0,0.57] [--stages 3] [--sanitize]

A variant that faults is run again with stages=1 (no software pipelining); --sanitize
reruns the first one under compute-sanitizer (when on PATH) and prints the start of
its report.  GPU only; exits 2 without one.
"""
import argparse
import os
import shutil
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))


def one(case_name: str, dtype_name: str, rho: float, stages: int) -> None:
    """Run one variant in this process and print one line."""
    from torch.nn.grad import conv2d_weight

    from _routed_cases import conv_cases, gates
    from fastmod.ops import _routed_conv_triton as rt
    from fastmod.ops.routed_conv import _block_scale
    from profile_routed_cuda import kernel_times

    case = next(c for c in conv_cases(full=True) if c.name == case_name)
    name, cin, cout, k, groups, gate_on, G, hw, stride = case
    dtype = getattr(torch, dtype_name)
    n = 64
    torch.manual_seed(0)
    x = torch.randn(n, cin, hw, hw, device="cuda", dtype=dtype)
    ho = (hw + 2 * (k // 2) - k) // stride + 1
    dy = torch.randn(n, cout, ho, ho, device="cuda", dtype=dtype)
    g = gates(n, G, rho, "cuda").to(dtype)
    rt.CONFIG["group_wgrad_stages"] = stages
    # fp32 in TF32 when cuDNN's dense conv may use it (its default), so both sides alike
    tf32 = torch.backends.cudnn.allow_tf32
    args = ([cout, cin // groups, k, k], [stride] * 2, [k // 2] * 2, [1, 1], tf32)
    fast = lambda: rt.group_weight_grad(x, dy, g, *args)  # noqa: E731
    dense = lambda: conv2d_weight(x, args[0], dy * _block_scale(g, cout, dtype), stride, k // 2, 1, groups)  # noqa: E731
    got = fast()
    torch.cuda.synchronize()
    want = conv2d_weight(x.double(), args[0], (dy * _block_scale(g, cout, dtype)).double(), stride, k // 2, 1, groups)
    err = ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
    f_us = sum(us for us, _ in kernel_times(fast).values())
    d_us = sum(us for us, _ in kernel_times(dense).values())
    print(f"{name:24s} {dtype_name:8s} rho={rho:.2f} stages={stages} tf32={tf32}: max rel err {err:.2e}; "
          f"gpu {f_us:7.1f} us (dense cuDNN of gated dy {d_us:7.1f} us, {f_us / d_us:.2f}x)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="brn3x3-w64-hw56-c8,brn3x3-w128-hw28-c16,brn3x3-w256-hw14-c32,"
                                      "brn3x3s2-w128-hw56-c32")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--rhos", default="1.0,0.57")
    p.add_argument("--stages", default="3")
    p.add_argument("--sanitize", action="store_true")
    p.add_argument("--one", nargs=4, metavar=("CASE", "DTYPE", "RHO", "STAGES"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no GPU", file=sys.stderr)
        sys.exit(2)
    if args.one:
        c, d, r, s = args.one
        one(c, d, float(r), int(s))
        return
    sanitized = not (args.sanitize and shutil.which("compute-sanitizer"))
    for case in args.cases.split(","):
        for d in args.dtypes.split(","):
            for r in args.rhos.split(","):
                for s in args.stages.split(","):
                    cmd = [sys.executable, __file__, "--one", case, d, r, s]
                    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                    if res.returncode == 0:
                        print(res.stdout.strip(), flush=True)
                        continue
                    tail = [ln for ln in res.stderr.strip().splitlines() if "Error" in ln][-1:] or ["?"]
                    print(f"{case:24s} {d:8s} rho={float(r):.2f} stages={s}: FAILED rc={res.returncode}: "
                          f"{tail[0][:200]}", flush=True)
                    if int(s) > 1:  # the same variant without software pipelining, for the diagnosis
                        one_stage = subprocess.run(cmd[:-1] + ["1"], capture_output=True, text=True, timeout=120)
                        print("  with stages=1: " + (one_stage.stdout.strip() or f"FAILED rc={one_stage.returncode}"),
                              flush=True)
                    if not sanitized:
                        sanitized = True
                        rep = subprocess.run(["compute-sanitizer", "--print-limit", "3"] + cmd,
                                             capture_output=True, text=True, timeout=150)
                        print("compute-sanitizer:\n" + "\n".join(rep.stdout.splitlines()[:40]), flush=True)


if __name__ == "__main__":
    main()
