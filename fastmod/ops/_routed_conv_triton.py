"""Triton backend of routed_conv2d (every gate mode), registered with
``torch.library.triton_op`` so ``torch.compile`` traces into it.

The kernels (``fastmod.kernels.routed_conv``) read x channels-last and the weight as
[Cout, KH, KW, Cin], so both operands' reduction dimension is contiguous; the
output is written channels-last too (a [N, Cout, Ho, Wo] tensor in
``torch.channels_last`` memory format), which saves the transpose cuDNN's NCHW
path pays.  An NCHW x is read in place, and an NCHW output written, by

- 1x1, stride-1, unpadded "out"/"in" convs (BRN's two 1x1 convs): each channel's
  pixels are one contiguous run, read in vectors;
- grouped ("group") convs (BRN's 3x3): coalesced along pixels but not in vectors.
  The kernel is slower than on channels-last, but less so than the two layout
  copies cost: on an H200 (2026-11-27) the whole call at rho 0.57 went from 0.93x to
  0.50x of cuDNN's time in bf16 and 0.94x to 0.80x in fp32 (N = 64, 64 channels, 56 x 56).

Other NCHW x are copied to channels-last first (25-100 us of the H100 calls timed on
2026-11-27).  ``CONFIG["nchw_in_place"]``: None for the rule above, True or False to
force either for every conv (scripts/profile_routed_triton.py times the two).

Gradients: ``_routed_conv_triton_backward`` (the same kernel for grad_x, the
vendor's dense grad_weight; for grouped convs with ``CONFIG["group_wgrad"] ==
"triton"``, a weight-gradient kernel over the active pairs instead).
"""
from __future__ import annotations

import os

import torch
import triton
from torch.library import triton_op, wrap_triton

from fastmod.kernels._hints import pow2_divisor
from fastmod.kernels.routed_conv import (compact_kernel, routed_conv_fwd_kernel, routed_conv_group_fwd_kernel,
                                        routed_conv_group_wgrad_kernel)
from fastmod.ops import _eager
from fastmod.ops._routed_conv_triton_backward import routed_conv2d_triton_backward


