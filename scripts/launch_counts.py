"""Count the GPU kernels one call of each fused op launches, forward and backward
(issues 2 and 3 ask for one launch each way), with torch.profiler.

    python scripts/launch_counts.py [--json FILE]

Prints one line per op and pass: the number of kernels and their names (memsets
and copies are listed apart).  GPU only; exits 2 without one.
"""
import argparse
import json
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from fastmod import ops


def _kernels(fn):
    """Names of the GPU kernels and of the memsets/copies that fn() ran, in order."""
    fn()  # compile / autotune outside the profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    copies = [n for n in names if n.startswith(("Memset", "Memcpy"))]
    return [n for n in names if n not in copies], copies


def _cases():
    dev = "cuda"
    x = torch.randn(64, 8, 32, device=dev, requires_grad=True)
    gx = torch.randn_like(x)
    a = torch.randn(64, 384, 14, 14, device=dev, requires_grad=True)
    b = torch.randn(64, 384, 1, 1, device=dev, requires_grad=True)
    alpha = torch.randn(6, device=dev, requires_grad=True)
    ga = torch.randn_like(a)

    def gate():
        return ops.gumbel_sigmoid_gate(x, 0.5, hard=True, stochastic=True)

    def node():
        return ops.mixed_node(a, b, alpha)
    gate_out, node_out = gate(), node()
    return {
        "gumbel_sigmoid_gate 64x8x32": (gate, lambda: torch.autograd.grad(gate_out, (x,), gx, retain_graph=True)),
        "mixed_node 64x384x14x14 + 64x384x1x1": (
            node, lambda: torch.autograd.grad(node_out, (a, b, alpha), ga, retain_graph=True)),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="also write the counts to this file")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("launch_counts.py needs a GPU", file=sys.stderr)
        return 2
    result = {}
    for name, (fwd, bwd) in _cases().items():
        for pass_, fn in (("forward", fwd), ("backward", bwd)):
            kernels, copies = _kernels(fn)
            result[f"{name} {pass_}"] = {"kernels": len(kernels), "names": kernels, "memsets_copies": copies}
            print(f"{name} {pass_}: {len(kernels)} kernel(s) {kernels}" + (f"; memset/copy {copies}" if copies else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
