"""Triton kernels of the routed convolution (fastmod.ops.routed_conv2d): the forward
of ``gate_on="out"`` and ``"in"`` with ``groups == 1`` (``routed_conv_fwd_kernel``)
and of ``"group"`` (``routed_conv_group_fwd_kernel``, below), and the grouped conv's
weight gradient over the active (sample, group) pairs (``routed_conv_group_wgrad_kernel``).

An implicit GEMM over tensor cores (``tl.dot``): rows are the output pixels of one
sample, columns its output channels, the reduction runs over (tap, input channel).
Only active blocks are visited, from a per-sample list of the active gate blocks
built on the device by ``compact_kernel`` (no host synchronisation):

* "out": the columns of a tile are taken from the active output channels (block
  list expanded to channels), so a sample's off blocks cost nothing; tiles past
  the active count return at once.  Off channels are left as the caller's zeros.
* "in": the reduction runs over the active input channels only, each scaled by
  its gate as it is loaded; every output channel is written.

Any strides: x is read as [N, C, H, W] through its strides (channels-last makes the
K loads contiguous), the weight as [Cout, Cin, KH, KW] through its strides (the
caller permutes it to [Cout, KH, KW, Cin] for contiguous K), y likewise.
Accumulation is fp32; fp32 inputs use TF32 only when ``INPUT_PRECISION`` says so.

Registers and fixed costs (sm_90 compiles at the benchmark shapes, specialised as
at run time; not yet timed on a GPU):

* Offsets inside one sample's x and y, and into the weight, are int32 (the wrapper
  refuses larger tensors).
* ``CPB_VEC`` tells the compiler how long the runs of consecutive channels in a
  gathered block list are.  Without it the "in" kernel loaded x element by element
  and spilled inside its main loop (bf16, BRN 1x1: 3573 instructions per
  iteration, 400 of them spill traffic; with it 440 and none, 16-byte cp.async).
* The output width ``Wo`` and the channels per block ``CPB`` are compile-time
  constants (one compiled kernel per layer shape), so the pixel and block index
  divisions become multiplies and shifts.  With run-time values a program spent
  0.9-3.2K instructions before its main loop (signed divisions; register spills
  for FRN's 3x3), as much as the whole loop of a 1x1 conv; with constants 0.7-0.9K
  and no spills.
* ``FLAT_PIX`` (1x1, stride 1, unpadded): pixel p at p * stride, no row/column
  split.  BRN's 1x1 convs: 196-289 instructions per main-loop iteration instead of
  273-387 and ~0.5K before the loop instead of ~0.7-1.1K; and an NCHW x is read in
  place with the same 16-byte loads (bf16) instead of one element at a time.
"""
import triton
import triton.language as tl

from ._hints import known_multiple


@triton.jit
def compact_kernel(g_ptr, list_ptr, cnt_ptr, G, sgn, sgg, BLOCK_G: tl.constexpr):
    """Program n: list[n, :cnt[n]] = the blocks g with gates[n, g] != 0, in order."""
    n = tl.program_id(0)
    offs = tl.arange(0, BLOCK_G)
    valid = offs < G
    on = (tl.load(g_ptr + n * sgn + offs * sgg, mask=valid, other=0.0) != 0) & valid
    on_i = on.to(tl.int32)
    pos = tl.cumsum(on_i, axis=0) - 1
    tl.store(list_ptr + n * G + pos, offs, mask=on)
    tl.store(cnt_ptr + n, tl.sum(on_i, axis=0))


@triton.jit
def _tile_and_sample(Ho, Wo, BLOCK_M: tl.constexpr):
    """Grid axis 0 is (sample, pixel tile), tiles fastest: axis 0 takes 2^31 - 1
    programs where axes 1 and 2 stop at 65535, so any batch size launches."""
    n_mt = tl.cdiv(Ho * Wo, BLOCK_M)
    pid = tl.program_id(0)
    return pid % n_mt, pid // n_mt


