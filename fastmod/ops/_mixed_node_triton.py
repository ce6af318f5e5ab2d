"""Triton backend of the mixed node, registered with ``torch.library.triton_op`` so
``torch.compile`` traces into the kernels.  Works on the canonical 4-D form
described in ``fastmod.ops.mixed_node``."""
from __future__ import annotations

import torch
from torch.library import triton_op, wrap_triton

from fastmod.kernels._hints import pow2_divisor
from fastmod.kernels.mixed_node import (mixed_node_bwd_flat_kernel, mixed_node_bwd_kernel, mixed_node_dalpha_kernel,
                                       mixed_node_fwd_flat_kernel, mixed_node_fwd_kernel)
from fastmod.ops._mixed_node_canonical import full4

NORM_EPS = 1e-12
# Launch parameters (elements per tile, warps, S-block cap, and the C chunks one
# backward program walks, so its six dalpha partial sums are reduced once per that many
# tiles); benchmarks/tune_mixed_node.py times alternatives on a GPU.
# fwd_flat / bwd_flat: without normalize, the forward (always) and the backward (when
# both operands are full over B and C) run on flat 1-D blocks of C * S (the *_flat
# kernels) rather than [C, S] tiles.  The tiled backward (normalize, or an operand
# broadcast over B or C) has two more switches.  k_inner: with K > 1 nodes sharing an
# operand, one program walks all K (that operand's gradient summed in registers)
# rather than one node each with atomics.  s_cap_reduced: the S-block cap when an
# operand is broadcast over S (1024: one block spans S, so its gradient is summed
# without atomics; smaller: atomics across S blocks).
# Chosen from benchmarks/tune_mixed_node.py on an H200 (2026-11-27,
# benchmarks/results/h200-2026-11-27): s_cap 64 halved the normalised node's forward
# (0.112 -> 0.056 ms); bwd_c_iters 4 cut the tiled textual fwd+bwd 0.114 -> 0.086 ms
# (before the flat backward took that case over, at 0.054 ms); tile 2048 with 4 warps
# was best, or within 2%, for every kernel.
CONFIG = {"fwd_tile": 2048, "bwd_tile": 2048, "fwd_warps": 4, "bwd_warps": 4, "s_cap": 64, "bwd_c_iters": 4,
          "fwd_flat": True, "bwd_flat": True, "k_inner": True, "s_cap_reduced": 1024}


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _eff_strides(x: torch.Tensor):
    # Size-1 dims are broadcast dims: read them with stride 0.
    return [0 if x.shape[d] == 1 else x.stride(d) for d in range(4)]


def _contiguous_cs(x: torch.Tensor, C: int, S: int) -> bool:
    """Whether x's (C, S) dims are full and laid out as one contiguous run of C * S."""
    return tuple(x.shape[2:]) == (C, S) and (S == 1 or x.stride(3) == 1) and (C == 1 or x.stride(2) == S)


def _row_align(S: int, x_strides=None) -> int:
    """The largest power of two up to 16 dividing S and, given an operand's (k, b, c,
    s) strides, its k, b and c strides; 1 when that operand is not contiguous over S.
    The tiled kernels' ALIGN* hints: with them rows of S = 196 load in vectors."""
    if x_strides is not None and x_strides[3] != 1:
        return 1
    return pow2_divisor(S, *(x_strides[:3] if x_strides is not None else ()))


