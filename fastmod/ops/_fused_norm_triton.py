"""Triton backend of the fused normalisation epilogues, registered with
``torch.library.triton_op`` so ``torch.compile`` traces into the kernels.

Same schemas and results as the C++ ops of csrc/fused_norm (the ``_triton``
suffix names them); float32, float16 and bfloat16 tensors, float32 arithmetic.
The routed BN's [N, C]-sized reductions between kernels (statistics over samples,
gradient coefficients) are one small per-channel kernel each, which keeps the big
kernels free of atomics and a call's launches few (host time, not GPU time, is what
a launch costs at these sizes).
"""
from __future__ import annotations

import torch
import triton
from torch.library import triton_op, wrap_triton

from fastmod.kernels import fused_norm as k
from fastmod.kernels._hints import pow2_divisor

# Elements per program tile, and warps per program.
TILE = 2048
NUM_WARPS = 4
CHANNELS = 128  # channels per program of the per-channel finalize kernels (loops over N)


def _row_plan(n_rows: int, hw: int):
    """(ROWS, BLOCK, grid) for the row kernels: BLOCK pixels of ROWS rows per program."""
    block = min(triton.next_power_of_2(hw), 1024)
    rows = max(1, min(triton.next_power_of_2(n_rows), TILE // block))
    return rows, block, (-(-n_rows // rows),)


def _group_plan(cg: int, hw: int):
    block = min(triton.next_power_of_2(hw), 512)
    return max(1, min(triton.next_power_of_2(cg), TILE // block)), block


def _rows(x):
    N, C, H, W = x.shape
    return N, C, H * W, N * C


def _routed_bn_into(x, gates, weight, bias, running_mean, running_var, training, eps, out):
    N, C, HW, n_rows = _rows(x)
    G = gates.shape[1]
    gates = gates.contiguous()
    rows, block, grid = _row_plan(n_rows, HW)
    if training:
        row_mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        row_m2 = torch.empty_like(row_mean)
        wrap_triton(k.routed_bn_row_stats_kernel)[grid](x, gates, row_mean, row_m2, C, HW, G, C // G, n_rows,
                                                        ROWS=rows, BLOCK=block, HW_ALIGN=pow2_divisor(HW),
                                                        num_warps=NUM_WARPS)
        mean = torch.empty(C, dtype=torch.float32, device=x.device)
        var = torch.empty_like(mean)
        wrap_triton(k.routed_bn_stats_finalize_kernel)[(triton.cdiv(C, CHANNELS),)](
            row_mean, row_m2, mean, var, N, C, HW, BLOCK_C=CHANNELS, num_warps=1)
        stats = mean, var
    else:
        # the kernel reads the running statistics themselves; the op returns empty
        # statistics (outputs may not alias inputs, and a copy is two more launches):
        # the autograd setup saves the running ones instead (fused_norm._bn_setup)
        stats = running_mean, running_var
        mean, var = x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.float32)
    wrap_triton(k.routed_bn_relu_apply_kernel)[grid](x, gates, weight, bias, *stats, eps, out, C, HW, G, C // G,
                                                     n_rows, ROWS=rows, BLOCK=block, HW_ALIGN=pow2_divisor(HW),
                                                     num_warps=NUM_WARPS)
    return mean, var


def bn_relu(x: torch.Tensor, gates: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
            running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
            training: bool, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    out = torch.empty_like(x)
    mean, var = _routed_bn_into(x, gates, weight, bias, running_mean, running_var, training, eps, out)
    return out, mean, var


def bn_relu_(x: torch.Tensor, gates: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
             running_mean: torch.Tensor | None, running_var: torch.Tensor | None, training: bool,
             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """In place on x (contiguous), for inference."""
    return _routed_bn_into(x, gates, weight, bias, running_mean, running_var, training, eps, x)


def bn_relu_backward(grad_out: torch.Tensor, x: torch.Tensor, gates: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, training: bool, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, dy, gates = x.contiguous(), grad_out.contiguous(), gates.contiguous()
    N, C, HW, n_rows = _rows(x)
    G = gates.shape[1]
    rows, block, grid = _row_plan(n_rows, HW)
    s0 = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    s1 = torch.empty_like(s0)
    wrap_triton(k.routed_bn_relu_bwd_sums_kernel)[grid](dy, x, gates, weight, bias, mean, var, eps, s0, s1, C, HW,
                                                        G, C // G, n_rows, ROWS=rows, BLOCK=block,
                                                        HW_ALIGN=pow2_divisor(HW), num_warps=NUM_WARPS)
    # dx = w invstd (dz - mean(dz) - xhat mean(dz xhat)); the batch terms exist only
    # when the statistics came from the batch.
    k1, k2, k3 = torch.empty(3, C, dtype=torch.float32, device=x.device)
    dw, db = torch.empty(C, dtype=weight.dtype, device=x.device), torch.empty(C, dtype=bias.dtype, device=x.device)
    wrap_triton(k.routed_bn_bwd_finalize_kernel)[(triton.cdiv(C, CHANNELS),)](
        s0, s1, weight, var, eps, k1, k2, k3, dw, db, N, C, N * HW, TRAINING=training, BLOCK_C=CHANNELS,
        num_warps=1)
    dx = torch.empty_like(x)
    wrap_triton(k.routed_bn_relu_bwd_apply_kernel)[grid](dy, x, gates, weight, bias, mean, var, eps, k1, k2, k3, dx,
                                                         C, HW, G, C // G, n_rows, ROWS=rows, BLOCK=block,
                                                         HW_ALIGN=pow2_divisor(HW), num_warps=NUM_WARPS)
    return dx, dw, db


def _gn_into(x, residual, weight, bias, num_groups, eps, out):
    N, C, HW, _ = _rows(x)
    mean = torch.empty(N, num_groups, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    block_c, block = _group_plan(C // num_groups, HW)
    wrap_triton(k.gn_add_relu_fwd_kernel)[(N * num_groups,)](
        x, residual.contiguous(), weight, bias, out, mean, rstd, C, HW, num_groups, C // num_groups, eps,
        BLOCK_C=block_c, BLOCK=block, HW_ALIGN=pow2_divisor(HW), num_warps=NUM_WARPS)
    return mean, rstd


def gn_add_relu(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                num_groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    out = torch.empty_like(x)
    mean, rstd = _gn_into(x, residual, weight, bias, num_groups, eps, out)
    return out, mean, rstd


def gn_add_relu_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 num_groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """In place on x (contiguous, not overlapping residual), for inference."""
    return _gn_into(x, residual, weight, bias, num_groups, eps, x)


def gn_add_relu_backward(grad_out: torch.Tensor, out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                         mean: torch.Tensor, rstd: torch.Tensor, num_groups: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, out, dy = x.contiguous(), out.contiguous(), grad_out.contiguous()
    N, C, HW, _ = _rows(x)
    cg = C // num_groups
    dx, dres = torch.empty_like(x), torch.empty_like(x)
    s0 = torch.empty(N, C, dtype=torch.float32, device=x.device)
    s1 = torch.empty_like(s0)
    block_c, block = _group_plan(cg, HW)
    wrap_triton(k.gn_add_relu_bwd_kernel)[(N * num_groups,)](
        dy, out, x, weight, mean.contiguous(), rstd.contiguous(), dx, dres, s0, s1, C, HW, num_groups, cg,
        BLOCK_C=block_c, BLOCK=block, HW_ALIGN=pow2_divisor(HW), num_warps=NUM_WARPS)
    dw = (s1.view(N, num_groups, cg) * rstd[:, :, None]).sum(0).view(C)
    return dx, dres, dw.to(weight.dtype), s0.sum(0).to(weight.dtype)


# The registered ops (torch.compile traces into them); eager calls run the functions
# above directly (fastmod.ops.fused_norm._call).
routed_batch_norm_relu_triton = triton_op("fastmod::routed_batch_norm_relu_triton", mutates_args=())(bn_relu)
routed_batch_norm_relu_triton_ = triton_op("fastmod::routed_batch_norm_relu_triton_", mutates_args={"x"})(bn_relu_)
routed_batch_norm_relu_backward_triton = triton_op("fastmod::routed_batch_norm_relu_backward_triton",
                                                   mutates_args=())(bn_relu_backward)
group_norm_add_relu_triton = triton_op("fastmod::group_norm_add_relu_triton", mutates_args=())(gn_add_relu)
group_norm_add_relu_triton_ = triton_op("fastmod::group_norm_add_relu_triton_", mutates_args={"x"})(gn_add_relu_)
group_norm_add_relu_backward_triton = triton_op("fastmod::group_norm_add_relu_backward_triton",
                                                mutates_args=())(gn_add_relu_backward)