# group_wgrad: "dense" (cuDNN's grad_weight of the gated dy) or "triton"
# (routed_conv_group_wgrad_kernel over the active pairs; float32 only on a GPU, see
# _use_group_wgrad).  Timed once (H100, 2026-11-27, fp32, one BRN shape: training
# step 0.68x of dense against 0.86x with "dense" at rho 0.57), since rewritten, so
# the vendor path stays the default (scripts/profile_routed_triton.py --group-wgrad
# and scripts/check_group_wgrad.py time both).
# group_wgrad_stages: that kernel's software-pipelining depth (num_stages).
CONFIG = {"nchw_in_place": None, "group_wgrad": "dense", "group_wgrad_stages": 3}


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def pick_config(pixels: int, cols: int, k_len: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for one launch.
    ``FASTMOD_ROUTED_TRITON_CONFIG="bm,bn,bk,warps,stages"`` overrides it
    (scripts/profile_routed_triton.py --configs times alternatives on a GPU)."""
    env = os.environ.get("FASTMOD_ROUTED_TRITON_CONFIG")
    if env:
        bm, bn, bk, warps, stages = (int(v) for v in env.split(","))
        return bm, bn, bk, warps, stages
    bm = 64 if pixels <= 64 else 128
    bn = max(16, min(128, _pow2(cols)))
    bk = max(16, min(64 if dtype.itemsize <= 2 else 32, _pow2(k_len)))
    return bm, bn, bk, 4, 3


def triton_forward(x: torch.Tensor, weight: torch.Tensor, gates: torch.Tensor, bias: torch.Tensor | None,
                   stride: list[int], padding: list[int], dilation: list[int], gate_on: str,
                   exact: bool, tf32: bool) -> torch.Tensor:
    """x [N, Cin, H, W], weight [Cout, Cin, KH, KW] ([Cout, Cin/G, KH, KW] for
    gate_on "group", where groups == G), gates [N, G], bias [Cout] or None (checked by
    routed_conv2d); exact: the router gradient of off blocks (router_grad "exact") or
    zero ("active"); tf32: fp32 products may use TF32.  Returns [N, Cout, Ho, Wo] in x's
    dtype, channels-last; NCHW when x is NCHW-contiguous and the conv is grouped, or
    1x1, stride 1 and unpadded (``CONFIG["nchw_in_place"]`` overrides this)."""
    N, Cin, H, W = x.shape
    Cout, _, KH, KW = weight.shape
    G = gates.shape[1]
    Ho = (H + 2 * padding[0] - dilation[0] * (KH - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (KW - 1) - 1) // stride[1] + 1
    gate_in = gate_on == "in"
    # "out" leaves off channels alone, so they start at zero; "in" and "group" write every one.
    alloc = torch.zeros if gate_on == "out" else torch.empty
    # A 1x1, stride-1, unpadded conv sees each channel's pixels as one run (FLAT_PIX),
    # so it reads an NCHW x in place, in vectors, and writes NCHW: no channels-last copy.
    pointwise = KH == KW == 1 and list(stride) == [1, 1] and list(padding) == [0, 0] and gate_on != "group"
    in_place = CONFIG["nchw_in_place"]
    if in_place is None:
        in_place = pointwise or gate_on == "group"
    nhwc = not (x.is_contiguous() and in_place)
    if nhwc:
        y = alloc((N, Ho, Wo, Cout), dtype=x.dtype, device=x.device).permute(0, 3, 1, 2)
    else:
        y = alloc((N, Cout, Ho, Wo), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    _check_int32_offsets(x, weight, y)
    xc = x.contiguous(memory_format=torch.channels_last) if nhwc else x
    wc = weight.contiguous(memory_format=torch.channels_last)  # memory [Cout, KH, KW, Cin]: K contiguous
    precision = "tf32" if tf32 and x.dtype == torch.float32 else "ieee"
    if gate_on == "group":
        _group_forward(xc, wc, gates, bias, y, stride, padding, dilation, precision)
        return y
    lst = torch.empty((N, G), dtype=torch.int32, device=x.device)
    cnt = torch.empty((N,), dtype=torch.int32, device=x.device)
    wrap_triton(compact_kernel)[(N,)](gates, lst, cnt, G, gates.stride(0), gates.stride(1),
                                      BLOCK_G=max(16, _pow2(G)))
    cpb = (Cin if gate_in else Cout) // G
    bm, bn, bk, warps, stages = pick_config(Ho * Wo, Cout, Cin, x.dtype)
    grid = (triton.cdiv(Ho * Wo, bm) * N, triton.cdiv(Cout, bn))
    wrap_triton(routed_conv_fwd_kernel)[grid](
        xc, wc, gates, bias if bias is not None else xc, y, lst, cnt,
        H, W, Cin, Ho, Wo, Cout, G, cpb,
        *xc.stride(), *wc.stride(), gates.stride(0), gates.stride(1), *y.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH=KH, KW=KW, GATE_IN=gate_in, HAS_BIAS=bias is not None,
        INPUT_PRECISION=precision, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, CPB_VEC=pow2_divisor(cpb),
        FLAT_PIX=pointwise, PIX_ALIGN=pow2_divisor(Ho * Wo), num_warps=warps, num_stages=stages)
    return y


def _check_int32_offsets(x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> None:
    """The kernels address one sample's x and y, and the weight, with int32 offsets
    (64-bit address tensors cost registers: the sm_90 compile spilled without it)."""
    for name, t, numel in (("x", x, x[0].numel()), ("weight", weight, weight.numel()), ("output", y, y[0].numel())):
        if numel >= 2 ** 31:
            raise ValueError(f"routed_conv2d (backend 'triton'): {name} of shape {tuple(t.shape)} has "
                             f"{numel} elements per sample or in all, over the kernel's 2^31 - 1 limit; "
                             "use backend='cuda' or 'reference'")


def _group_forward(x, w, gates, bias, y, stride, padding, dilation, precision):
    """gate_on="group": one program per (pixel tile, group's column tile, sample);
    programs of off (sample, group) pairs return at once."""
    N, Cin, H, W = x.shape
    Cout, cg_in, KH, KW = w.shape
    G = gates.shape[1]
    cg_out = Cout // G
    Ho, Wo = y.shape[2], y.shape[3]
    k_len = KH * KW * cg_in
    bm = 64 if Ho * Wo <= 64 else 128
    bn = max(16, min(128, _pow2(cg_out)))
    bk = 16 if k_len <= 128 else (64 if x.dtype.itemsize <= 2 else 32)
    n_ct = triton.cdiv(cg_out, bn)
    wrap_triton(routed_conv_group_fwd_kernel)[(triton.cdiv(Ho * Wo, bm) * N, G * n_ct)](
        x, w, gates, bias if bias is not None else x, y, H, W, Ho, Wo, n_ct,
        *x.stride(), *w.stride(), gates.stride(0), gates.stride(1), *y.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        CG_IN=cg_in, CG_OUT=cg_out, KH=KH, KW=KW, HAS_BIAS=bias is not None, INPUT_PRECISION=precision,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=3)


def group_weight_grad(x: torch.Tensor, dy: torch.Tensor, gates: torch.Tensor, weight_shape: list[int],
                      stride: list[int], padding: list[int], dilation: list[int], tf32: bool) -> torch.Tensor:
    """grad_weight [Cout, Cin/G, KH, KW] (x's dtype) of a gate_on="group" conv from x
    [N, Cin, H, W], its output gradient dy [N, Cout, Ho, Wo] and gates [N, G]:
    sum over the active (n, g) pairs of (gates[n, g] * dy) x im2col(x), nothing for off
    pairs.  Split over (sample, pixel tile) across programs, added with atomics in fp32."""
    N, _, H, W = x.shape
    Cout, cg_in, KH, KW = weight_shape
    G = gates.shape[1]
    cg_out = Cout // G
    Ho, Wo = dy.shape[2], dy.shape[3]
    dw = torch.zeros((Cout, cg_in, KH, KW), dtype=torch.float32, device=x.device)
    if N == 0 or Ho * Wo == 0 or dw.numel() == 0:
        return dw.to(x.dtype)
    # per group, its active samples in order (compact_kernel over gates transposed)
    lst = torch.zeros((G, N), dtype=torch.int32, device=x.device)
    cnt = torch.empty((G,), dtype=torch.int32, device=x.device)
    wrap_triton(compact_kernel)[(G,)](gates, lst, cnt, N, gates.stride(1), gates.stride(0),
                                      BLOCK_G=max(16, _pow2(N)))
    k_len = KH * KW * cg_in
    bm = 64 if Ho * Wo <= 64 else 128
    bn = max(16, min(64, _pow2(cg_out)))
    bk = max(16, min(128, _pow2(k_len)))
    n_ct, n_kc = triton.cdiv(cg_out, bn), triton.cdiv(k_len, bk)
    tiles = G * n_ct * n_kc
    work = N * triton.cdiv(Ho * Wo, bm)  # (sample, pixel tile) items of a group with every sample on
    # enough programs to fill the GPU a few times over (2 in the CPU interpreter)
    target = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 2
    split = max(1, min(work, triton.cdiv(target, tiles)))
    precision = "tf32" if tf32 and x.dtype == torch.float32 else "ieee"
    wrap_triton(routed_conv_group_wgrad_kernel)[(tiles, split)](
        x, dy, gates, lst, cnt, dw, N, H, W, Ho, Wo, n_ct, n_kc, split,
        *x.stride(), *dy.stride(), gates.stride(0), gates.stride(1),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        CG_IN=cg_in, CG_OUT=cg_out, KH=KH, KW=KW, INPUT_PRECISION=precision,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=CONFIG["group_wgrad_stages"])
    return dw.to(x.dtype)


routed_conv2d_triton_group_wgrad = triton_op("fastmod::routed_conv2d_triton_group_wgrad",
                                             mutates_args=())(group_weight_grad)


def _use_group_wgrad(x: torch.Tensor) -> bool:
    """Whether the backward takes routed_conv_group_wgrad_kernel: when CONFIG asks for
    it, and on a GPU in float32 only.  Its bf16/fp16 build faulted on an H100
    (benchmarks/results/h100-2026-11-27/run5); the interpreter runs every dtype."""
    return CONFIG["group_wgrad"] == "triton" and (x.dtype == torch.float32 or not x.is_cuda)


def _setup_context(ctx, inputs, output):
    x, weight, gates, bias, stride, padding, dilation, gate_on, exact, tf32 = inputs
    # the output only feeds the "out"/"group" gates' gradient
    ctx.save_for_backward(x, weight, gates, bias, output if gate_on != "in" and ctx.needs_input_grad[2] else None)
    ctx.args = (stride, padding, dilation, gate_on, exact, tf32)


def _backward(ctx, grad):
    x, weight, gates, bias, out = ctx.saved_tensors
    need = ctx.needs_input_grad
    gx, gw, gg, gb = routed_conv2d_triton_backward(
        routed_conv2d_triton, grad, x, weight, gates, bias, out, *ctx.args,
        need=(need[0], need[1], need[2], bias is not None and need[3]),
        wgrad=routed_conv2d_triton_group_wgrad if _use_group_wgrad(x) else None)
    return (gx, gw, gg, gb) + (None,) * 6


# Registered for torch.compile; eager calls take RoutedConvFunction (no dispatcher, see
# fastmod.ops._eager).
routed_conv2d_triton = triton_op("fastmod::routed_conv2d_triton", mutates_args=())(triton_forward)
routed_conv2d_triton.register_autograd(_backward, setup_context=_setup_context)
RoutedConvFunction = _eager.eager_function("RoutedConvFunction", triton_forward, _setup_context, _backward)