def _plan(K, B, C, S, normalize, s_reduced, tile, c_iters=1):
    """Block sizes and the program grid for a [K, B, C, S] problem.

    The whole of C is walked by one program when the norm over C is needed;
    otherwise each program takes ``c_iters`` BLOCK_C chunks.  When an operand is
    broadcast over S (e.g. a [B, D, 1, 1] textual parameter), one block spans
    all of S so its gradient is reduced without atomics.
    """
    cap_s = CONFIG["s_cap_reduced"] if s_reduced else CONFIG["s_cap"]
    block_s = min(_pow2(S), cap_s)
    block_c = max(1, min(_pow2(C), tile // block_s))
    n_sblk = -(-S // block_s)
    if normalize:
        n_cprog, c_per_prog = 1, C
    else:
        c_per_prog = block_c * c_iters
        n_cprog = -(-C // c_per_prog)
    return block_c, block_s, n_sblk, n_cprog, c_per_prog


def _weight_args(alpha, op_mask, hard):
    """Kernel arguments that define the op weights: alpha [K, 6], the mask pointer
    ([1|K, 6] bool; alpha itself, never read, when there is none) and its node stride."""
    has_mask = op_mask is not None
    return dict(m=op_mask if has_mask else alpha, m_stride_k=6 if has_mask and op_mask.shape[0] > 1 else 0,
                flags=dict(HAS_MASK=has_mask, HARD=hard, A_FP64=alpha.dtype == torch.float64))


def triton_fwd(x1: torch.Tensor, x2: torch.Tensor, alpha: torch.Tensor, op_mask: torch.Tensor | None,
               hard: bool, normalize: bool) -> torch.Tensor:
    """x1, x2 canonical 4-D; alpha [K, 6] (float32/float64); op_mask None or bool [1|K, 6].
    The weights (softmax or one-hot of alpha, times the mask) are made in the kernel."""
    K, B, C, S = full4(x1, x2, alpha)
    out = torch.empty((K, B, C, S), dtype=x1.dtype, device=x1.device)
    if out.numel() == 0:
        return out
    wa = _weight_args(alpha, op_mask, hard)
    if CONFIG["fwd_flat"] and not normalize and C * S < 2 ** 31:  # (flat kernels index a slice in int32)
        contig1, contig2 = _contiguous_cs(x1, C, S), _contiguous_cs(x2, C, S)
        n_blk = -(-(C * S) // CONFIG["fwd_tile"])
        wrap_triton(mixed_node_fwd_flat_kernel)[(K * B * n_blk,)](
            x1, x2, alpha, wa["m"], out, K, B, C * S, n_blk, wa["m_stride_k"],
            *_eff_strides(x1), *_eff_strides(x2), S=1 if contig1 and contig2 else S, CONTIG1=contig1,
            CONTIG2=contig2, **wa["flags"], IS_FP64=x1.dtype == torch.float64,
            BLOCK=CONFIG["fwd_tile"], num_warps=CONFIG["fwd_warps"])
        return out
    block_c, block_s, n_sblk, n_cprog, c_per_prog = _plan(K, B, C, S, normalize, False, CONFIG["fwd_tile"])
    grid = (K * B * n_cprog * n_sblk,)
    st1, st2 = _eff_strides(x1), _eff_strides(x2)
    wrap_triton(mixed_node_fwd_kernel)[grid](
        x1, x2, alpha, wa["m"], out, K, B, C, S, n_sblk, n_cprog, c_per_prog, wa["m_stride_k"],
        *st1, *st2, **wa["flags"],
        NORMALIZE=normalize, IS_FP64=x1.dtype == torch.float64, EPS=NORM_EPS,
        BLOCK_C=block_c, BLOCK_S=block_s, ALIGN_S=_row_align(S), ALIGN1=_row_align(S, st1),
        ALIGN2=_row_align(S, st2), num_warps=CONFIG["fwd_warps"],
    )
    return out


def _grad_layout(x, full, need, n_sblk, n_cprog, k_inner, acc_dtype):
    """Where an operand's gradient goes and how it is reduced.

    Returns (buffer, strides, red_k, red_c, red_s, atomic).  Dims the operand
    is broadcast over are reduced: over K in registers when one program walks
    all nodes (k_inner), over C/S inside a program where it spans them, and
    with atomics into an fp32/fp64 buffer where the sum spans programs.
    """
    if not need:
        return x.new_empty((1,)), [0, 0, 0, 0], False, False, False, False
    bk, bb, bc, bs = (x.shape[d] == 1 and full[d] > 1 for d in range(4))
    red_k = bk and k_inner
    atomic = (bk and not k_inner) or bb or (bs and n_sblk > 1) or (bc and n_cprog > 1)
    buf = torch.zeros(x.shape, dtype=acc_dtype, device=x.device) if atomic else \
        torch.empty(x.shape, dtype=x.dtype, device=x.device)
    strides = [0 if x.shape[d] == 1 else buf.stride(d) for d in range(4)]
    return buf, strides, red_k, bc, bs, atomic


def triton_bwd(grad: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor, alpha: torch.Tensor,
               op_mask: torch.Tensor | None, hard: bool, normalize: bool, need_dx1: bool, need_dx2: bool,
               need_dalpha: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx1, dx2 (empty when not needed) and dalpha [K, 6] in alpha's dtype (soft mode
    only; empty when not needed or hard): one pass over the inputs, then one tiny
    kernel that sums the per-program partial sums and applies softmax's backward."""
    full = K, B, C, S = full4(x1, x2, alpha)
    acc = torch.float64 if x1.dtype == torch.float64 else torch.float32
    need_dalpha = need_dalpha and not hard
    if grad.numel() == 0:
        return (x1.new_zeros(x1.shape if need_dx1 else (0,)), x2.new_zeros(x2.shape if need_dx2 else (0,)),
                torch.zeros_like(alpha) if need_dalpha else alpha.new_empty((0,)))
    wa = _weight_args(alpha, op_mask, hard)
    if CONFIG["bwd_flat"] and not normalize and C * S < 2 ** 31 and all(
            x.shape[1] == B and x.shape[2] == C for x in (x1, x2)):
        return _flat_bwd(grad, x1, x2, alpha, wa, full, acc, need_dx1, need_dx2, need_dalpha)
    needed = [x for x, need in ((x1, need_dx1), (x2, need_dx2)) if need]
    s_reduced = any(x.shape[3] == 1 and S > 1 for x in needed)
    k_inner = CONFIG["k_inner"] and not normalize and K > 1 and any(x.shape[0] == 1 for x in needed)
    # K_INNER sums node-shared gradients over one C chunk in registers: one chunk a program
    c_iters = 1 if k_inner else CONFIG["bwd_c_iters"]
    block_c, block_s, n_sblk, n_cprog, c_per_prog = _plan(K, B, C, S, normalize, s_reduced, CONFIG["bwd_tile"],
                                                          c_iters)
    n_per_k = B * n_cprog * n_sblk
    g1, st1, rk1, rc1, rs1, at1 = _grad_layout(x1, full, need_dx1, n_sblk, n_cprog, k_inner, acc)
    g2, st2, rk2, rc2, rs2, at2 = _grad_layout(x2, full, need_dx2, n_sblk, n_cprog, k_inner, acc)
    dw_part = torch.empty((K * n_per_k, 6), dtype=acc, device=x1.device)
    grid = (n_per_k if k_inner else K * n_per_k,)
    e1, e2 = _eff_strides(x1), _eff_strides(x2)
    wrap_triton(mixed_node_bwd_kernel)[grid](
        grad, x1, x2, alpha, wa["m"], g1, g2, dw_part, K, B, C, S, n_sblk, n_cprog, c_per_prog, wa["m_stride_k"],
        *e1, *e2, *st1, *st2,
        NEED1=need_dx1, RED1_K=rk1, RED1_C=rc1, RED1_S=rs1, ATOMIC1=at1,
        NEED2=need_dx2, RED2_K=rk2, RED2_C=rc2, RED2_S=rs2, ATOMIC2=at2, **wa["flags"],
        K_INNER=k_inner, NORMALIZE=normalize, IS_FP64=x1.dtype == torch.float64, EPS=NORM_EPS,
        BLOCK_C=block_c, BLOCK_S=block_s, ALIGN_S=_row_align(S), ALIGN1=_row_align(S, e1),
        ALIGN2=_row_align(S, e2), DALIGN1=_row_align(S, st1), DALIGN2=_row_align(S, st2),
        num_warps=CONFIG["bwd_warps"],
    )
    dx1 = g1.to(x1.dtype) if need_dx1 else x1.new_empty((0,))
    dx2 = g2.to(x2.dtype) if need_dx2 else x2.new_empty((0,))
    return dx1, dx2, _dalpha(dw_part, alpha, wa, n_per_k) if need_dalpha else alpha.new_empty((0,))


def _flat_bwd(grad, x1, x2, alpha, wa, full, acc, need_dx1, need_dx2, need_dalpha):
    """The flat backward (mixed_node_bwd_flat_kernel): operands full over (B, C),
    each either per node or shared by the K nodes, and full or broadcast over S."""
    K, B, C, S = full
    tile = CONFIG["bwd_tile"]
    n_blk = -(-(C * S) // tile)
    contig1, contig2 = _contiguous_cs(x1, C, S), _contiguous_cs(x2, C, S)
    shared = [x.shape[0] == 1 and K > 1 for x in (x1, x2)]
    grads = []
    for x, need, sh in ((x1, need_dx1, shared[0]), (x2, need_dx2, shared[1])):
        # written element-wise over [K or 1, B, C, S]: in x's dtype when that is x's
        # shape, else in the accumulation dtype, summed over S below
        gshape = (1 if sh else K, B, C, S)
        grads.append(torch.empty(gshape, dtype=x.dtype if tuple(x.shape) == gshape else acc, device=x.device)
                     if need else x)
    n_per_k = B * n_blk
    dw_part = torch.empty((K * n_per_k, 6), dtype=acc, device=x1.device)
    grid = (n_per_k if any(shared) else K * n_per_k,)
    wrap_triton(mixed_node_bwd_flat_kernel)[grid](
        grad, x1, x2, alpha, wa["m"], grads[0], grads[1], dw_part, K, B, C * S, n_blk, wa["m_stride_k"],
        *_eff_strides(x1), *_eff_strides(x2), S=1 if contig1 and contig2 else S, CONTIG1=contig1,
        CONTIG2=contig2, NEED1=need_dx1, NEED2=need_dx2, SHARED1=shared[0], SHARED2=shared[1], **wa["flags"],
        IS_FP64=x1.dtype == torch.float64, BLOCK=tile, num_warps=CONFIG["bwd_warps"])
    out = []
    for x, need, gbuf in ((x1, need_dx1, grads[0]), (x2, need_dx2, grads[1])):
        if not need:
            out.append(x.new_empty((0,)))
        elif gbuf.shape == x.shape:
            out.append(gbuf.to(x.dtype))
        else:  # broadcast over S
            out.append(gbuf.sum(3, keepdim=True).to(x.dtype))
    return out[0], out[1], _dalpha(dw_part, alpha, wa, n_per_k) if need_dalpha else alpha.new_empty((0,))


def _dalpha(dw_part, alpha, wa, n_per_k):
    """dalpha [K, 6] from the backward's per-program partial sums (one tiny kernel)."""
    dalpha = torch.empty_like(alpha)
    wrap_triton(mixed_node_dalpha_kernel)[(alpha.shape[0],)](
        dw_part, alpha, wa["m"], dalpha, n_per_k, wa["m_stride_k"], HAS_MASK=wa["flags"]["HAS_MASK"],
        A_FP64=wa["flags"]["A_FP64"], BLOCK_P=min(_pow2(n_per_k), 1024))
    return dalpha


# Registered for torch.compile (which traces into the kernels); eager calls run
# triton_fwd/triton_bwd through fastmod.ops._eager (no dispatcher on the way).
mixed_node_triton_fwd = triton_op("fastmod::mixed_node_triton_fwd", mutates_args=())(triton_fwd)
mixed_node_triton_bwd = triton_op("fastmod::mixed_node_triton_bwd", mutates_args=())(triton_bwd)
