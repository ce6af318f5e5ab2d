"""Triton kernels of the fused normalisation epilogues (fastmod.ops.fused_norm).

Tensors are contiguous NCHW, seen as rows of HW values: row r = n * C + c.  All
arithmetic is float32 (loads are upcast, stores cast to the output's dtype).

routed BN + ReLU: programs take ROWS rows x BLOCK pixels tiles.  A row whose gate
is 0 is never loaded (masked loads); a program whose rows are all off skips its
loops.  Per-row sums go to [N * C] buffers that the host side reduces over N
(tiny), so no atomics and a deterministic result.
GroupNorm + add + ReLU: one program per (sample, group) block, which is contiguous;
tiles of BLOCK_C channels x BLOCK pixels, so per-channel sums come out of one pass.
Every kernel takes HW_ALIGN, a power of two dividing HW (``_hints``): rows of
14 x 14 = 196 pixels then load in vectors.
"""
import triton
import triton.language as tl

from ._hints import known_multiple


@triton.jit
def _row_tile(gates_ptr, C, HW, G, Cb, n_rows, ROWS: tl.constexpr):
    """Rows of this program, whether each is gated on, and the loop end (0 when no
    row is on, so the loops below do nothing)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    valid = rows < n_rows
    n = rows // C
    g = (rows % C) // Cb
    on = (tl.load(gates_ptr + n * G + g, mask=valid, other=0.0) != 0) & valid
    end = tl.where(tl.max(on.to(tl.int32), axis=0) > 0, HW, 0)
    return rows, on, end


@triton.jit
def _bn_affine(w_ptr, bias_ptr, mean_ptr, var_ptr, eps, c, valid):
    """Per row's channel c: (a, b, mean) with BN + affine = x * a + b, a = w / sqrt(var +
    eps), b = bias - mean * a, in float32.  Computed here rather than on the host (about
    seven small launches per call there); the forward and both backward kernels compute
    them alike, so the backward's recomputed ReLU mask is the forward's exactly."""
    w = tl.load(w_ptr + c, mask=valid, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + c, mask=valid, other=0.0).to(tl.float32)
    mu = tl.load(mean_ptr + c, mask=valid, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + c, mask=valid, other=1.0).to(tl.float32)
    a = w * tl.rsqrt(var + eps)
    return a, bias - mu * a, mu


@triton.jit
def routed_bn_row_stats_kernel(x_ptr, gates_ptr, mean_ptr, m2_ptr, C, HW, G, Cb, n_rows,
                               ROWS: tl.constexpr, BLOCK: tl.constexpr, HW_ALIGN: tl.constexpr = 1):
    """Per row: mean and centred sum of squares (0, 0 for off rows: they are zeros)."""
    HW = known_multiple(HW, HW_ALIGN)
    rows, on, end = _row_tile(gates_ptr, C, HW, G, Cb, n_rows, ROWS)
    base = rows[:, None] * HW
    s = tl.zeros((ROWS,), dtype=tl.float32)
    for start in range(0, end, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        m = on[:, None] & (cols[None, :] < HW)
        s += tl.sum(tl.load(x_ptr + base + cols[None, :], mask=m, other=0.0).to(tl.float32), axis=1)
    mean = s / HW
    q = tl.zeros((ROWS,), dtype=tl.float32)
    for start in range(0, end, BLOCK):  # the second read hits the cache: a row is a few KB
        cols = start + tl.arange(0, BLOCK)
        m = on[:, None] & (cols[None, :] < HW)
        v = tl.load(x_ptr + base + cols[None, :], mask=m, other=0.0).to(tl.float32)
        d = tl.where(m, v - mean[:, None], 0.0)
        q += tl.sum(d * d, axis=1)
    valid = rows < n_rows
    tl.store(mean_ptr + rows, tl.where(on, mean, 0.0), mask=valid)
    tl.store(m2_ptr + rows, tl.where(on, q, 0.0), mask=valid)


@triton.jit
def _sums_over_samples(a_ptr, b_ptr, N, C, c, ok, BLOCK_C: tl.constexpr):
    """sum over n of a[n, c] and of b[n, c] ([N, C] float32 per-row buffers)."""
    sa = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sb = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for n in range(0, N):
        sa += tl.load(a_ptr + n * C + c, mask=ok, other=0.0)
        sb += tl.load(b_ptr + n * C + c, mask=ok, other=0.0)
    return sa, sb


@triton.jit
def routed_bn_stats_finalize_kernel(row_mean_ptr, row_m2_ptr, mean_ptr, var_ptr, N, C, HW,
                                    BLOCK_C: tl.constexpr):
    """Per channel, from the per-row (mean, M2) of routed_bn_row_stats_kernel: the batch
    mean and biased variance by Chan's combination (off rows count as HW zeros: (0, 0)).
    One launch where the torch expressions took about seven."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = c < C
    s, m2 = _sums_over_samples(row_mean_ptr, row_m2_ptr, N, C, c, ok, BLOCK_C)
    mean = s / N
    dev = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for n in range(0, N):  # centred second pass: the row statistics are a few KB, cached
        d = tl.load(row_mean_ptr + n * C + c, mask=ok, other=0.0) - mean
        dev += d * d
    tl.store(mean_ptr + c, mean, mask=ok)
    tl.store(var_ptr + c, (m2 + HW * dev) / (N * HW), mask=ok)


