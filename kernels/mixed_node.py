"""Triton kernels of LNMN's mixed node: out = sum_i w_i * op_i(x1, x2).

Both kernels work on the canonical 4-D view [K, B, C, S] built by
``fastmod.ops.mixed_node``: node, batch, channel, flattened spatial.  Operands
reach the kernel with their own strides, 0 on broadcast dims, so broadcast
operands are never materialised.  One program owns one (k, b) row and a block
of S positions, and walks a range of C in BLOCK_C chunks: the whole of C when
the output is L2-normalised over channels (the norm needs it), one chunk
otherwise.  Arithmetic is fp32 (fp64 for fp64 inputs).

The op weights w = softmax(alpha) (or one-hot at argmax in hard mode), times the
op mask, are computed from alpha inside each program (six values), so the forward
is one launch; ``mixed_node_dalpha_kernel`` turns the backward's per-program
partial sums into dalpha in one more, tiny, launch.  Weights are computed in fp32
(fp64 for fp64 alpha), as ``fastmod.ops.mixed_node_weights`` does.
"""
import triton
import triton.language as tl

from ._hints import known_multiple


@triton.jit
def _upcast(x, IS_FP64: tl.constexpr):
    if IS_FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def _take_if_larger(best, idx, a, i):
    # argmax step with torch.argmax's rules: the first maximum wins, NaN counts as the largest.
    take = (a > best) | ((a != a) & (best == best))
    return tl.where(take, a, best), tl.where(take, i, idx)


@triton.jit
def _softmax6(a0, a1, a2, a3, a4, a5, HARD: tl.constexpr):
    """softmax of one node's six alphas (HARD: one-hot at the argmax)."""
    if HARD:
        best, idx = _take_if_larger(a0, 0, a1, 1)
        best, idx = _take_if_larger(best, idx, a2, 2)
        best, idx = _take_if_larger(best, idx, a3, 3)
        best, idx = _take_if_larger(best, idx, a4, 4)
        best, idx = _take_if_larger(best, idx, a5, 5)
        return (tl.where(idx == 0, 1.0, 0.0), tl.where(idx == 1, 1.0, 0.0), tl.where(idx == 2, 1.0, 0.0),
                tl.where(idx == 3, 1.0, 0.0), tl.where(idx == 4, 1.0, 0.0), tl.where(idx == 5, 1.0, 0.0))
    else:
        mx = tl.maximum(tl.maximum(tl.maximum(a0, a1), tl.maximum(a2, a3)), tl.maximum(a4, a5))
        e0 = tl.exp(a0 - mx)
        e1 = tl.exp(a1 - mx)
        e2 = tl.exp(a2 - mx)
        e3 = tl.exp(a3 - mx)
        e4 = tl.exp(a4 - mx)
        e5 = tl.exp(a5 - mx)
        inv = 1.0 / (e0 + e1 + e2 + e3 + e4 + e5)
        return e0 * inv, e1 * inv, e2 * inv, e3 * inv, e4 * inv, e5 * inv


@triton.jit
def _node_probs(a_ptr, k, HARD: tl.constexpr, A_FP64: tl.constexpr):
    base = a_ptr + k * 6
    return _softmax6(_upcast(tl.load(base + 0), A_FP64), _upcast(tl.load(base + 1), A_FP64),
                     _upcast(tl.load(base + 2), A_FP64), _upcast(tl.load(base + 3), A_FP64),
                     _upcast(tl.load(base + 4), A_FP64), _upcast(tl.load(base + 5), A_FP64), HARD)


@triton.jit
def _masked(p, m_ptr, i, HAS_MASK: tl.constexpr):
    if HAS_MASK:
        return p * (tl.load(m_ptr + i) != 0).to(p.dtype)  # p * mask, as mixed_node_weights
    else:
        return p


