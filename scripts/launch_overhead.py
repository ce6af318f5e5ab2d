"""Host time per call on a GPU: one Triton launch (direct, and through wrap_triton's
higher-order op), one small ATen op, and fastmod's fused-norm and routed-conv calls
against their PyTorch counterparts, each timed over many back-to-back calls on
tiny tensors (the GPU finishes each call long before the host issues the next).

    python scripts/launch_overhead.py

The whole models on an H100 (2026-11-27) were host-bound with the kernels on; this
says what one call of each piece costs that host.  GPU only; exits 2 without one.
"""
import argparse
import sys

import torch

from profile_routed_triton import wall_us  # scripts/ is sys.path[0]


def main():
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    if not torch.cuda.is_available():
        print("no GPU", file=sys.stderr)
        sys.exit(2)
    import triton
    import triton.language as tl
    from torch._library.triton import set_wrap_triton_enabled
    from torch.library import wrap_triton

    from fastmod.ops import fused_norm, routed_conv2d

    @triton.jit
    def copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        tl.store(y_ptr + o, tl.load(x_ptr + o, mask=o < n), mask=o < n)

    x = torch.randn(256, device="cuda")
    y = torch.empty_like(x)

    def hop():
        wrap_triton(copy_kernel)[(1,)](x, y, 256, BLOCK=256)

    def direct():
        with set_wrap_triton_enabled(False):
            hop()

    rows = [("triton launch, direct", direct), ("triton launch, wrap_triton HOP", hop),
            ("aten add", lambda: torch.add(x, x, out=y))]
    a = torch.randn(8, 64, 8, 8, device="cuda")
    g = (torch.rand(8, 8, device="cuda") > 0.3).float()
    rm, rv = torch.zeros(64, device="cuda"), torch.ones(64, device="cuda")
    w, b = torch.ones(64, device="cuda"), torch.zeros(64, device="cuda")
    bn = torch.nn.BatchNorm2d(64).cuda().eval()
    gn = torch.nn.GroupNorm(8, 64).cuda()
    wc = torch.randn(64, 8, 3, 3, device="cuda")
    with torch.no_grad():
        rows += [
            ("routed_batch_norm_relu, eval, in place", lambda: fused_norm.routed_batch_norm_relu(
                a, g, rm, rv, w, b, inplace=True)),
            ("torch: relu_(batch_norm), eval", lambda: torch.relu_(bn(a))),
            ("group_norm_add_relu, in place", lambda: fused_norm.group_norm_add_relu(
                a, a.clone(), 8, w, b, inplace=True)),
            ("torch: relu(group_norm + r) (+ the clone)", lambda: torch.relu(gn(a) + a.clone())),
            ("routed_conv2d group, fp32 (dense path)", lambda: routed_conv2d(a, wc, g, padding=1, groups=8)),
            ("torch: conv2d(groups=8)", lambda: torch.nn.functional.conv2d(a, wc, padding=1, groups=8)),
        ]
    for name, fn in rows:
        with torch.no_grad():
            print(f"{name:45s} {wall_us(fn, 2000):8.1f} us per call", flush=True)


if __name__ == "__main__":
    main()