@triton.jit
def routed_bn_relu_apply_kernel(x_ptr, gates_ptr, w_ptr, bias_ptr, mean_ptr, var_ptr, eps, out_ptr, C, HW, G, Cb,
                                n_rows, ROWS: tl.constexpr, BLOCK: tl.constexpr, HW_ALIGN: tl.constexpr = 1):
    """out = relu(x * a[c] + b[c]) on rows gated on, 0 on the others (out may be x)."""
    HW = known_multiple(HW, HW_ALIGN)
    rows, on, _end = _row_tile(gates_ptr, C, HW, G, Cb, n_rows, ROWS)
    valid = rows < n_rows
    c = rows % C
    a, b, _mu = _bn_affine(w_ptr, bias_ptr, mean_ptr, var_ptr, eps, c, valid)
    base = rows[:, None] * HW
    for start in range(0, HW, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = valid[:, None] & (cols[None, :] < HW)
        v = tl.load(x_ptr + base + cols[None, :], mask=inside & on[:, None], other=0.0).to(tl.float32)
        y = v * a[:, None] + b[:, None]
        y = tl.where(y < 0.0, 0.0, y)  # keeps NaN, as torch.relu does
        y = tl.where(on[:, None], y, 0.0)
        tl.store(out_ptr + base + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def routed_bn_relu_bwd_sums_kernel(dy_ptr, x_ptr, gates_ptr, w_ptr, bias_ptr, mean_ptr, var_ptr, eps, s0_ptr,
                                   s1_ptr, C, HW, G, Cb, n_rows, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                                   HW_ALIGN: tl.constexpr = 1):
    """Per row: sum(dz) and sum(dz * (x - mean)), dz = dy where the ReLU passed."""
    HW = known_multiple(HW, HW_ALIGN)
    rows, on, end = _row_tile(gates_ptr, C, HW, G, Cb, n_rows, ROWS)
    valid = rows < n_rows
    c = rows % C
    a, b, mu = _bn_affine(w_ptr, bias_ptr, mean_ptr, var_ptr, eps, c, valid)
    base = rows[:, None] * HW
    s0 = tl.zeros((ROWS,), dtype=tl.float32)
    s1 = tl.zeros((ROWS,), dtype=tl.float32)
    for start in range(0, end, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        m = on[:, None] & (cols[None, :] < HW)
        v = tl.load(x_ptr + base + cols[None, :], mask=m, other=0.0).to(tl.float32)
        g = tl.load(dy_ptr + base + cols[None, :], mask=m, other=0.0).to(tl.float32)
        dz = tl.where((v * a[:, None] + b[:, None]) <= 0.0, 0.0, g)  # NaN passes, as threshold_backward
        dz = tl.where(m, dz, 0.0)
        s0 += tl.sum(dz, axis=1)
        s1 += tl.sum(dz * (v - mu[:, None]), axis=1)
    tl.store(s0_ptr + rows, s0, mask=valid)
    tl.store(s1_ptr + rows, s1, mask=valid)


@triton.jit
def routed_bn_bwd_finalize_kernel(s0_ptr, s1_ptr, w_ptr, var_ptr, eps, k1_ptr, k2_ptr, k3_ptr, dw_ptr, db_ptr,
                                  N, C, count, TRAINING: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per channel, from the per-row sums of routed_bn_relu_bwd_sums_kernel: sdz = sum dz,
    sdzx = sum dz (x - mean); the coefficients of dx = k1 dz + k2 + k3 (x - mean)
    (k1 = w invstd; the batch terms k2, k3 only when the statistics came from the
    batch) and the parameter gradients dw = sdzx invstd, db = sdz.  One launch where
    the torch expressions took about a dozen."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = c < C
    sdz, sdzx = _sums_over_samples(s0_ptr, s1_ptr, N, C, c, ok, BLOCK_C)
    invstd = tl.rsqrt(tl.load(var_ptr + c, mask=ok, other=1.0).to(tl.float32) + eps)
    k1 = tl.load(w_ptr + c, mask=ok, other=0.0).to(tl.float32) * invstd
    if TRAINING:
        k2 = -k1 * sdz / count
        k3 = -k1 * invstd * invstd * sdzx / count
    else:
        k2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        k3 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    tl.store(k1_ptr + c, k1, mask=ok)
    tl.store(k2_ptr + c, k2, mask=ok)
    tl.store(k3_ptr + c, k3, mask=ok)
    tl.store(dw_ptr + c, (sdzx * invstd).to(dw_ptr.dtype.element_ty), mask=ok)
    tl.store(db_ptr + c, sdz.to(db_ptr.dtype.element_ty), mask=ok)


@triton.jit
def routed_bn_relu_bwd_apply_kernel(dy_ptr, x_ptr, gates_ptr, w_ptr, bias_ptr, mean_ptr, var_ptr, eps, k1_ptr,
                                    k2_ptr, k3_ptr, dx_ptr, C, HW, G, Cb, n_rows, ROWS: tl.constexpr,
                                    BLOCK: tl.constexpr, HW_ALIGN: tl.constexpr = 1):
    """dx = k1 * dz + k2 + k3 * (x - mean) on rows gated on, 0 on the others."""
    HW = known_multiple(HW, HW_ALIGN)
    rows, on, _end = _row_tile(gates_ptr, C, HW, G, Cb, n_rows, ROWS)
    valid = rows < n_rows
    c = rows % C
    a, b, mu = _bn_affine(w_ptr, bias_ptr, mean_ptr, var_ptr, eps, c, valid)
    a, b, mu = a[:, None], b[:, None], mu[:, None]
    k1 = tl.load(k1_ptr + c, mask=valid, other=0.0)[:, None]
    k2 = tl.load(k2_ptr + c, mask=valid, other=0.0)[:, None]
    k3 = tl.load(k3_ptr + c, mask=valid, other=0.0)[:, None]
    base = rows[:, None] * HW
    for start in range(0, HW, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = valid[:, None] & (cols[None, :] < HW)
        m = inside & on[:, None]
        v = tl.load(x_ptr + base + cols[None, :], mask=m, other=0.0).to(tl.float32)
        g = tl.load(dy_ptr + base + cols[None, :], mask=m, other=0.0).to(tl.float32)
        dz = tl.where((v * a + b) <= 0.0, 0.0, g)
        dx = tl.where(m, k1 * dz + k2 + k3 * (v - mu), 0.0)
        tl.store(dx_ptr + base + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _group_tile(c0, start, Cg, HW, BLOCK_C: tl.constexpr, BLOCK: tl.constexpr):
    """Offsets (within the block) and mask of one tile of channels c0 ... (within the group)."""
    ch = c0 + tl.arange(0, BLOCK_C)
    cols = start + tl.arange(0, BLOCK)
    m = (ch[:, None] < Cg) & (cols[None, :] < HW)
    return ch[:, None] * HW + cols[None, :], m


@triton.jit
def gn_add_relu_fwd_kernel(x_ptr, r_ptr, w_ptr, b_ptr, out_ptr, mean_ptr, rstd_ptr, C, HW, G, Cg, eps,
                           BLOCK_C: tl.constexpr, BLOCK: tl.constexpr, HW_ALIGN: tl.constexpr = 1):
    """One (sample, group) block: statistics, then out = relu(GN(x) + r) (out may be x)."""
    HW = known_multiple(HW, HW_ALIGN)
    blk = tl.program_id(0).to(tl.int64)
    base = (blk // G) * C * HW + (blk % G) * Cg * HW
    c_first = (blk % G) * Cg
    s = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for c0 in range(0, Cg, BLOCK_C):
        for start in range(0, HW, BLOCK):
            offs, m = _group_tile(c0, start, Cg, HW, BLOCK_C, BLOCK)
            s += tl.sum(tl.load(x_ptr + base + offs, mask=m, other=0.0).to(tl.float32), axis=1)
    size = Cg * HW
    mean = tl.sum(s, axis=0) / size
    q = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for c0 in range(0, Cg, BLOCK_C):
        for start in range(0, HW, BLOCK):
            offs, m = _group_tile(c0, start, Cg, HW, BLOCK_C, BLOCK)
            v = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
            d = tl.where(m, v - mean, 0.0)
            q += tl.sum(d * d, axis=1)
    rstd = 1.0 / tl.sqrt(tl.sum(q, axis=0) / size + eps)
    tl.store(mean_ptr + blk, mean)
    tl.store(rstd_ptr + blk, rstd)
    for c0 in range(0, Cg, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        w = tl.load(w_ptr + c_first + ch, mask=ch < Cg, other=0.0).to(tl.float32)
        bb = tl.load(b_ptr + c_first + ch, mask=ch < Cg, other=0.0).to(tl.float32)
        a = (w * rstd)[:, None]
        sh = (bb - mean * w * rstd)[:, None]
        for start in range(0, HW, BLOCK):
            offs, m = _group_tile(c0, start, Cg, HW, BLOCK_C, BLOCK)
            v = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
            r = tl.load(r_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
            y = v * a + sh + r
            y = tl.where(y < 0.0, 0.0, y)
            tl.store(out_ptr + base + offs, y.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def gn_add_relu_bwd_kernel(dy_ptr, out_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dres_ptr, s0_ptr, s1_ptr,
                           C, HW, G, Cg, BLOCK_C: tl.constexpr, BLOCK: tl.constexpr,
                           HW_ALIGN: tl.constexpr = 1):
    """One (sample, group) block: dres = dz (dy where out > 0); per-channel sum(dz) and
    sum(dz * (x - mean)) into s0/s1 [N, C]; dx = rstd * (w dz - mean(w dz) - xhat
    mean(w dz xhat)).  dz is recomputed in the second pass rather than read back from
    dres: another thread of this program may have written it."""
    HW = known_multiple(HW, HW_ALIGN)
    blk = tl.program_id(0).to(tl.int64)
    n = blk // G
    base = n * C * HW + (blk % G) * Cg * HW
    c_first = (blk % G) * Cg
    mean = tl.load(mean_ptr + blk)
    rstd = tl.load(rstd_ptr + blk)
    A = tl.zeros((BLOCK_C,), dtype=tl.float32)  # sum over channels of w * sum(dz * (x - mean))
    B = tl.zeros((BLOCK_C,), dtype=tl.float32)  # sum over channels of w * sum(dz)
    for c0 in range(0, Cg, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        w = tl.load(w_ptr + c_first + ch, mask=ch < Cg, other=0.0).to(tl.float32)
        a0 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        a1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for start in range(0, HW, BLOCK):
            offs, m = _group_tile(c0, start, Cg, HW, BLOCK_C, BLOCK)
            o = tl.load(out_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
            g = tl.load(dy_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
            v = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
            dz = tl.where(m, tl.where(o <= 0.0, 0.0, g), 0.0)  # NaN passes, as threshold_backward
            tl.store(dres_ptr + base + offs, dz.to(dres_ptr.dtype.element_ty), mask=m)
            a0 += tl.sum(dz, axis=1)
            a1 += tl.sum(dz * (v - mean), axis=1)
        tl.store(s0_ptr + n * C + c_first + ch, a0, mask=ch < Cg)
        tl.store(s1_ptr + n * C + c_first + ch, a1, mask=ch < Cg)
        A += w * a1
        B += w * a0
    size = Cg * HW
    k2 = -rstd * tl.sum(B, axis=0) / size
    k3 = -rstd * rstd * rstd * tl.sum(A, axis=0) / size
    for c0 in range(0, Cg, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        k1 = (rstd * tl.load(w_ptr + c_first + ch, mask=ch < Cg, other=0.0).to(tl.float32))[:, None]
        for start in range(0, HW, BLOCK):
            offs, m = _group_tile(c0, start, Cg, HW, BLOCK_C, BLOCK)
            o = tl.load(out_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
            g = tl.load(dy_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
            v = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
            dz = tl.where(o <= 0.0, 0.0, g)
            tl.store(dx_ptr + base + offs, (k1 * dz + k2 + k3 * (v - mean)).to(dx_ptr.dtype.element_ty), mask=m)
