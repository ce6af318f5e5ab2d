"""Routed / dense time ratios of the routed-convolution benchmark cases, measured
interleaved: every round times the dense conv + mask and the routed kernels at each
density back to back (in a shuffled order), so a slow spell of a shared machine
slows both sides of a ratio alike, and each runs after other work, as a layer in a
network does.  (pytest-benchmark times one case after another; on this project's
2-core VM the same case moves +-25% between runs, which is wider than several of
issue 4's margins.)

    python benchmarks/interleaved_routed_conv.py [--cases frn3x3-512,bottleneck] [--rounds 15]
        [--passes fwd,train] [--n 8] [--full] [--markdown] [--json FILE]

Per case and pass: median dense time, median routed time and ratio per density,
the ratio's spread (25th-75th percentile of per-round ratios), and whether the
median ratio meets issue 4's target (rho + 0.10 forward, rho + 0.15 training).
"bottleneck" is the whole RoutedBottleneck block (stage w128, 28x28; --full: all).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _routed_cases import (DENSITIES, STAGES, bottleneck_runner, conv_cases, conv_runner,  # noqa: E402
                           target)
from summarize import print_table  # noqa: E402


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(run, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    run()
    _sync(device)
    return time.perf_counter() - t0


def _quartiles(xs):
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[0], q[2]


def measure(make, rounds: int, device: str):
    """make(impl, rho) -> run.  Returns {rho: (dense_s, routed_s, ratio, q1, q3)}."""
    runs = {"dense": make("dense", 1.0)}
    runs.update({rho: make("routed", rho) for rho in DENSITIES})
    for run in runs.values():  # warm-up: first-call allocations, thread pools
        run()
    times = {k: [] for k in runs}
    order = list(runs)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)  # no implementation always runs right after the same other one
        for k in order:
            times[k].append(_timed(runs[k], device))
    dense = statistics.median(times["dense"])
    out = {}
    for rho in DENSITIES:
        per_round = [r / d for r, d in zip(times[rho], times["dense"])]
        q1, q3 = _quartiles(per_round)
        out[rho] = (dense, statistics.median(times[rho]), statistics.median(times[rho]) / dense, q1, q3)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="", help="comma-separated case names (default: all of the set), "
                   "'bottleneck' for the whole block")
    p.add_argument("--full", action="store_true", help="every shape (default: the CPU subset)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds per case (default 15)")
    p.add_argument("--passes", default="fwd,train", help="fwd and/or train (default both)")
    p.add_argument("--n", type=int, default=None, help="batch size (default 8 on CPU, 64 on GPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    n = args.n or (64 if args.device == "cuda" else 8)
    wanted = {c for c in args.cases.split(",") if c}
    passes = [q for q in args.passes.split(",") if q]
    for q in passes:
        if q not in ("fwd", "train"):
            p.error(f"--passes takes fwd and/or train, got {q!r}")
    jobs = []
    for case in conv_cases(args.full or bool(wanted - {"bottleneck"})):
        if not wanted or case.name in wanted:
            jobs.append((case.name, lambda impl, rho, q, c=case: conv_runner(c, impl, rho, q, n, args.device)[0]))
    if not wanted or "bottleneck" in wanted:
        for stage in (STAGES if args.full else STAGES[1:2]):
            jobs.append((f"bottleneck-w{stage[0]}-hw{stage[1]}",
                         lambda impl, rho, q, s=stage: bottleneck_runner(s, impl, rho, q, n, args.device)[0]))
    unknown = wanted - {name for name, _ in jobs} - {"bottleneck"}
    if unknown:
        p.error(f"unknown case(s) {sorted(unknown)}; known: {[c.name for c in conv_cases(True)]} and bottleneck")
    results = []
    total = len(jobs) * len(passes)
    for name, make in jobs:
        for q in passes:
            print(f"[{len(results) + 1}/{total}] {name} {q}", file=sys.stderr, flush=True)
            torch.manual_seed(0)
            res = measure(lambda impl, rho: make(impl, rho, q), args.rounds, args.device)
            results.append({"case": name, "pass": q, "n": n, "rounds": args.rounds,
                            "dense_ms": res[1.0][0] * 1e3,
                            "routed_ms": {str(r): v[1] * 1e3 for r, v in res.items()},
                            "ratio": {str(r): v[2] for r, v in res.items()},
                            "ratio_iqr": {str(r): [v[3], v[4]] for r, v in res.items()},
                            "met": {str(r): v[2] <= target(r, q) for r, v in res.items()}})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "torch": torch.__version__, "results": results}, f, indent=1)
    rhos = [str(r) for r in DENSITIES]
    head = ["case", "pass", "dense ms", "routed/dense " + " / ".join(rhos), "IQR at 0.57 / 0.3 / 0.1",
            "target met " + " / ".join(rhos)]
    rows = []
    for r in results:
        rows.append([r["case"], r["pass"], f"{r['dense_ms']:.2f}",
                     " / ".join(f"{r['ratio'][k]:.2f}" for k in rhos),
                     " / ".join(f"{r['ratio_iqr'][k][0]:.2f}-{r['ratio_iqr'][k][1]:.2f}" for k in rhos[1:]),
                     " / ".join("yes" if r["met"][k] else "no" for k in rhos)])
    print_table(head, rows, args.markdown)


if __name__ == "__main__":
    main()