@triton.jit
def _load_weights(a_ptr, m_ptr, k, m_stride_k, HAS_MASK: tl.constexpr, HARD: tl.constexpr,
                  A_FP64: tl.constexpr, IS_FP64: tl.constexpr):
    """Node k's six op weights, in the inputs' arithmetic dtype."""
    p0, p1, p2, p3, p4, p5 = _node_probs(a_ptr, k, HARD, A_FP64)
    mk = m_ptr + k * m_stride_k
    w0 = _upcast(_masked(p0, mk, 0, HAS_MASK), IS_FP64)
    w1 = _upcast(_masked(p1, mk, 1, HAS_MASK), IS_FP64)
    w2 = _upcast(_masked(p2, mk, 2, HAS_MASK), IS_FP64)
    w3 = _upcast(_masked(p3, mk, 3, HAS_MASK), IS_FP64)
    w4 = _upcast(_masked(p4, mk, 4, HAS_MASK), IS_FP64)
    w5 = _upcast(_masked(p5, mk, 5, HAS_MASK), IS_FP64)
    return w0, w1, w2, w3, w4, w5


@triton.jit
def _load_pair(p1, p2, c, s1c, s2c, m, IS_FP64: tl.constexpr):
    # One [BLOCK_C, BLOCK_S] tile of each operand, upcast for arithmetic.
    a = _upcast(tl.load(p1 + c * s1c, mask=m, other=0.0), IS_FP64)
    b = _upcast(tl.load(p2 + c * s2c, mask=m, other=0.0), IS_FP64)
    return a, b


@triton.jit
def _min_max(a, b):
    # NaN propagates like torch.minimum / torch.maximum.
    a_nan = a != a
    mn = tl.where((a < b) | a_nan, a, b)
    mx = tl.where((a > b) | a_nan, a, b)
    return mn, mx


@triton.jit
def _mix(a, b, w0, w1, w2, w3, w4, w5):
    # A zero weight skips its op entirely, so 0 * inf never turns into NaN
    # (hard mode and op_mask rely on it).
    mn, mx = _min_max(a, b)
    u = tl.where(w0 != 0, w0 * mn, 0.0)
    u += tl.where(w1 != 0, w1 * mx, 0.0)
    u += tl.where(w2 != 0, w2 * (a + b), 0.0)
    u += tl.where(w3 != 0, w3 * (a * b), 0.0)
    u += tl.where(w4 != 0, w4 * a, 0.0)
    u += tl.where(w5 != 0, w5 * b, 0.0)
    return u


@triton.jit
def _input_coef(a, b, eq, w0, w1, w2, w3, w_choose):
    # d(node)/d(a) for the operand a (the other being b): min and max split the
    # gradient at ties exactly like torch.minimum/maximum's derivatives.
    m = tl.where(eq, 0.5, tl.where(a > b, 0.0, 1.0))
    M = tl.where(eq, 0.5, tl.where(a < b, 0.0, 1.0))
    c = tl.where(w0 != 0, w0 * m, 0.0) + tl.where(w1 != 0, w1 * M, 0.0) + tl.where(w2 != 0, w2, 0.0)
    return c + tl.where(w3 != 0, w3 * b, 0.0) + tl.where(w_choose != 0, w_choose, 0.0)


@triton.jit
def _finish_k_reduced(t, q, cvec, offs_s, m, mask_s, RED_C: tl.constexpr, RED_S: tl.constexpr,
                      ATOMIC: tl.constexpr, C_STRIDE, S_STRIDE, C_HI):
    acc = _grad_chunk(t, q, cvec, offs_s, m, tl.zeros_like(mask_s.to(t.dtype)), RED_C, RED_S, ATOMIC,
                      C_STRIDE, S_STRIDE, C_HI)
    _flush_grad(q, acc, offs_s, mask_s, RED_C, RED_S, ATOMIC, S_STRIDE)


@triton.jit
def _row_coords(pid, K, n_sblk, n_cprog, BLOCK_S: tl.constexpr):
    # 1-D grid (grid dims 1 and 2 are capped at 65535): pid -> (k, b, c-program,
    # s-block), k fastest so the K programs reading a node-shared operand's tile
    # run together and hit it in L2.
    k = pid % K
    rest = pid // K
    s_blk = rest % n_sblk
    rest = rest // n_sblk
    c_prog = rest % n_cprog
    b = rest // n_cprog
    offs_s = s_blk * BLOCK_S + tl.arange(0, BLOCK_S)
    return k, b, c_prog, offs_s


