"""Time the Triton mixed node under alternative launch parameters (GPU only).

    python benchmarks/tune_mixed_node.py [--json FILE]

Prints, per LNMN benchmark case, the forward and forward+backward medians of
each configuration in fastmod.ops._mixed_node_triton.CONFIG's space (forward:
[C, S] tiles and the flat kernel; backward: tile, warps, S cap, C chunks per
program; the flat kernel for the "full" case), and the
achieved GB/s, so the defaults can be chosen from measurements.  Times are
CUDA-graph replays (GPU time, launch overhead excluded).
"""
import argparse
import itertools
import json

import torch

from _harness import cuda_graph, fresh_leaves
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    from triton.testing import do_bench  # GPU only: imported here, never at module import

    default = dict(impl.CONFIG)
    rows = []
    for name, (s1, s2, K, norm) in CASES.items():
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

        flat_cfgs = [] if norm else sorted({(tile, warps, None) for tile, warps, _ in FWD})  # s_cap: unused
        for (tile, warps, s_cap), flat in [(c, False) for c in FWD] + [(c, True) for c in flat_cfgs]:
            impl.CONFIG.update(default, fwd_tile=tile, fwd_warps=warps, s_cap=s_cap or default["s_cap"],
                               fwd_flat=flat)
            t = do_bench(cuda_graph(fwd).replay, warmup=10, rep=50, return_mode="median") / 1e3
            rows.append(dict(case=name, pass_="fwd", tile=tile, warps=warps, s_cap=s_cap, flat=flat,
                             ms=round(t * 1e3, 4), gbps=round(fwd_bytes / t / 1e9, 1)))
            print(rows[-1], flush=True)  # as it goes: a run cut by a time limit keeps what it measured
        bwd_cfgs = [(t, w, s, c, False) for (t, w), s, c in itertools.product(BWD, (64, 128), C_ITERS)]
        if name == "full":  # the flat backward (both operands full): tile and warps only
            bwd_cfgs += [(t, w, default["s_cap"], 1, True) for t, w in BWD]
        for tile, warps, s_cap, c_iters, flat in bwd_cfgs:
            impl.CONFIG.update(default, bwd_tile=tile, bwd_warps=warps, s_cap=s_cap, bwd_c_iters=c_iters,
                               bwd_flat=flat)
            t = do_bench(cuda_graph(both).replay, warmup=10, rep=50, return_mode="median") / 1e3
            rows.append(dict(case=name, pass_="fwd+bwd", tile=tile, warps=warps, s_cap=s_cap, c_iters=c_iters,
                             flat=flat, ms=round(t * 1e3, 4), gbps=round(bwd_bytes / t / 1e9, 1)))
            print(rows[-1], flush=True)
        impl.CONFIG.update(default)
        best = {ps: min((r for r in rows if r["case"] == name and r["pass_"] == ps), key=lambda r: r["ms"])
                for ps in ("fwd", "fwd+bwd")}
        print(name, "best:", best, flush=True)
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
