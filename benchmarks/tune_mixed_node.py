"""Time the Triton mixed node under alternative launch parameters (GPU only).

    python benchmarks/tune_mixed_node.py [--json FILE] [--cases full,k8] [--profile]

Prints, per LNMN benchmark case, the forward and forward+backward medians of
each configuration in fastmod.ops._mixed_node_triton.CONFIG's space (forward:
[C, S] tiles and the flat kernel; backward: tile, warps, S cap, C chunks per
program; the flat kernel without normalize), and the
achieved GB/s, so the defaults can be chosen from measurements.  Times are
CUDA-graph replays (GPU time, launch overhead excluded).  --profile first prints,
per case, the GPU time of each kernel of one fastmod forward+backward at the
current CONFIG and of torch.compile(reference)'s, to show where a step's time goes.
"""
import argparse
import itertools
import json
import os
import sys

import torch

from _harness import compiled, cuda_graph, fresh_leaves
from fastmod import ops
from fastmod.ops import _mixed_node_triton as impl

CASES = {
    "full": ((64, 384, 14, 14), (64, 384, 14, 14), None, False),
    "textual": ((64, 384, 14, 14), (64, 384, 1, 1), None, False),
    "k8": ((64, 384, 14, 14), (8, 64, 384, 1, 1), 8, False),
    "full-norm": ((64, 384, 14, 14), (64, 384, 14, 14), None, True),
}
FWD = [(1024, 4, 64), (2048, 4, 64), (2048, 4, 128), (4096, 8, 128), (4096, 4, 256), (8192, 8, 256)]
BWD = [(1024, 4), (2048, 4), (2048, 8), (4096, 8)]
C_ITERS = (1, 4)  # C chunks one backward program walks (CONFIG["bwd_c_iters"])
BWD_KEYS = ("bwd_tile", "bwd_warps", "s_cap", "bwd_c_iters", "bwd_flat", "k_inner", "s_cap_reduced")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    p.add_argument("--profile", action="store_true", help="per-kernel GPU time of one step, fastmod and compile")
    p.add_argument("--passes", default="fwd,fwd+bwd", help="which passes to sweep: fwd, fwd+bwd or both")
    args = p.parse_args()
    from triton.testing import do_bench  # GPU only: imported here, never at module import

    default = dict(impl.CONFIG)
    rows = []
    for name in args.cases.split(","):
        s1, s2, K, norm = CASES[name]
        x1 = torch.randn(s1, device="cuda", requires_grad=True)
        x2 = torch.randn(s2, device="cuda", requires_grad=True)
        alpha = torch.randn(6 if K is None else (K, 6), device="cuda", requires_grad=True)
        out = ops.mixed_node(x1, x2, alpha, normalize=norm)
        g = torch.randn_like(out)
        fwd_bytes = x1.nbytes + x2.nbytes + out.nbytes
        bwd_bytes = fwd_bytes + g.nbytes + 2 * (x1.nbytes + x2.nbytes)

        def fwd():
            with torch.no_grad():
                ops.mixed_node(x1, x2, alpha, normalize=norm)

        def both():  # leaves made inside the step, so the capture works (see fresh_leaves)
            a, b, w = fresh_leaves(x1, x2, alpha)
            torch.autograd.grad(ops.mixed_node(a, b, w, normalize=norm), (a, b, w), g)

        if args.profile:
            profile_step(name, both, lambda: torch.autograd.grad(
                compiled(ops.mixed_node_reference)(x1, x2, alpha, normalize=norm), (x1, x2, alpha), g))
        flat_cfgs = [] if norm else sorted({(tile, warps, None) for tile, warps, _ in FWD})  # s_cap: unused
        fwd_cfgs = [(c, False) for c in FWD] + [(c, True) for c in flat_cfgs]
        for (tile, warps, s_cap), flat in fwd_cfgs if "fwd" in args.passes.split(",") else []:
            impl.CONFIG.update(default, fwd_tile=tile, fwd_warps=warps, s_cap=s_cap or default["s_cap"],
                               fwd_flat=flat)
            t = do_bench(cuda_graph(fwd).replay, warmup=10, rep=50, return_mode="median") / 1e3
            rows.append(dict(case=name, pass_="fwd", tile=tile, warps=warps, s_cap=s_cap, flat=flat,
                             ms=round(t * 1e3, 4), gbps=round(fwd_bytes / t / 1e9, 1)))
            print(rows[-1], flush=True)  # as it goes: a run cut by a time limit keeps what it measured
        bwd_cfgs = [dict(bwd_tile=t, bwd_warps=w, s_cap=s, bwd_c_iters=c)
                    for (t, w), s, c in itertools.product(BWD, (64, 128), C_ITERS)]
        if not norm:  # the flat backward: tile and warps only
            bwd_cfgs += [dict(bwd_tile=t, bwd_warps=w, bwd_flat=True) for t, w in BWD]
        if K:  # one node per program, the shared operand's gradient summed with atomics
            bwd_cfgs += [dict(bwd_tile=t, bwd_warps=w, k_inner=False) for t, w in BWD]
        if s2[-1] == 1:  # S-blocks under all of S, the broadcast operand's gradient by atomics
            bwd_cfgs += [dict(bwd_tile=t, bwd_warps=w, bwd_c_iters=c, s_cap_reduced=sr)
                         for (t, w), c, sr in itertools.product(BWD[:2], C_ITERS, (64, 128))]
        for cfg in bwd_cfgs if "fwd+bwd" in args.passes.split(",") else []:
            impl.CONFIG.update({**default, "bwd_flat": False, **cfg})
            t = do_bench(cuda_graph(both).replay, warmup=10, rep=50, return_mode="median") / 1e3
            rows.append(dict(case=name, pass_="fwd+bwd", **{k: impl.CONFIG[k] for k in BWD_KEYS},
                             ms=round(t * 1e3, 4), gbps=round(bwd_bytes / t / 1e9, 1)))
            print(rows[-1], flush=True)
        impl.CONFIG.update(default)
        best = {ps: min((r for r in rows if r["case"] == name and r["pass_"] == ps), key=lambda r: r["ms"])
                for ps in args.passes.split(",")}
        print(name, "best:", best, flush=True)
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1)


def profile_step(name, fastmod_step, compile_step):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
    from profile_routed_cuda import kernel_times
    for label, step in (("fastmod", fastmod_step), ("compile", compile_step)):
        rows = kernel_times(step)
        print(f"{name} fwd+bwd {label}: {sum(us for us, _ in rows.values()):.1f} us of kernels", flush=True)
        for kname, (us, n) in sorted(rows.items(), key=lambda r: -r[1][0]):
            print(f"    {us:8.1f} us x{n} {kname[:100]}", flush=True)


if __name__ == "__main__":
    main()
