"""Compile fastmod's Triton kernels for a GPU (sm_90) on a machine without one.

Triton's CPU interpreter, which the tests use here, runs the kernels as NumPy and
never lowers them to GPU code, so a kernel that only fails to compile for a GPU
(an unsupported dtype in a math function, a bad pointer type) would pass every CPU
test.  This compiles representative specialisations of every kernel in kernels/
(mixed node, Gumbel gate, fused norms, routed conv) all the way to a cubin with
Triton's own ptxas; no GPU is needed.  Run it without TRITON_INTERPRET (under the
interpreter, ``triton.jit`` gives interpreted functions, which cannot be compiled):

    python tests/triton_gpu_compile.py        # exit 0: all compiled; 1: errors; 3: unsupported Triton API

tests/test_triton_gpu_compile.py runs it in a subprocess.
"""
from __future__ import annotations

import itertools
import os
import re
import sys


def _cases():
    """(name, kernel, signature, constexprs) for each specialisation to compile."""
    from fastmod.kernels import fused_norm as fk
    from fastmod.kernels import gumbel_gate as gk
    from fastmod.kernels import mixed_node as mk
    from fastmod.kernels import routed_conv as rk
    from fastmod.kernels._hints import pow2_divisor

    def ints(*names):
        return {n: "i32" for n in names}

    strides = ("s1k", "s1b", "s1c", "s1s", "s2k", "s2b", "s2c", "s2s")
    for a64, x64, hard, mask in itertools.product([False, True], [False, True], [False, True], [False, True]):
        xt, at = ("*fp64" if x64 else "*fp32"), ("*fp64" if a64 else "*fp32")
        weights = {"HAS_MASK": mask, "HARD": hard, "A_FP64": a64}
        sig = {"x1_ptr": xt, "x2_ptr": xt, "a_ptr": at, "m_ptr": "*i1" if mask else at, "out_ptr": xt,
               **ints("K", "B", "C", "S", "n_sblk", "n_cprog", "c_per_prog", "m_stride_k", *strides)}
        yield (f"mixed_node_fwd a64={a64} x64={x64} hard={hard} mask={mask}", mk.mixed_node_fwd_kernel, sig,
               {**weights, "NORMALIZE": not hard, "IS_FP64": x64, "EPS": 1e-12, "BLOCK_C": 16, "BLOCK_S": 64})
        if not hard:  # the flat forward (no normalize): both operand layouts
            sig = {"x1_ptr": xt, "x2_ptr": xt, "a_ptr": at, "m_ptr": "*i1" if mask else at, "out_ptr": xt,
                   **ints("K", "B", "CS", "n_blk", "m_stride_k", *strides)}
            yield (f"mixed_node_fwd_flat a64={a64} x64={x64} mask={mask}", mk.mixed_node_fwd_flat_kernel, sig,
                   {**weights, "S": 1 if mask else 196, "CONTIG1": True, "CONTIG2": mask, "IS_FP64": x64,
                    "BLOCK": 2048})
        if x64 != a64:
            continue  # the backward: same weight code, one pairing of dtypes each
        sig = {"g_ptr": xt, "x1_ptr": xt, "x2_ptr": xt, "a_ptr": at, "m_ptr": "*i1" if mask else at,
               "dx1_ptr": xt, "dx2_ptr": "*fp64" if x64 else "*fp32", "dw_ptr": "*fp64" if x64 else "*fp32",
               **ints("K", "B", "CS", "n_blk", "m_stride_k", *strides)}
        # both operands full; or (mask) LNMN's K nodes sharing x1 with a per-node x2 broadcast over S
        yield (f"mixed_node_bwd_flat a64={a64} hard={hard} mask={mask}", mk.mixed_node_bwd_flat_kernel, sig,
               {**weights, "S": 196 if mask else 1, "CONTIG1": True, "CONTIG2": not mask, "NEED1": True,
                "NEED2": not hard, "SHARED1": mask, "SHARED2": False, "IS_FP64": x64, "BLOCK": 1024})
        sig = {"g_ptr": xt, "x1_ptr": xt, "x2_ptr": xt, "a_ptr": at, "m_ptr": "*i1" if mask else at,
               "dx1_ptr": xt, "dx2_ptr": "*fp64" if x64 else "*fp32", "dw_ptr": "*fp64" if x64 else "*fp32",
               **ints("K", "B", "C", "S", "n_sblk", "n_cprog", "c_per_prog", "m_stride_k", *strides),
               **ints(*(f"d{i}{d}" for i in (1, 2) for d in "kbcs"))}
        flags = {"NEED1": True, "RED1_K": False, "RED1_C": False, "RED1_S": False, "ATOMIC1": False,
                 "NEED2": True, "RED2_K": False, "RED2_C": True, "RED2_S": True, "ATOMIC2": True,
                 "K_INNER": False, "NORMALIZE": not hard, "IS_FP64": x64, "EPS": 1e-12, "BLOCK_C": 16,
                 "BLOCK_S": 64}
        yield f"mixed_node_bwd a64={a64} hard={hard} mask={mask}", mk.mixed_node_bwd_kernel, sig, {**weights, **flags}
        if hard:
            continue  # dalpha is soft-mode only
        sig = {"part_ptr": "*fp64" if x64 else "*fp32", "a_ptr": at, "m_ptr": "*i1" if mask else at, "da_ptr": at,
               **ints("n_part", "m_stride_k")}
        yield (f"mixed_node_dalpha a64={a64} mask={mask}", mk.mixed_node_dalpha_kernel, sig,
               {"HAS_MASK": mask, "A_FP64": a64, "BLOCK_P": 256})

    # LNMN's normalised node at B = 64, D = 384, 14 x 14 (S = 196), specialised as at
    # run time, with the row-alignment hints the wrapper passes (S % 4 == 0).
    B, C, S = 64, 384, 196
    shape = {"K": 2, "B": B, "C": C, "S": S, "n_sblk": 2, "n_cprog": 1, "c_per_prog": C, "m_stride_k": 6,
             "s1k": B * C * S, "s1b": C * S, "s1c": S, "s1s": 1, "s2k": 0, "s2b": C, "s2c": 1, "s2s": 0}
    ptrs = {"x1_ptr": "*fp32", "x2_ptr": "*fp32", "a_ptr": "*fp32", "m_ptr": "*fp32"}
    tiles = {"HAS_MASK": False, "HARD": False, "A_FP64": False, "NORMALIZE": True, "IS_FP64": False, "EPS": 1e-12,
             "BLOCK_C": 16, "BLOCK_S": 128, "ALIGN_S": 4, "ALIGN1": 4, "ALIGN2": 1}
    yield ("mixed_node_fwd normalize textual specialised", mk.mixed_node_fwd_kernel,
           {**ptrs, "out_ptr": "*fp32", **shape}, tiles)
    grads = {"d1k": B * C * S, "d1b": C * S, "d1c": S, "d1s": 1, "d2k": 0, "d2b": C, "d2c": 1, "d2s": 0}
    flags = {"NEED1": True, "RED1_K": False, "RED1_C": False, "RED1_S": False, "ATOMIC1": False, "NEED2": True,
             "RED2_K": False, "RED2_C": False, "RED2_S": True, "ATOMIC2": True, "K_INNER": False, "DALIGN1": 4}
    yield ("mixed_node_bwd normalize textual specialised", mk.mixed_node_bwd_kernel,
           {"g_ptr": "*fp32", **ptrs, "dx1_ptr": "*fp32", "dx2_ptr": "*fp32", "dw_ptr": "*fp32", **shape, **grads},
           {**tiles, **flags, "BLOCK_C": 8})

    for from_ptr, stochastic, hard in [(True, True, True), (False, True, False), (False, False, True)]:
        seed = {"seed_ptr": "*i64" if from_ptr else "*fp16", "seed_val": "i64"}
        seeding = {"SEED_FROM_PTR": from_ptr, "STOCHASTIC": stochastic, "BLOCK": 1024}
        sig = {"x_ptr": "*fp16", **seed, "out_ptr": "*fp16", "n": "i32", "inv_tau": "fp32"}
        yield (f"gumbel fwd from_ptr={from_ptr} stochastic={stochastic}", gk.gate_fwd_kernel, sig,
               {"HARD": hard, **seeding})
        if from_ptr:  # the smallest block (small inputs), one element per thread
            yield ("gumbel fwd BLOCK=128", gk.gate_fwd_kernel, sig,
                   {"HARD": hard, **seeding, "BLOCK": gk.MIN_BLOCK})
        sig = {"g_ptr": "*bf16", "x_ptr": "*bf16", **seed, "gin_ptr": "*bf16", "n": "i32", "inv_tau": "fp32"}
        yield f"gumbel bwd from_ptr={from_ptr} stochastic={stochastic}", gk.gate_bwd_kernel, sig, seeding
    for from_ptr in (True, False):
        sig = {"seed_ptr": "*i64" if from_ptr else "*fp32", "seed_val": "i64", "u_ptr": "*fp32", "n": "i32"}
        yield f"gumbel noise from_ptr={from_ptr}", gk.noise_kernel, sig, {"SEED_FROM_PTR": from_ptr, "BLOCK": 1024}

    # Fused norms: activations in fp32 or bf16, statistics and parameters in fp32.
    for xt in ("*fp32", "*bf16"):
        dims = ints("C", "HW", "G", "Cb", "n_rows")
        rows = {"ROWS": 4, "BLOCK": 256}
        f32 = "*fp32"
        yield (f"routed_bn_row_stats {xt}", fk.routed_bn_row_stats_kernel,
               {"x_ptr": xt, "gates_ptr": f32, "mean_ptr": f32, "m2_ptr": f32, **dims}, rows)
        # BN parameters in x's dtype (a model run in bf16), statistics in fp32
        bn = {"w_ptr": xt, "bias_ptr": xt, "mean_ptr": f32, "var_ptr": f32, "eps": "fp32"}
        yield (f"routed_bn_stats_finalize {xt}", fk.routed_bn_stats_finalize_kernel,
               {"row_mean_ptr": f32, "row_m2_ptr": f32, "mean_ptr": f32, "var_ptr": f32, **ints("N", "C", "HW")},
               {"BLOCK_C": 128}, {"num_warps": 1})
        yield (f"routed_bn_relu_apply {xt}", fk.routed_bn_relu_apply_kernel,
               {"x_ptr": xt, "gates_ptr": f32, **bn, "out_ptr": xt, **dims}, rows)
        yield (f"routed_bn_relu_bwd_finalize {xt}", fk.routed_bn_bwd_finalize_kernel,
               {"s0_ptr": f32, "s1_ptr": f32, "w_ptr": xt, "var_ptr": f32, "eps": "fp32", "k1_ptr": f32,
                "k2_ptr": f32, "k3_ptr": f32, "dw_ptr": xt, "db_ptr": xt, **ints("N", "C", "count")},
               {"TRAINING": xt == "*fp32", "BLOCK_C": 128}, {"num_warps": 1})
        yield (f"routed_bn_relu_bwd_sums {xt}", fk.routed_bn_relu_bwd_sums_kernel,
               {"dy_ptr": xt, "x_ptr": xt, "gates_ptr": f32, **bn, "s0_ptr": f32, "s1_ptr": f32, **dims}, rows)
        yield (f"routed_bn_relu_bwd_apply {xt}", fk.routed_bn_relu_bwd_apply_kernel,
               {"dy_ptr": xt, "x_ptr": xt, "gates_ptr": f32, **bn, "k1_ptr": f32, "k2_ptr": f32, "k3_ptr": f32,
                "dx_ptr": xt, **dims}, rows)
        gdims = ints("C", "HW", "G", "Cg")
        tile = {"BLOCK_C": 8, "BLOCK": 256}
        yield (f"gn_add_relu_fwd {xt}", fk.gn_add_relu_fwd_kernel,
               {"x_ptr": xt, "r_ptr": xt, "w_ptr": f32, "b_ptr": f32, "out_ptr": xt, "mean_ptr": f32,
                "rstd_ptr": f32, **gdims, "eps": "fp32"}, tile)
        yield (f"gn_add_relu_bwd {xt}", fk.gn_add_relu_bwd_kernel,
               {"dy_ptr": xt, "out_ptr": xt, "x_ptr": xt, "w_ptr": f32, "mean_ptr": f32, "rstd_ptr": f32,
                "dx_ptr": xt, "dres_ptr": xt, "s0_ptr": f32, "s1_ptr": f32, **gdims}, tile)
    # The BRN bottleneck's 14 x 14 stage (HW = 196, a multiple of 4 only), specialised as
    # at run time with the HW_ALIGN hint the wrapper passes.
    f32, C, HW, G = "*fp32", 256, 196, 32
    shape = {"C": C, "HW": HW, "G": G, "Cb": C // G, "n_rows": 64 * C}
    yield ("routed_bn_relu_apply hw14 specialised", fk.routed_bn_relu_apply_kernel,
           {"x_ptr": f32, "gates_ptr": f32, "w_ptr": f32, "bias_ptr": f32, "mean_ptr": f32, "var_ptr": f32,
            "eps": "fp32", "out_ptr": f32, **shape},
           {"ROWS": 4, "BLOCK": 256, "HW_ALIGN": 4})
    yield ("gn_add_relu_fwd hw14 specialised", fk.gn_add_relu_fwd_kernel,
           {"x_ptr": f32, "r_ptr": f32, "w_ptr": f32, "b_ptr": f32, "out_ptr": f32, "mean_ptr": f32,
            "rstd_ptr": f32, "C": 2 * C, "HW": HW, "G": G, "Cg": 2 * C // G, "eps": "fp32"},
           {"BLOCK_C": 8, "BLOCK": 256, "HW_ALIGN": 4})


    # Routed conv forward: each gate mode and activation dtype, at the launch options
    # fastmod.ops._routed_conv_triton uses (so the software pipeline is compiled too).
    yield ("routed_conv compact", rk.compact_kernel,
           {"g_ptr": "*fp32", "list_ptr": "*i32", "cnt_ptr": "*i32", **ints("G", "sgn", "sgg")}, {"BLOCK_G": 64})
    conv_ints = ints("H", "W", "Cin", "Ho", "Cout", "G", "sxn", "sxc", "sxh", "sxw", "swo", "swc",
                     "swr", "sws", "sgn", "sgg", "syn", "syc", "syh", "syw", "conv_sh", "conv_sw", "pad_h", "pad_w",
                     "dil_h", "dil_w")
    for xt, gate_in, prec in [("*fp32", False, "tf32"), ("*fp32", True, "ieee"), ("*fp16", False, "ieee"),
                              ("*bf16", True, "ieee")]:
        sig = {"x_ptr": xt, "w_ptr": xt, "g_ptr": "*fp32", "b_ptr": xt, "y_ptr": xt, "list_ptr": "*i32",
               "cnt_ptr": "*i32", **conv_ints}
        tiles = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32 if xt == "*fp32" else 64}
        yield (f"routed_conv_fwd {xt} gate_in={gate_in} {prec}", rk.routed_conv_fwd_kernel, sig,
               {"KH": 3, "KW": 3, "GATE_IN": gate_in, "HAS_BIAS": True, "INPUT_PRECISION": prec, **tiles,
                "Wo": 14, "CPB": 3, "CPB_VEC": 1}, {"num_warps": 4, "num_stages": 3})
    # The benchmark shapes with the values Triton specialises on at run time (unit
    # strides become constants, multiples of 16 get divisibility hints): BRN's 1x1
    # "in"/"out" convs (8 channels per gate block) and an FRN 3x3 (one per block).
    # BRN's 1x1 convs run with FLAT_PIX (pixels as one run), channels-last or, reading
    # an NCHW x in place, NCHW.
    for name, xt, gate_in, (cin, cout, g, k, hw), tiles, nchw in [
            ("brn1x1in", "*bf16", True, (128, 256, 16, 1, 28), (128, 128, 64), False),
            ("brn1x1in", "*fp32", True, (128, 256, 16, 1, 28), (128, 128, 32), False),
            ("brn1x1out", "*fp32", False, (256, 128, 16, 1, 28), (128, 128, 32), False),
            ("brn1x1in nchw", "*bf16", True, (128, 256, 16, 1, 28), (128, 128, 64), True),
            ("brn1x1out nchw", "*bf16", False, (256, 128, 16, 1, 28), (128, 128, 64), True),
            ("frn3x3-512", "*bf16", False, (512, 512, 512, 3, 7), (64, 128, 64), False)]:
        cpb = (cin if gate_in else cout) // g
        p = hw * hw
        values = {"H": hw, "W": hw, "Cin": cin, "Ho": hw, "Cout": cout, "G": g,
                  "sxn": p * cin, "sxc": p if nchw else 1, "sxh": hw if nchw else hw * cin, "sxw": 1 if nchw else cin,
                  "swo": k * k * cin, "swc": 1, "swr": k * cin, "sws": cin, "sgn": g, "sgg": 1,
                  "syn": p * cout, "syc": p if nchw else 1, "syh": hw if nchw else hw * cout,
                  "syw": 1 if nchw else cout, "conv_sh": 1, "conv_sw": 1, "pad_h": k // 2, "pad_w": k // 2,
                  "dil_h": 1, "dil_w": 1}
        sig = {"x_ptr": xt, "w_ptr": xt, "g_ptr": "*fp32", "b_ptr": xt, "y_ptr": xt, "list_ptr": "*i32",
               "cnt_ptr": "*i32", **values}
        bm, bn, bk = tiles
        yield (f"routed_conv_fwd {name} {xt} specialised", rk.routed_conv_fwd_kernel, sig,
               {"KH": k, "KW": k, "GATE_IN": gate_in, "HAS_BIAS": False,
                "INPUT_PRECISION": "tf32" if xt == "*fp32" else "ieee", "BLOCK_M": bm, "BLOCK_N": bn,
                "BLOCK_K": bk, "Wo": hw, "CPB": cpb, "CPB_VEC": pow2_divisor(cpb), "FLAT_PIX": k == 1,
                "PIX_ALIGN": pow2_divisor(p)}, {"num_warps": 4, "num_stages": 3})


    group_ints = ints("H", "W", "Ho", "n_ct", "sxn", "sxc", "sxh", "sxw", "swo", "swc", "swr", "sws", "sgn",
                      "sgg", "syn", "syc", "syh", "syw", "conv_sh", "conv_sw", "pad_h", "pad_w", "dil_h", "dil_w")
    for xt, prec in [("*fp32", "tf32"), ("*fp32", "ieee"), ("*bf16", "ieee")]:
        sig = {"x_ptr": xt, "w_ptr": xt, "g_ptr": "*fp32", "b_ptr": xt, "y_ptr": xt, **group_ints}
        yield (f"routed_conv_group_fwd {xt} {prec}", rk.routed_conv_group_fwd_kernel, sig,
               {"CG_IN": 8, "CG_OUT": 8, "KH": 3, "KW": 3, "HAS_BIAS": True, "INPUT_PRECISION": prec,
                "BLOCK_M": 128, "BLOCK_N": 16, "BLOCK_K": 16, "Wo": 28}, {"num_warps": 4, "num_stages": 3})
    wgrad_ints = ints("N", "H", "W", "Ho", "n_ct", "n_kc", "split", "sxn", "sxc", "sxh", "sxw", "syn", "syc", "syh",
                      "syw", "sgn", "sgg", "conv_sh", "conv_sw", "pad_h", "pad_w", "dil_h", "dil_w")
    for xt, prec in [("*fp32", "tf32"), ("*bf16", "ieee")]:
        sig = {"x_ptr": xt, "dy_ptr": xt, "g_ptr": "*fp32", "lst_ptr": "*i32", "cnt_ptr": "*i32", "dw_ptr": "*fp32",
               **wgrad_ints}
        yield (f"routed_conv_group_wgrad {xt} {prec}", rk.routed_conv_group_wgrad_kernel, sig,
               {"CG_IN": 8, "CG_OUT": 8, "KH": 3, "KW": 3, "INPUT_PRECISION": prec, "BLOCK_M": 128,
                "BLOCK_N": 16, "BLOCK_K": 128, "Wo": 28}, {"num_warps": 4, "num_stages": 3})


# A PTX global load of one element (ld.global.v2/.v4 are vector loads).
SCALAR_LOAD = re.compile(r"ld\.global(?![.\w:]*\.v[248]\.)[.\w:]*\.b(?:8|16|32|64)\s")


def _specialise(kernel, sig: dict, consts: dict):
    """(signature, constexprs, attrs) in the kernel's parameter order.  A signature
    entry is a type ("*fp32", "i32") or, for an integer argument, its value, which is
    specialised as Triton's launcher does: 1 becomes a constant, a multiple of 16 gets
    the ``tt.divisibility`` hint.  Pointers get that hint too (torch allocations are
    16-byte aligned) where the case gives values, as a launch would."""
    full = {**sig, **{k: "constexpr" for k in consts}}
    consts, out, attrs = dict(consts), {}, {}
    with_values = any(isinstance(v, int) for v in sig.values())
    defaults = {p.name: p.default for p in kernel.params if p.has_default}
    for i, name in enumerate(kernel.arg_names):
        if name not in full and name in defaults:  # a constexpr the case leaves at its default
            out[name], consts[name] = "constexpr", defaults[name]
            continue
        v = full[name]
        if isinstance(v, int) and v == 1:
            out[name], consts[name] = "constexpr", 1
            continue
        if isinstance(v, int):
            out[name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
        else:
            out[name] = v
        if (isinstance(v, int) and v % 16 == 0) or (with_values and v.startswith("*") if isinstance(v, str) else False):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return out, consts, attrs


def _stack_note(compiled) -> str:
    """" stack N" when the cubin's stack frame is not empty (register spills), from
    the cuobjdump that ships with Triton; "" when it is empty or cannot be read."""
    import subprocess
    import tempfile

    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if "cubin" not in compiled.asm or not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", res)
    return f" (regs {m.group(1)}, stack {m.group(2)} B)" if m and m.group(2) != "0" else ""


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("run without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, compile as triton_compile
    except ImportError as e:  # a Triton without these entry points
        print(f"unsupported Triton API: {e}", file=sys.stderr)
        return 3
    from triton.backends import backends as triton_backends
    if "nvidia" not in triton_backends:
        print("this Triton has no NVIDIA backend", file=sys.stderr)
        return 3
    target = GPUTarget("cuda", 90, 32)
    failed = 0
    for name, kernel, sig, consts, *options in _cases():
        sig, consts, attrs = _specialise(kernel, sig, consts)
        try:
            src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
        except TypeError as e:  # the signature format of another Triton version
            print(f"unsupported Triton API: {e}", file=sys.stderr)
            return 3
        try:
            compiled = triton_compile(src, target=target, options=options[0] if options else None)
            # whether tl.dot became Hopper warpgroup MMAs (wgmma) or the older mma.sync
            mma = "".join(f" {op}" for op in ("wgmma", "mma.sync") if op in compiled.asm.get("ptx", ""))
            note = _stack_note(compiled)
            if "specialised" in name:  # element-by-element global loads (a lost vectorisation)
                note += f" scalar-loads {len(SCALAR_LOAD.findall(compiled.asm['ptx']))}"
            print(f"ok   {name}{mma}{note}")
        except Exception as e:  # noqa: BLE001 - report every kernel, then fail
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {str(e).strip().splitlines()[:8]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
