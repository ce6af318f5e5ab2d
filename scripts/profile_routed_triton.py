"""GPU kernel time (torch.profiler) and eager wall time per call of the Triton
routed-conv forward, next to the dense cuDNN conv + mask: separates what the GPU
spends from the host's launch overhead, which do_bench's back-to-back calls mix in.

    python scripts/profile_routed_triton.py [--cases ...] [--configs default;128,128,32,8,3] [--channels-last]
        [--nchw auto|in-place|copy] [--train [--group-wgrad dense,triton]]

GPU only; exits 2 without one.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from _routed_cases import conv_cases, conv_runner, gates  # noqa: E402
from profile_routed_cuda import kernel_times  # noqa: E402  (scripts/ is sys.path[0])

from fastmod.ops import routed_conv2d, routed_conv2d_reference  # noqa: E402

DEFAULT_CASES = ("frn3x3-64,frn3x3-128,frn3x3-256,frn3x3-512,brn1x1out-w128-hw28-c16,brn1x1in-w128-hw28-c16,"
                 "brn3x3-w64-hw56-c8,brn3x3-w128-hw28-c16,brn3x3-w256-hw14-c32")


def kernel_us(fn):
    """(total GPU kernel us of one call, {kernel name: us})."""
    rows = {}
    for name, (us, _n) in kernel_times(fn).items():
        rows[name[:60]] = rows.get(name[:60], 0.0) + us
    return sum(rows.values()), rows


def wall_us(fn, n=50):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=DEFAULT_CASES)
    p.add_argument("--rhos", default="1.0,0.57")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--configs", default="default")
    p.add_argument("-n", type=int, default=64)
    p.add_argument("--train", action="store_true",
                   help="also a training step (fwd + bwd, router_grad='active') against dense: fp32, and for "
                        "grouped convs every dtype")
    p.add_argument("--group-wgrad", default="dense",
                   help="grouped convs' weight gradient in the training step: dense, triton, or both "
                        "(comma-separated; _routed_conv_triton.CONFIG['group_wgrad'])")
    p.add_argument("--nchw", choices=("auto", "in-place", "copy"), default="auto",
                   help="an NCHW x: read in place or copied to channels-last first, for every conv, or the "
                        "default rule (auto; _routed_conv_triton.CONFIG['nchw_in_place'])")
    p.add_argument("--channels-last", action="store_true",
                   help="x and the weight channels-last on both sides (cuDNN's NHWC kernels; no copy of x for "
                        "fastmod), as in a network run in torch.channels_last")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no GPU", file=sys.stderr)
        sys.exit(2)
    torch.backends.cudnn.allow_tf32 = True
    from fastmod.ops import _routed_conv_triton
    _routed_conv_triton.CONFIG["nchw_in_place"] = {"auto": None, "in-place": True, "copy": False}[args.nchw]
    for case in [c for c in conv_cases(full=True) if c.name in args.cases.split(",")]:
        for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
            for rho in (float(r) for r in args.rhos.split(",")):
                forward(case, dtype, rho, args)
                if args.train and (dtype == torch.float32 or case.gate_on == "group"):
                    for wgrad in args.group_wgrad.split(",") if case.gate_on == "group" else ["dense"]:
                        if wgrad == "triton" and dtype != torch.float32:
                            # the backward keeps cuDNN's there (_use_group_wgrad); the kernel
                            # alone: scripts/check_group_wgrad.py
                            print(f"{'':24s} {str(dtype)[6:]:8s} {'':8s} train (wgrad triton): fp32 only", flush=True)
                            continue
                        _routed_conv_triton.CONFIG["group_wgrad"] = wgrad
                        train(case, rho, args.n, dtype, wgrad)


def forward(case, dtype, rho, args):
    """Dense against fastmod under each tile configuration, no grad."""
    name, cin, cout, k, groups, gate_on, G, hw, stride = case
    x = torch.randn(args.n, cin, hw, hw, device="cuda", dtype=dtype)
    w = (torch.randn(cout, cin // groups, k, k, device="cuda") / (cin // groups * k * k) ** 0.5).to(dtype)
    if args.channels_last:
        x, w = (t.contiguous(memory_format=torch.channels_last) for t in (x, w))
    kw = dict(stride=stride, padding=k // 2, groups=groups, gate_on=gate_on)
    g = gates(args.n, G, rho, "cuda")
    with torch.no_grad():
        dense = lambda: routed_conv2d_reference(x, w, g, **kw)  # noqa: E731
        d_gpu, _ = kernel_us(dense)
        print(f"{name:24s} {str(dtype)[6:]:8s} rho={rho:.2f} dense: gpu {d_gpu:7.1f} us, "
              f"wall {wall_us(dense):7.1f} us", flush=True)
        # FASTMOD_ROUTED_TRITON_CONFIG tiles the "out"/"in" kernel; the group kernel picks its own
        for cfg in ["default"] if gate_on == "group" else args.configs.split(";"):
            if cfg == "default":
                os.environ.pop("FASTMOD_ROUTED_TRITON_CONFIG", None)
            else:
                os.environ["FASTMOD_ROUTED_TRITON_CONFIG"] = cfg
            fast = lambda: routed_conv2d(x, w, g, backend="triton", **kw)  # noqa: E731
            f_gpu, f_rows = kernel_us(fast)
            conv = sum(us for k_, us in f_rows.items() if k_.startswith("routed_conv"))
            print(f"{'':24s} {'':8s} {'':8s} fastmod[{cfg}]: gpu {f_gpu:7.1f} us "
                  f"({f_gpu / d_gpu:.2f}x dense; conv kernel {conv:.1f} us), wall {wall_us(fast):7.1f} us",
                  flush=True)
            if cfg == "default":
                print("      " + _top(f_rows))
        os.environ.pop("FASTMOD_ROUTED_TRITON_CONFIG", None)


def train(case, rho, n, dtype, wgrad):
    """A training step (router_grad="active"), dense against fastmod."""
    d_run = conv_runner(case, "dense", rho, "train", n, "cuda", dtype=dtype)[0]
    f_run = conv_runner(case, "routed", rho, "train", n, "cuda", backend="triton", dtype=dtype)[0]
    d_gpu, _ = kernel_us(d_run)
    f_gpu, f_rows = kernel_us(f_run)
    print(f"{'':24s} {str(dtype)[6:]:8s} {'':8s} train (wgrad {wgrad}): dense gpu {d_gpu:7.1f} us, fastmod gpu {f_gpu:7.1f} us "
          f"({f_gpu / d_gpu:.2f}x), wall {wall_us(d_run):7.1f} / {wall_us(f_run):7.1f} us", flush=True)
    print("      " + _top(f_rows, 8))


def _top(rows, k=None):
    return "; ".join(f"{name} {us:.1f}" for name, us in sorted(rows.items(), key=lambda r: -r[1])[:k])


if __name__ == "__main__":
    main()
