"""Print a side-by-side table from `pytest benchmarks --benchmark-json=FILE`.

    python benchmarks/summarize.py FILE [--markdown] [--routed]

One row per benchmark group: median time of each implementation, the
speed-ups of fastmod over the others, and fastmod's extra_info.  A GPU group whose
implementations were not all timed the same way (a CUDA-graph capture failed for
some) is compared on the eager wall-clock times instead, and says so.  --routed (for
bench_routed_conv.py's output) prints one row per routed-conv case and pass instead:
dense and compiled times, routed time and routed/dense per density, whether issue
4's targets are met at rho = 0.57 / 0.3 / 0.1, and the router_grad="exact" ratios.
"""
import argparse
import json
import os
import sys
from collections import defaultdict

RHOS = ("1.0", "0.57", "0.3", "0.1")


def routed_rows(groups):
    """Rows of the --routed table from {group: {impl: benchmark}}."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _routed_cases import target
    rows = []
    for name, g in groups.items():
        med = {i: b["stats"]["median"] * 1e3 for i, b in g.items()}
        if "dense" not in med:
            continue
        words = name.split()
        case, pass_ = words[1] if words[0] == "routed_conv" else f"bottleneck-{words[1]}-{words[2]}", words[-1]

        def ms(key):
            return f"{med[key]:.2f}" if key in med else "-"

        def ratio(key):
            return med[key] / med["dense"] if key in med else None
        ratios = [ratio(f"routed@{r}") for r in RHOS]
        met = ["-" if x is None else ("yes" if x <= target(float(r), pass_) else "no")
               for r, x in zip(RHOS[1:], ratios[1:])]
        exact = [ratio(f"routed-exact@{r}") for r in RHOS[1:]]
        rows.append([case, pass_, ms("dense"), ms("compiled"),
                     " / ".join(ms(f"routed@{r}") for r in RHOS),
                     " / ".join("-" if x is None else f"{x:.2f}" for x in ratios),
                     " / ".join(met),
                     " / ".join("-" if x is None else f"{x:.2f}" for x in exact) if any(exact) else "-"])
    head = ["case", "pass", "dense ms", "compiled ms", "routed ms rho=1.0 / 0.57 / 0.3 / 0.1",
            "routed/dense rho=1.0 / 0.57 / 0.3 / 0.1", "target met at rho = 0.57 / 0.3 / 0.1",
            "exact/dense rho=0.57 / 0.3 / 0.1"]
    return head, rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json_file", help="output of pytest --benchmark-json")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--routed", action="store_true", help="the routed-conv table (see above)")
    args = p.parse_args(argv)
    data = json.load(open(args.json_file))
    groups = defaultdict(dict)
    for b in data["benchmarks"]:
        impl = b["extra_info"].get("impl", b["param"])
        groups[b["group"]][impl] = b
    if args.routed:
        print_table(*routed_rows(groups), args.markdown)
        return
    impls = sorted({i for g in groups.values() for i in g}, key=lambda i: (i != "fastmod", i))
    # Ratios are taken against fastmod where a group has it, else against "dense".
    base = "fastmod" if "fastmod" in impls else "dense"
    head = ["case"] + [f"{i} ms" for i in impls] + [f"{i}/{base}" for i in impls if i != base] + [f"{base} info"]
    rows = []
    for name, g in groups.items():
        med = {i: g[i]["stats"]["median"] for i in g}
        # GPU: a group whose implementations were not all timed the same way (a CUDA-graph
        # capture failed for some) is compared on the wall clock every case recorded.
        timings = {g[i]["extra_info"].get("timing", "").split(" ")[0] for i in g}
        if len(timings) > 1 and all("wall_ms" in g[i]["extra_info"] for i in g):
            med = {i: g[i]["extra_info"]["wall_ms"] / 1e3 for i in g}
            name += " (wall clock: mixed timings)"
        row = [name] + [f"{med[i] * 1e3:.3f}" if i in med else "-" for i in impls]
        row += [f"{med[i] / med[base]:.2f}x" if i in med and base in med else "-" for i in impls if i != base]
        info = g.get(base, {}).get("extra_info", {})
        row.append(", ".join(f"{k}={v}" for k, v in info.items() if k not in ("impl", "bytes")))
        rows.append(row)
    print_table(head, rows, args.markdown)


def print_table(head, rows, markdown):
    """Rows as a Markdown table, or as plain space-separated columns."""
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        for r in [head] + rows:
            print("  ".join(r))


if __name__ == "__main__":
    main()