@triton.jit
def mixed_node_fwd_kernel(
    x1_ptr, x2_ptr, a_ptr, m_ptr, out_ptr,
    K, B, C, S, n_sblk, n_cprog, c_per_prog, m_stride_k,
    s1k, s1b, s1c, s1s, s2k, s2b, s2c, s2s,
    HAS_MASK: tl.constexpr, HARD: tl.constexpr, A_FP64: tl.constexpr,
    NORMALIZE: tl.constexpr, IS_FP64: tl.constexpr, EPS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ALIGN_S: tl.constexpr = 1, ALIGN1: tl.constexpr = 1, ALIGN2: tl.constexpr = 1,
):
    # ALIGN_S: a power of two dividing S; ALIGN1/2: one dividing x1's/x2's k, b and c
    # strides when its s stride is 1 (else 1).  Rows then start aligned, which the
    # compiler cannot see for S = 196 on its own, and load and store in vectors.
    S = known_multiple(S, ALIGN_S)
    s1k, s1b, s1c = known_multiple(s1k, ALIGN1), known_multiple(s1b, ALIGN1), known_multiple(s1c, ALIGN1)
    s2k, s2b, s2c = known_multiple(s2k, ALIGN2), known_multiple(s2b, ALIGN2), known_multiple(s2c, ALIGN2)
    pid = tl.program_id(0).to(tl.int64)
    k, b, c_prog, offs_s = _row_coords(pid, K, n_sblk, n_cprog, BLOCK_S)
    mask_s = offs_s < S
    w0, w1, w2, w3, w4, w5 = _load_weights(a_ptr, m_ptr, k, m_stride_k, HAS_MASK, HARD, A_FP64, IS_FP64)
    p1 = x1_ptr + k * s1k + b * s1b + offs_s[None, :] * s1s
    p2 = x2_ptr + k * s2k + b * s2b + offs_s[None, :] * s2s
    po = out_ptr + (k * B + b) * C * S + offs_s[None, :]
    c_lo = c_prog * c_per_prog
    c_hi = tl.minimum(c_lo + c_per_prog, C)
    cs = tl.arange(0, BLOCK_C)[:, None]

    if NORMALIZE:
        # Pass 1: squared norm over channels; pass 2 recomputes and scales.
        sq = tl.zeros([BLOCK_S], dtype=tl.float64 if IS_FP64 else tl.float32)
        for c0 in range(c_lo, c_hi, BLOCK_C):
            c = c0 + cs
            m = (c < c_hi) & mask_s[None, :]
            a, bb = _load_pair(p1, p2, c, s1c, s2c, m, IS_FP64)
            u = _mix(a, bb, w0, w1, w2, w3, w4, w5)
            sq += tl.sum(u * u, axis=0)
        inv = 1.0 / tl.maximum(tl.sqrt(sq), EPS)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        c = c0 + cs
        m = (c < c_hi) & mask_s[None, :]
        a, bb = _load_pair(p1, p2, c, s1c, s2c, m, IS_FP64)
        u = _mix(a, bb, w0, w1, w2, w3, w4, w5)
        if NORMALIZE:
            u = u * inv[None, :]
        tl.store(po + c * S, u.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _flat_coords(K, CS, n_blk, BLOCK: tl.constexpr):
    """The flat kernels' program -> (node k, sample b, block, element indices of the
    slice's C * S, in-range mask); k fastest, as in _row_coords."""
    pid = tl.program_id(0).to(tl.int64)
    k = pid % K
    rest = pid // K
    blk = rest % n_blk
    # int32 within a slice (the wrappers keep C * S < 2^31): cheaper index arithmetic
    flat = blk.to(tl.int32) * BLOCK + tl.arange(0, BLOCK)
    return k, rest // n_blk, blk, flat, flat < CS


@triton.jit
def _flat_operand(ptr, flat, S: tl.constexpr, sc, ss, CONTIG: tl.constexpr):
    # Element `flat` = c * S + s of one (k, b) slice: written as ptr + flat when the
    # operand is contiguous over (C, S), so Triton sees contiguous, aligned runs and
    # vectorises; else through its (possibly 0 = broadcast) strides.  S is a
    # compile-time constant, so // and % become a multiply and shifts (a division by
    # a run-time S cost ~50 more instructions per element on sm_90).
    if CONTIG:
        return ptr + flat
    return ptr + (flat // S) * sc + (flat % S) * ss


@triton.jit
def _flat_load(ptr, flat, m, S: tl.constexpr, sc, ss, CONTIG: tl.constexpr, IS_FP64: tl.constexpr):
    return _upcast(tl.load(_flat_operand(ptr, flat, S, sc, ss, CONTIG), mask=m, other=0.0), IS_FP64)


@triton.jit
def _flat_grad(d, acc, ptr, m, SHARED: tl.constexpr):
    # One node's gradient of an operand: stored at once, or, for an operand shared by
    # the nodes, added to the sum over them (stored after the node loop).
    if SHARED:
        acc += d
    else:
        tl.store(ptr, d.to(ptr.dtype.element_ty), mask=m)
    return acc


@triton.jit
def mixed_node_fwd_flat_kernel(
    x1_ptr, x2_ptr, a_ptr, m_ptr, out_ptr,
    K, B, CS, n_blk, m_stride_k,
    s1k, s1b, s1c, s1s, s2k, s2b, s2c, s2s,
    S: tl.constexpr, CONTIG1: tl.constexpr, CONTIG2: tl.constexpr,
    HAS_MASK: tl.constexpr, HARD: tl.constexpr, A_FP64: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The forward without normalize, on 1-D blocks of each (node, sample) slice's
    C * S elements: no padding of short spatial rows (S = 196 in tiles of 128 left
    a quarter of the lanes idle), and contiguous operands and the output are read
    and written in aligned vectors (row starts c * S are not provably aligned).
    S (the spatial size) is only used, as a constant, when an operand is not
    contiguous; pass 1 otherwise, so one compiled kernel serves every S."""
    k, b, blk, flat, m = _flat_coords(K, CS, n_blk, BLOCK)
    w0, w1, w2, w3, w4, w5 = _load_weights(a_ptr, m_ptr, k, m_stride_k, HAS_MASK, HARD, A_FP64, IS_FP64)
    a = _flat_load(x1_ptr + k * s1k + b * s1b, flat, m, S, s1c, s1s, CONTIG1, IS_FP64)
    bb = _flat_load(x2_ptr + k * s2k + b * s2b, flat, m, S, s2c, s2s, CONTIG2, IS_FP64)
    u = _mix(a, bb, w0, w1, w2, w3, w4, w5)
    tl.store(out_ptr + (k * B + b) * CS + flat, u.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _add6(a0, a1, a2, a3, a4, a5, b0, b1, b2, b3, b4, b5):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3, a4 + b4, a5 + b5


@triton.jit
def _store_six_sums(pw, t0, t1, t2, t3, t4, t5):
    # One six-operand reduction rather than six tl.sum calls: one exchange through
    # shared memory and its barriers instead of six.
    if len(t0.shape) == 2:  # a [C, S] tile: its rows first, still as one six-operand reduction
        t0, t1, t2, t3, t4, t5 = tl.reduce((t0, t1, t2, t3, t4, t5), 1, _add6)
    s0, s1, s2, s3, s4, s5 = tl.reduce((t0, t1, t2, t3, t4, t5), 0, _add6)
    tl.store(pw + 0, s0)
    tl.store(pw + 1, s1)
    tl.store(pw + 2, s2)
    tl.store(pw + 3, s3)
    tl.store(pw + 4, s4)
    tl.store(pw + 5, s5)


@triton.jit
def mixed_node_bwd_flat_kernel(
    g_ptr, x1_ptr, x2_ptr, a_ptr, m_ptr, dx1_ptr, dx2_ptr, dw_ptr,
    K, B, CS, n_blk, m_stride_k,
    s1k, s1b, s1c, s1s, s2k, s2b, s2c, s2s,
    S: tl.constexpr, CONTIG1: tl.constexpr, CONTIG2: tl.constexpr,
    NEED1: tl.constexpr, NEED2: tl.constexpr, SHARED1: tl.constexpr, SHARED2: tl.constexpr,
    HAS_MASK: tl.constexpr, HARD: tl.constexpr, A_FP64: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The backward without normalize, on flat 1-D blocks of each (node, sample)
    slice's C * S elements (see mixed_node_fwd_flat_kernel; operands are read as
    there).  Each operand's gradient is written element-wise, contiguous, over the
    full [K, B, C, S] (dx*_ptr; [1, B, C, S] for an operand shared by the K nodes,
    SHARED*, whose gradient is summed over the nodes in registers: then one program
    walks every node of its block).  The wrapper sums, with torch, what an operand
    is broadcast over besides K (S for the textual parameter): one more write and
    read of a full-size buffer, but no per-row reductions in the kernel (the tiled
    kernel's, at S = 196, ran at a quarter of copy bandwidth).  The six dalpha partial
    sums: one row per (node, program), node-major like the tiled kernel's."""
    if SHARED1 or SHARED2:
        pid = tl.program_id(0).to(tl.int64)
        blk = pid % n_blk
        b = pid // n_blk
        flat = blk.to(tl.int32) * BLOCK + tl.arange(0, BLOCK)
        m = flat < CS
        k_lo = 0
        k_hi = K
    else:
        k_lo, b, blk, flat, m = _flat_coords(K, CS, n_blk, BLOCK)
        k_hi = k_lo + 1
    ACC = tl.float64 if IS_FP64 else tl.float32
    if SHARED1:  # the same values for every node: read once
        a = _flat_load(x1_ptr + b * s1b, flat, m, S, s1c, s1s, CONTIG1, IS_FP64)
    if SHARED2:
        bb = _flat_load(x2_ptr + b * s2b, flat, m, S, s2c, s2s, CONTIG2, IS_FP64)
    t1 = tl.zeros([BLOCK], dtype=ACC)
    t2 = tl.zeros([BLOCK], dtype=ACC)
    for k in range(k_lo, k_hi):
        w0, w1, w2, w3, w4, w5 = _load_weights(a_ptr, m_ptr, k, m_stride_k, HAS_MASK, HARD, A_FP64, IS_FP64)
        if not SHARED1:
            a = _flat_load(x1_ptr + k * s1k + b * s1b, flat, m, S, s1c, s1s, CONTIG1, IS_FP64)
        if not SHARED2:
            bb = _flat_load(x2_ptr + k * s2k + b * s2b, flat, m, S, s2c, s2s, CONTIG2, IS_FP64)
        row = (k * B + b) * CS  # of grad, and of an unshared operand's gradient
        du = _upcast(tl.load(g_ptr + row + flat, mask=m, other=0.0), IS_FP64)
        mn, mx = _min_max(a, bb)
        pw = dw_ptr + (k * B * n_blk + b * n_blk + blk) * 6
        _store_six_sums(pw, du * mn, du * mx, du * (a + bb), du * (a * bb), du * a, du * bb)
        eq = a == bb
        if NEED1:
            t1 = _flat_grad(du * _input_coef(a, bb, eq, w0, w1, w2, w3, w4), t1, dx1_ptr + row + flat, m, SHARED1)
        if NEED2:
            t2 = _flat_grad(du * _input_coef(bb, a, eq, w0, w1, w2, w3, w5), t2, dx2_ptr + row + flat, m, SHARED2)
    if NEED1 and SHARED1:
        tl.store(dx1_ptr + b * CS + flat, t1.to(dx1_ptr.dtype.element_ty), mask=m)
    if NEED2 and SHARED2:
        tl.store(dx2_ptr + b * CS + flat, t2.to(dx2_ptr.dtype.element_ty), mask=m)


@triton.jit
def _put_grad(ptr, val, mask, ATOMIC: tl.constexpr):
    if ATOMIC:
        tl.atomic_add(ptr, val, mask=mask)
    else:
        tl.store(ptr, val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_chunk(d, ptr_row, cvec, offs_s, m, acc,
                RED_C: tl.constexpr, RED_S: tl.constexpr, ATOMIC: tl.constexpr,
                C_STRIDE, S_STRIDE, C_HI):
    # One chunk of an operand's gradient.  Reductions over S are finished
    # here; reductions over C accumulate in `acc` and are written once by
    # _flush_grad after the C loop.
    if RED_C:
        acc += tl.sum(d, axis=0)
    else:
        if RED_S:
            _put_grad(ptr_row + cvec * C_STRIDE, tl.sum(d, axis=1), cvec < C_HI, ATOMIC)
        else:
            _put_grad(ptr_row + cvec[:, None] * C_STRIDE + offs_s[None, :] * S_STRIDE, d, m, ATOMIC)
    return acc


@triton.jit
def _flush_grad(ptr_row, acc, offs_s, mask_s,
                RED_C: tl.constexpr, RED_S: tl.constexpr, ATOMIC: tl.constexpr, S_STRIDE):
    if RED_C:
        if RED_S:
            total = tl.sum(acc, axis=0)
            if ATOMIC:
                tl.atomic_add(ptr_row, total)
            else:
                tl.store(ptr_row, total.to(ptr_row.dtype.element_ty))
        else:
            _put_grad(ptr_row + offs_s * S_STRIDE, acc, mask_s, ATOMIC)


@triton.jit
def mixed_node_bwd_kernel(
    g_ptr, x1_ptr, x2_ptr, a_ptr, m_ptr, dx1_ptr, dx2_ptr, dw_ptr,
    K, B, C, S, n_sblk, n_cprog, c_per_prog, m_stride_k,
    s1k, s1b, s1c, s1s, s2k, s2b, s2c, s2s,
    # gradient layouts: strides of dx1/dx2 (0 on reduced dims)
    d1k, d1b, d1c, d1s, d2k, d2b, d2c, d2s,
    NEED1: tl.constexpr, RED1_K: tl.constexpr, RED1_C: tl.constexpr, RED1_S: tl.constexpr,
    ATOMIC1: tl.constexpr,
    NEED2: tl.constexpr, RED2_K: tl.constexpr, RED2_C: tl.constexpr, RED2_S: tl.constexpr,
    ATOMIC2: tl.constexpr,
    HAS_MASK: tl.constexpr, HARD: tl.constexpr, A_FP64: tl.constexpr,
    K_INNER: tl.constexpr, NORMALIZE: tl.constexpr, IS_FP64: tl.constexpr, EPS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ALIGN_S: tl.constexpr = 1, ALIGN1: tl.constexpr = 1, ALIGN2: tl.constexpr = 1,
    DALIGN1: tl.constexpr = 1, DALIGN2: tl.constexpr = 1,
):
    # K_INNER: one program walks all K nodes of its (b, C-chunk, S-block), so an
    # operand shared by the nodes (RED*_K) sums its gradient in registers
    # instead of with atomics.  Only used without NORMALIZE (one C chunk).
    # ALIGN*: see mixed_node_fwd_kernel; DALIGN* likewise for the gradients' strides.
    S = known_multiple(S, ALIGN_S)
    s1k, s1b, s1c = known_multiple(s1k, ALIGN1), known_multiple(s1b, ALIGN1), known_multiple(s1c, ALIGN1)
    s2k, s2b, s2c = known_multiple(s2k, ALIGN2), known_multiple(s2b, ALIGN2), known_multiple(s2c, ALIGN2)
    d1k, d1b, d1c = known_multiple(d1k, DALIGN1), known_multiple(d1b, DALIGN1), known_multiple(d1c, DALIGN1)
    d2k, d2b, d2c = known_multiple(d2k, DALIGN2), known_multiple(d2b, DALIGN2), known_multiple(d2c, DALIGN2)
    pid = tl.program_id(0).to(tl.int64)
    s_blk = pid % n_sblk
    rest = pid // n_sblk
    c_prog = rest % n_cprog
    rest = rest // n_cprog
    if K_INNER:
        b = rest
        k_lo = 0
        k_hi = K
    else:
        b = rest % B
        k_lo = rest // B
        k_hi = k_lo + 1
    offs_s = s_blk * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    c_lo = c_prog * c_per_prog
    c_hi = tl.minimum(c_lo + c_per_prog, C)
    cs = tl.arange(0, BLOCK_C)[:, None]
    ACC = tl.float64 if IS_FP64 else tl.float32
    prog_in_k = (b * n_cprog + c_prog) * n_sblk + s_blk
    t1 = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
    t2 = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)

    for k in range(k_lo, k_hi):
        w0, w1, w2, w3, w4, w5 = _load_weights(a_ptr, m_ptr, k, m_stride_k, HAS_MASK, HARD, A_FP64, IS_FP64)
        p1 = x1_ptr + k * s1k + b * s1b + offs_s[None, :] * s1s
        p2 = x2_ptr + k * s2k + b * s2b + offs_s[None, :] * s2s
        pg = g_ptr + (k * B + b) * C * S + offs_s[None, :]
        q1 = dx1_ptr + k * d1k + b * d1b
        q2 = dx2_ptr + k * d2k + b * d2b
        if NORMALIZE:
            # Pass 1: ||u|| and <grad, u> per position (nothing was saved in forward).
            sq = tl.zeros([BLOCK_S], dtype=ACC)
            dot = tl.zeros([BLOCK_S], dtype=ACC)
            for c0 in range(c_lo, c_hi, BLOCK_C):
                c = c0 + cs
                m = (c < c_hi) & mask_s[None, :]
                a, bb = _load_pair(p1, p2, c, s1c, s2c, m, IS_FP64)
                g = _upcast(tl.load(pg + c * S, mask=m, other=0.0), IS_FP64)
                u = _mix(a, bb, w0, w1, w2, w3, w4, w5)
                sq += tl.sum(u * u, axis=0)
                dot += tl.sum(g * u, axis=0)
            nrm = tl.sqrt(sq)
            inv = 1.0 / tl.maximum(nrm, EPS)
            # Below eps the denominator is the constant eps: no gradient through the norm.
            coef = tl.where(nrm > EPS, dot * inv * inv * inv, 0.0)

        acc1 = tl.zeros([BLOCK_S], dtype=ACC)
        acc2 = tl.zeros([BLOCK_S], dtype=ACC)
        # dw partial sums, element-wise over the whole tile: one reduction each at the
        # end instead of one per C chunk (masked lanes hold du = 0)
        g0 = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
        g1 = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
        g2 = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
        g3 = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
        g4 = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
        g5 = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
        for c0 in range(c_lo, c_hi, BLOCK_C):
            cvec = c0 + tl.arange(0, BLOCK_C)
            c = cvec[:, None]
            m = (c < c_hi) & mask_s[None, :]
            a, bb = _load_pair(p1, p2, c, s1c, s2c, m, IS_FP64)
            du = _upcast(tl.load(pg + c * S, mask=m, other=0.0), IS_FP64)
            mn, mx = _min_max(a, bb)
            if NORMALIZE:
                u = _mix(a, bb, w0, w1, w2, w3, w4, w5)
                du = du * inv[None, :] - u * coef[None, :]
            # Partial sums for dw: g_i = sum du * op_i.
            g0 += du * mn
            g1 += du * mx
            g2 += du * (a + bb)
            g3 += du * (a * bb)
            g4 += du * a
            g5 += du * bb
            eq = a == bb
            if NEED1:
                d1 = tl.where(m, du * _input_coef(a, bb, eq, w0, w1, w2, w3, w4), 0.0)
                if RED1_K:
                    t1 += d1
                else:
                    acc1 = _grad_chunk(d1, q1, cvec, offs_s, m, acc1, RED1_C, RED1_S, ATOMIC1, d1c, d1s, c_hi)
            if NEED2:
                d2 = tl.where(m, du * _input_coef(bb, a, eq, w0, w1, w2, w3, w5), 0.0)
                if RED2_K:
                    t2 += d2
                else:
                    acc2 = _grad_chunk(d2, q2, cvec, offs_s, m, acc2, RED2_C, RED2_S, ATOMIC2, d2c, d2s, c_hi)
        if NEED1 and not RED1_K:
            _flush_grad(q1, acc1, offs_s, mask_s, RED1_C, RED1_S, ATOMIC1, d1s)
        if NEED2 and not RED2_K:
            _flush_grad(q2, acc2, offs_s, mask_s, RED2_C, RED2_S, ATOMIC2, d2s)
        # One row of 6 partial sums per (node, program); summed per node on the host side.
        pw = dw_ptr + (k * B * n_cprog * n_sblk + prog_in_k) * 6
        _store_six_sums(pw, g0, g1, g2, g3, g4, g5)

    # Gradients of node-shared operands, summed over K in registers (K_INNER only:
    # a single C chunk, so cvec/m below are that chunk's).
    cvec = c_lo + tl.arange(0, BLOCK_C)
    m = (cvec[:, None] < c_hi) & mask_s[None, :]
    if NEED1 and RED1_K:
        _finish_k_reduced(t1, dx1_ptr + b * d1b, cvec, offs_s, m, mask_s, RED1_C, RED1_S, ATOMIC1, d1c, d1s, c_hi)
    if NEED2 and RED2_K:
        _finish_k_reduced(t2, dx2_ptr + b * d2b, cvec, offs_s, m, mask_s, RED2_C, RED2_S, ATOMIC2, d2c, d2s, c_hi)


@triton.jit
def _part_sum(part_ptr, rows, i, n_part, BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    # Sum of column i of one node's [n_part, 6] partial sums.
    acc = tl.zeros([BLOCK_P], dtype=ACC)
    for p0 in range(0, n_part, BLOCK_P):
        p = p0 + rows
        acc += tl.load(part_ptr + p * 6 + i, mask=p < n_part, other=0.0).to(ACC)
    return tl.sum(acc, axis=0)


@triton.jit
def mixed_node_dalpha_kernel(part_ptr, a_ptr, m_ptr, da_ptr, n_part, m_stride_k,
                             HAS_MASK: tl.constexpr, A_FP64: tl.constexpr, BLOCK_P: tl.constexpr):
    """One program per node: g_i = the node's summed partial sums (zero where w_i = 0),
    dalpha = p * (g - <p, g>) with p = softmax(alpha), w = p * mask (soft mode only)."""
    k = tl.program_id(0).to(tl.int64)
    ACC = tl.float64 if A_FP64 else tl.float32
    rows = tl.arange(0, BLOCK_P)
    base = part_ptr + k * n_part * 6
    g0 = _part_sum(base, rows, 0, n_part, BLOCK_P, ACC)
    g1 = _part_sum(base, rows, 1, n_part, BLOCK_P, ACC)
    g2 = _part_sum(base, rows, 2, n_part, BLOCK_P, ACC)
    g3 = _part_sum(base, rows, 3, n_part, BLOCK_P, ACC)
    g4 = _part_sum(base, rows, 4, n_part, BLOCK_P, ACC)
    g5 = _part_sum(base, rows, 5, n_part, BLOCK_P, ACC)
    p0, p1, p2, p3, p4, p5 = _node_probs(a_ptr, k, False, A_FP64)
    mk = m_ptr + k * m_stride_k
    w0 = _masked(p0, mk, 0, HAS_MASK)
    w1 = _masked(p1, mk, 1, HAS_MASK)
    w2 = _masked(p2, mk, 2, HAS_MASK)
    w3 = _masked(p3, mk, 3, HAS_MASK)
    w4 = _masked(p4, mk, 4, HAS_MASK)
    w5 = _masked(p5, mk, 5, HAS_MASK)
    g0 = tl.where(w0 != 0, g0, 0.0)  # zero-weight ops are cut out of the graph
    g1 = tl.where(w1 != 0, g1, 0.0)
    g2 = tl.where(w2 != 0, g2, 0.0)
    g3 = tl.where(w3 != 0, g3, 0.0)
    g4 = tl.where(w4 != 0, g4, 0.0)
    g5 = tl.where(w5 != 0, g5, 0.0)
    dot = p0 * g0 + p1 * g1 + p2 * g2 + p3 * g3 + p4 * g4 + p5 * g5
    out = da_ptr + k * 6
    tl.store(out + 0, (p0 * (g0 - dot)).to(da_ptr.dtype.element_ty))
    tl.store(out + 1, (p1 * (g1 - dot)).to(da_ptr.dtype.element_ty))
    tl.store(out + 2, (p2 * (g2 - dot)).to(da_ptr.dtype.element_ty))
    tl.store(out + 3, (p3 * (g3 - dot)).to(da_ptr.dtype.element_ty))
    tl.store(out + 4, (p4 * (g4 - dot)).to(da_ptr.dtype.element_ty))
    tl.store(out + 5, (p5 * (g5 - dot)).to(da_ptr.dtype.element_ty))
