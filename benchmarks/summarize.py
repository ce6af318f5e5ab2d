"""Print a side-by-side table from `pytest benchmarks --benchmark-json=FILE`.

    python benchmarks/summarize.py FILE [--markdown]

One row per benchmark group: median time of each implementation, the
speed-ups of fastmod over the others, and fastmod's extra_info.
"""
import argparse
import json
from collections import defaultdict


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json_file", help="output of pytest --benchmark-json")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = p.parse_args(argv)
    data = json.load(open(args.json_file))
    groups = defaultdict(dict)
    for b in data["benchmarks"]:
        impl = b["extra_info"].get("impl", b["param"])
        groups[b["group"]][impl] = b
    impls = sorted({i for g in groups.values() for i in g}, key=lambda i: (i != "fastmod", i))
    # Ratios are taken against fastmod where a group has it, else against "dense".
    base = "fastmod" if "fastmod" in impls else "dense"
    head = ["case"] + [f"{i} ms" for i in impls] + [f"{i}/{base}" for i in impls if i != base] + [f"{base} info"]
    rows = []
    for name, g in groups.items():
        med = {i: g[i]["stats"]["median"] for i in g}
        row = [name] + [f"{med[i] * 1e3:.3f}" if i in med else "-" for i in impls]
        row += [f"{med[i] / med[base]:.2f}x" if i in med and base in med else "-" for i in impls if i != base]
        info = g.get(base, {}).get("extra_info", {})
        row.append(", ".join(f"{k}={v}" for k, v in info.items() if k not in ("impl", "bytes")))
        rows.append(row)
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        for r in [head] + rows:
            print("  ".join(r))


if __name__ == "__main__":
    main()