@triton.jit
def _pixel_rows(pid_m, Ho, Wo, conv_sh, conv_sw, pad_h, pad_w, BLOCK_M: tl.constexpr):
    """Output pixels [pid_m*BM, +BM) of one sample: (valid, oh, ow, first input row,
    first input column) of each."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    oh = offs_m // Wo
    ow = offs_m % Wo
    return offs_m < Ho * Wo, oh, ow, oh * conv_sh - pad_h, ow * conv_sw - pad_w


@triton.jit
def routed_conv_fwd_kernel(
        x_ptr, w_ptr, g_ptr, b_ptr, y_ptr, list_ptr, cnt_ptr,
        H, W, Cin, Ho, Wo: tl.constexpr, Cout, G, CPB: tl.constexpr,
        sxn, sxc, sxh, sxw, swo, swc, swr, sws, sgn, sgg, syn, syc, syh, syw,
        conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
        KH: tl.constexpr, KW: tl.constexpr, GATE_IN: tl.constexpr, HAS_BIAS: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, CPB_VEC: tl.constexpr, FLAT_PIX: tl.constexpr = False,
        PIX_ALIGN: tl.constexpr = 1):
    """Program (n * pixel tiles + pm, pn): output pixels [pm*BM, +BM) of sample n, times BLOCK_N
    columns: output channels pn*BN.. ("in"), or active channels pn*BN.. of the
    sample's compacted list ("out").  CPB = channels per gate block.  FLAT_PIX: a 1x1,
    stride-1, unpadded conv whose x and y keep (h, w) as one run, so pixel p sits at
    p * sxw in x and p * syw in y (no row/column split; in NCHW the pixel loads are
    contiguous); PIX_ALIGN is then a power of two dividing Ho * Wo."""
    pid_m, n = _tile_and_sample(Ho, Wo, BLOCK_M)
    pid_n = tl.program_id(1)
    # active channels (input ones for "in"); CPB_VEC (a power of two dividing CPB) tells
    # the compiler the gathered channel runs are that long, so loads and stores vectorise
    n_act = tl.multiple_of(tl.load(cnt_ptr + n) * CPB, CPB_VEC)
    if not GATE_IN:
        if pid_n * BLOCK_N >= n_act:
            return  # past this sample's active output channels: nothing to do
    x_n = x_ptr + n.to(tl.int64) * sxn
    lst = list_ptr + n * G

    if FLAT_PIX:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < known_multiple(Ho * Wo, PIX_ALIGN)
        x_pix = offs_m * sxw
        y_pix = offs_m * syw
    else:
        m_ok, oh, ow, ih0, iw0 = _pixel_rows(pid_m, Ho, Wo, conv_sh, conv_sw, pad_h, pad_w, BLOCK_M)
        y_pix = oh * syh + ow * syw

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if GATE_IN:
        n_ok = cols < Cout
        co = cols
    else:
        n_ok = cols < n_act
        blk = tl.load(lst + cols // CPB, mask=n_ok, other=0)
        co = tl.max_contiguous(tl.multiple_of(blk * CPB + cols % CPB, CPB_VEC), CPB_VEC)
    w_cols = co * swo  # int32 offsets (the wrapper checks the weight is under 2^31 elements)

    if GATE_IN:
        k_len = n_act
    else:
        k_len = Cin
    n_kc = tl.cdiv(k_len, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(0, KH * KW * n_kc):
        tap = t // n_kc
        kr = tap // KW
        ks = tap % KW
        kk = (t % n_kc) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = kk < k_len
        if GATE_IN:
            cin = tl.load(lst + kk // CPB, mask=k_ok, other=0) * CPB + kk % CPB
            cin = tl.max_contiguous(tl.multiple_of(cin, CPB_VEC), CPB_VEC)
        else:
            cin = kk
        if FLAT_PIX:
            a = tl.load(x_n + x_pix[:, None] + (cin * sxc)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        else:
            ih = ih0 + kr * dil_h
            iw = iw0 + ks * dil_w
            p_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(x_n + (ih * sxh + iw * sxw)[:, None] + (cin * sxc)[None, :],
                        mask=p_ok[:, None] & k_ok[None, :], other=0.0)
        if GATE_IN:  # scale each input channel by its gate, in x's dtype as the reference does
            s = tl.load(g_ptr + n * sgn + (cin // CPB) * sgg, mask=k_ok, other=0.0).to(a.dtype)
            a = a * s[None, :]
        b = tl.load(w_ptr + (w_cols[None, :] + (cin * swc + kr * swr + ks * sws)[:, None]),
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if not GATE_IN:
        # the gate rounded to x's dtype first, as the reference multiplies in that dtype
        gate = tl.load(g_ptr + n * sgn + (co // CPB) * sgg, mask=n_ok, other=0.0)
        acc *= gate.to(x_ptr.dtype.element_ty).to(tl.float32)[None, :]
    y = (y_ptr + n.to(tl.int64) * syn) + (y_pix[:, None] + (co * syc)[None, :])  # int32 offsets
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def routed_conv_group_fwd_kernel(
        x_ptr, w_ptr, g_ptr, b_ptr, y_ptr,
        H, W, Ho, Wo: tl.constexpr, n_ct,
        sxn, sxc, sxh, sxw, swo, swc, swr, sws, sgn, sgg, syn, syc, syh, syw,
        conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
        CG_IN: tl.constexpr, CG_OUT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """gate_on="group" (a ResNeXt branch per group).  Program (n * pixel tiles + pm, g * n_ct + ct):
    output pixels [pm*BM, +BM) of sample n, output channels [ct*BN, +BN) of group g's
    CG_OUT; when gates[n, g] == 0 it writes the tile's zeros and returns (so y needs
    no zero fill first: writing every element once costs less than a memset of all
    of y plus the active tiles).  The reduction runs over (tap, input channel of the
    group) as one flat index, so a narrow group (8 channels x 9 taps = 72) pads to a
    multiple of BLOCK_K, not to BLOCK_K per tap."""
    pid_m, n = _tile_and_sample(Ho, Wo, BLOCK_M)
    grp = tl.program_id(1) // n_ct
    ct = tl.program_id(1) % n_ct
    m_ok, oh, ow, ih0, iw0 = _pixel_rows(pid_m, Ho, Wo, conv_sh, conv_sw, pad_h, pad_w, BLOCK_M)
    j = ct * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = j < CG_OUT
    co = grp * CG_OUT + j
    y = (y_ptr + n.to(tl.int64) * syn) + ((oh * syh + ow * syw)[:, None] + (co * syc)[None, :])  # int32 offsets
    gate = tl.load(g_ptr + n * sgn + grp * sgg)
    if gate == 0:
        tl.store(y, tl.zeros((BLOCK_M, BLOCK_N), dtype=y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
        return
    x_n = x_ptr + n.to(tl.int64) * sxn + (grp * CG_IN) * sxc
    w_cols = co * swo  # int32 offsets (the wrapper checks the weight is under 2^31 elements)
    K_LEN: tl.constexpr = KH * KW * CG_IN
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_LEN, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K_LEN
        tap = kk // CG_IN
        c = kk % CG_IN
        kr = tap // KW
        ks = tap % KW
        ih = ih0[:, None] + (kr * dil_h)[None, :]
        iw = iw0[:, None] + (ks * dil_w)[None, :]
        a_ok = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_n + ih * sxh + iw * sxw + (c * sxc)[None, :], mask=a_ok, other=0.0)
        b = tl.load(w_ptr + (w_cols[None, :] + (c * swc + kr * swr + ks * sws)[:, None]),
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    acc *= gate.to(x_ptr.dtype.element_ty).to(tl.float32)  # rounded to x's dtype, as the reference
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def routed_conv_group_wgrad_kernel(
        x_ptr, dy_ptr, g_ptr, lst_ptr, cnt_ptr, dw_ptr,
        N, H, W, Ho, Wo: tl.constexpr, n_ct, n_kc, split,
        sxn, sxc, sxh, sxw, syn, syc, syh, syw, sgn, sgg,
        conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
        CG_IN: tl.constexpr, CG_OUT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr):
    """grad_weight of gate_on="group" over the active (sample, group) pairs only:
    dw[g's rows, :, :, :] += sum over active samples n and pixels of (gate * dy) x im2col(x).

    An implicit GEMM per group, computed transposed: rows its (tap, input channel)
    pairs as one flat index (as the forward), columns its CG_OUT output channels, the
    reduction over (active sample, output pixel).  The long side (up to 128 taps x
    channels) is the dot's M and no operand is transposed in registers.  Written the
    other way round (output channels as M, 8-32 rows; dy transposed with tl.trans),
    bf16/fp16 faulted on an H100 with Triton 3.6 (compute-sanitizer: a 16-byte
    out-of-bounds shared-memory read, attributed to the x load) while fp32 ran.  That
    form compiles (sm_90, Triton 3.8 here) to mma.sync whose bf16 operands are read
    with ldmatrix (24 in the PTX; fp32 none), this one to wgmma with no ldmatrix; that
    it runs clean on a GPU is not yet measured (scripts/check_group_wgrad.py).
    Program (g * n_ct * n_kc + ct * n_kc + kc, s): column tile ct and row tile kc of
    group g, and every split-th (sample, pixel tile) of the group's active samples
    (lst[g, :cnt[g]], compacted on the device), summed in fp32 and added into dw
    (fp32, zeroed by the caller) with atomics."""
    pid = tl.program_id(0)
    grp = pid // (n_ct * n_kc)
    ct = (pid // n_kc) % n_ct
    kc = pid % n_kc
    s = tl.program_id(1)
    n_pt = tl.cdiv(Ho * Wo, BLOCK_M)
    total = tl.load(cnt_ptr + grp) * n_pt
    j = ct * BLOCK_N + tl.arange(0, BLOCK_N)
    j_ok = j < CG_OUT
    K_LEN: tl.constexpr = KH * KW * CG_IN
    kk = kc * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = kk < K_LEN
    tap = kk // CG_IN
    c = kk % CG_IN
    kr = tap // KW
    ks = tap % KW
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for w in range(s, total, split):
        # clamped into the group's row: a software-pipelined prefetch of an iteration
        # past the end must still read a real sample number (lst is zero-filled)
        n = tl.load(lst_ptr + grp * N + tl.minimum(w // n_pt, N - 1))
        pid_m = w % n_pt
        m_ok, oh, ow, ih0, iw0 = _pixel_rows(pid_m, Ho, Wo, conv_sh, conv_sw, pad_h, pad_w, BLOCK_M)
        # dy rows scaled by the gate, in dy's dtype (the reference's grad * gate)
        dy = tl.load(dy_ptr + n.to(tl.int64) * syn + (oh * syh + ow * syw)[:, None]
                     + ((grp * CG_OUT + j) * syc)[None, :], mask=m_ok[:, None] & j_ok[None, :], other=0.0)
        gate = tl.load(g_ptr + n * sgn + grp * sgg).to(dy.dtype)
        dy = dy * gate
        # im2col(x) transposed: [taps x channels, pixels]
        ih = ih0[None, :] + (kr * dil_h)[:, None]
        iw = iw0[None, :] + (ks * dil_w)[:, None]
        a_ok = k_ok[:, None] & m_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xs = tl.load(x_ptr + n.to(tl.int64) * sxn + (grp * CG_IN) * sxc + ih * sxh + iw * sxw + (c * sxc)[:, None],
                     mask=a_ok, other=0.0)
        acc = tl.dot(xs, dy, acc, input_precision=INPUT_PRECISION)
    # dw is [Cout, CG_IN, KH, KW], contiguous
    dst = dw_ptr + ((grp * CG_OUT + j) * K_LEN)[None, :] + (c * (KH * KW) + kr * KW + ks)[:, None]
    tl.atomic_add(dst, acc, mask=k_ok[:, None] & j_ok[None, :])
