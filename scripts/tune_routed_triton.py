"""Time the Triton routed-conv forward against the dense cuDNN conv + mask on a GPU,
for each tile configuration given, so the defaults of
``fastmod.ops._routed_conv_triton.pick_config`` come from measurements.

    python scripts/tune_routed_triton.py [--cases frn3x3-128,...] [--rhos 1.0,0.57]
        [--dtypes float32,bfloat16] [--configs default,128,64,32,4,3;...] [--json out.json]

Per case it prints the max error against the reference, then GPU times (median of
``triton.testing.do_bench``, ms) of: dense NCHW (what the benchmarks compare
against), dense channels-last, and fastmod (NCHW input, so it includes the
channels-last copy; and channels-last input) for each config.  fp32 runs with
TF32 allowed for both (cuDNN's default).  GPU only; exits 2 without one.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from _routed_cases import conv_cases, gates  # noqa: E402

from fastmod.ops import routed_conv2d, routed_conv2d_reference  # noqa: E402

DEFAULT_CASES = ("frn3x3-64,frn3x3-128,frn3x3-256,frn3x3-512,brn1x1out-w128-hw28-c16,"
                 "brn1x1in-w128-hw28-c16,brn1x1out-w256-hw14-c32")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated case names (benchmarks/_routed_cases.py)")
    p.add_argument("--rhos", default="1.0,0.57", help="gate densities")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--configs", default="default", help="';'-separated: 'default' or 'bm,bn,bk,warps,stages'")
    p.add_argument("-n", type=int, default=64, help="batch size")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no GPU", file=sys.stderr)
        sys.exit(2)
    from triton.testing import do_bench as _do_bench  # only here: it needs a GPU

    def do_bench(fn):  # short runs: the whole sweep has to fit in a minute or two of device time
        return _do_bench(fn, warmup=5, rep=25)
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    wanted = args.cases.split(",")
    rows = []
    for case in [c for c in conv_cases(full=True) if c[0] in wanted]:
        name, cin, cout, k, groups, gate_on, G, hw = case
        for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
            x = torch.randn(args.n, cin, hw, hw, device="cuda", dtype=dtype)
            w = (torch.randn(cout, cin, k, k, device="cuda") / (cin * k * k) ** 0.5).to(dtype)
            xcl, wcl = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
            kw = dict(padding=k // 2, gate_on=gate_on)
            for rho in (float(r) for r in args.rhos.split(",")):
                g = gates(args.n, G, rho, "cuda")
                with torch.no_grad():
                    ref = routed_conv2d_reference(x.float(), w.float(), g, **kw)
                    row = {"case": name, "dtype": str(dtype).split(".")[1], "rho": rho,
                           "dense_ms": do_bench(lambda: routed_conv2d_reference(x, w, g, **kw)),
                           "dense_cl_ms": do_bench(lambda: routed_conv2d_reference(xcl, wcl, g, **kw))}
                    for cfg in args.configs.split(";"):
                        if cfg == "default":
                            os.environ.pop("FASTMOD_ROUTED_TRITON_CONFIG", None)
                        else:
                            os.environ["FASTMOD_ROUTED_TRITON_CONFIG"] = cfg
                        try:
                            y = routed_conv2d(x, w, g, backend="triton", **kw)
                            err = ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
                            t = do_bench(lambda: routed_conv2d(x, w, g, backend="triton", **kw))
                            t_cl = do_bench(lambda: routed_conv2d(xcl, wcl, g, backend="triton", **kw))
                        except Exception as e:  # noqa: BLE001 - a config that does not fit: report, go on
                            print(f"{name} {dtype} rho={rho} cfg={cfg}: {type(e).__name__}: {str(e)[:200]}")
                            continue
                        row[f"fastmod[{cfg}]"] = (t, t_cl, err)
                        print(f"{name:26s} {row['dtype']:8s} rho={rho:.2f} cfg={cfg:14s} rel_err={err:.1e} "
                              f"dense={row['dense_ms']:.4f} dense_cl={row['dense_cl_ms']:.4f} "
                              f"fastmod={t:.4f} ({t / row['dense_ms']:.2f}x dense) "
                              f"fastmod_cl={t_cl:.4f} ({t_cl / row['dense_cl_ms']:.2f}x dense_cl)", flush=True)
                os.environ.pop("FASTMOD_ROUTED_TRITON_CONFIG", None)
                rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
