// Device code of the CUDA routed convolution (host side: routed_conv_cuda.cu).
//
// Every kernel reads a per-sample work list built on the device by
// worklist_kernel: list[n, :cnt[n]] holds the active blocks g of sample n
// (gates[n, g] != 0) in increasing order, list[n, cnt[n]:] the off ones.  Grids are
// sized for the upper bound (every block on); a CTA whose slot lies past the
// sample's count returns at once, so no host ever needs to read cnt.
//
// Compute: SIMT implicit GEMM.  A CTA owns a BM x BN output tile and walks the
// reduction in chunks of BK, staging both operands in shared memory (converted to
// the accumulation type); each thread keeps a TM x TN register tile.  The thread
// layout (tm x tn threads, BM = tm*TM, BN = tn*TN) is picked per launch on the host
// so that narrow column sets (one small group, few channels) do not leave most
// threads idle.
#pragma once

#include <cstdint>

namespace fastmod {
namespace routed_conv {
namespace kern {

constexpr int TM = 4, TN = 4, BK = 8;
constexpr int MAX_TM_THREADS = 64, MAX_TN_THREADS = 16, MAX_THREADS = 256;
constexpr int MAX_BM = MAX_TM_THREADS * TM;  // 256
constexpr int MAX_BN = MAX_TN_THREADS * TN;  // 64

// How a conv tile finds its result channels ("columns") and reduction channels.
//   kGrouped:   one (n, g) pair per tile; columns g*col_per + [0, col_per),
//               reduction channels g*k_per + [0, k_per).
//   kColListed: columns are the channels of the listed blocks (col_per each),
//               reduction over every channel of src.
//   kKListed:   every column; reduction over the channels of the active blocks
//               (k_per each), the source scaled by the block's gate on load.
enum Kind : int { kGrouped = 0, kColListed = 1, kKListed = 2 };

// One CTA of WL_THREADS per sample.  Each thread takes a contiguous run of the
// sample's gates; a shared-memory scan of the runs' active counts tells every thread
// where its active blocks go (and, from that, its off ones).  (One thread per sample
// walking all G gates twice took 64 us at G = 512 on an H100, 2026-11-27.)
constexpr int WL_THREADS = 128;

template <typename acc_t>
__global__ void __launch_bounds__(WL_THREADS) worklist_kernel(const acc_t* __restrict__ gates, int G,
                                                              int* __restrict__ list, int* __restrict__ cnt) {
  __shared__ int pre[WL_THREADS];
  const int n = blockIdx.x, t = threadIdx.x;
  const int per = (G + WL_THREADS - 1) / WL_THREADS;
  const int g0 = t * per < G ? t * per : G, g1 = g0 + per < G ? g0 + per : G;
  const acc_t* gn = gates + (int64_t)n * G;
  int mine = 0;
  for (int g = g0; g < g1; ++g) mine += gn[g] != acc_t(0);  // NaN counts as on, like the CPU path
  pre[t] = mine;
  __syncthreads();
  for (int d = 1; d < WL_THREADS; d <<= 1) {  // inclusive scan of the runs' counts
    const int v = t >= d ? pre[t - d] : 0;
    __syncthreads();
    pre[t] += v;
    __syncthreads();
  }
  const int total = pre[WL_THREADS - 1];
  int on = pre[t] - mine;  // active blocks before g
  int* ln = list + (int64_t)n * G;
  for (int g = g0; g < g1; ++g) {
    if (gn[g] != acc_t(0))
      ln[on++] = g;
    else
      ln[total + (g - on)] = g;  // g - on off blocks come before g
  }
  if (t == 0) cnt[n] = total;
}

// acc += As[kk] (x) Bs[kk] over one staged chunk; thread (ty, tx) owns rows
// ty + i*tm and columns tx + j*tn (strided, so neighbouring threads read
// neighbouring shared-memory words).
template <typename acc_t>
__device__ __forceinline__ void chunk_mma(acc_t (*As)[MAX_BM], acc_t (*Bs)[MAX_BN],
                                          acc_t (&acc)[TM][TN], int ty, int tx, int tm, int tn) {
#pragma unroll
  for (int kk = 0; kk < BK; ++kk) {
    acc_t av[TM], bv[TN];
#pragma unroll
    for (int i = 0; i < TM; ++i) av[i] = As[kk][ty + i * tm];
#pragma unroll
    for (int j = 0; j < TN; ++j) bv[j] = Bs[kk][tx + j * tn];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] += av[i] * bv[j];
  }
}

// Reduction channel kc of a conv tile -> channel of src (and its block, for the gate).
template <int KIND>
__device__ __forceinline__ int k_channel(int kc, int g, int k_per, const int* list_n, int& blk) {
  if (KIND == kGrouped) {
    blk = g;
    return g * k_per + kc;
  } else if (KIND == kColListed) {
    blk = 0;
    return kc;
  } else {
    blk = list_n[kc / k_per];
    return blk * k_per + kc % k_per;
  }
}

// Decode-table entries of the conv tiles (see ConvTile::row_base / k_decode).
constexpr int kNoRow = -(1 << 30);
struct RowBase {
  int y, x;
};
template <typename acc_t>
struct KDecode {
  int src_off, rd, sd, wk;
  acc_t scale;
};

// The 1-D grid's block index as the host lays it out:
// blockIdx.x = ((outer * slots + slot) * n_middle + middle) * n_inner + inner.
struct BlockIndex {
  int inner, middle, slot, outer;
};
__device__ __forceinline__ BlockIndex decode_block(int n_inner, int n_middle, int slots) {
  int t = blockIdx.x;
  BlockIndex b;
  b.inner = t % n_inner;
  t /= n_inner;
  b.middle = t % n_middle;
  t /= n_middle;
  b.slot = t % slots;
  b.outer = t / slots;
  return b;
}

template <typename scalar_t, typename acc_t>
struct ConvArgs {
  const scalar_t* src;     // A operand: x (forward) or grad_out (grad_x), [N, Csrc, Hs, Ws]
  const scalar_t* weight;  // [Cout, cin_g, kh, kw]
  const scalar_t* bias;    // added before the gate; forward only, else nullptr
  scalar_t* dst;           // result [N, Cdst, Hd, Wd]; written when `write`
  const scalar_t* other;   // shaped like dst: dot partner when `dot`
  acc_t* dot_ws;           // [N, G]: dot_ws[n, block] += sum(result * other), when `dot`
  const acc_t* gates;      // [N, G]
  const int* list;         // [N, G] (see the top of this file)
  const int* cnt;          // [N]
  int G, Csrc, Hs, Ws, Cdst, Hd, Wd;
  int kh, kw, sh, sw, ph, pw, dh, dw, cin_g;
  int col_per, k_per;      // channels per block on the column / reduction side
  int tm, tn, tiles_p, tiles_c, slots;
  bool off;       // kGrouped/kColListed: run the off blocks (list[n, cnt[n]:]) instead
  bool write;     // store the result (times the column's gate when gate_epi)
  bool dot;       // accumulate the ungated result . other per block into dot_ws
  bool gate_epi;  // scale stored columns by their block's gate
};

// One conv tile: which sample, columns and reduction range it owns, and how it
// reads its operands.  Shared by the SIMT kernel below and the tensor-core kernel
// (routed_conv_cuda_tc.cuh), which differ only in how they multiply.
// DX = false: forward conv, result rows are output pixels (Hd x Wd = Ho x Wo) of
// sample n, src = x.  DX = true: transposed conv (grad_x), rows are input pixels,
// src = grad_out; reduction index k = (channel, r, s) of the weight in both.
template <typename scalar_t, typename acc_t, int KIND, bool DX>
struct ConvTile {
  int n, g, K, lo, hi, p0, Prows, khkw;
  const int* list_n;
  const acc_t* gate_n;
  const scalar_t* src_n;
  int64_t src_plane;

  // Decodes blockIdx.x for BM x BN tiles; false when the tile has no work (the
  // caller's whole CTA then returns, before any barrier).
  __device__ __forceinline__ bool init(const ConvArgs<scalar_t, acc_t>& a, int BM, int BN) {
    const BlockIndex b = decode_block(a.tiles_p, a.tiles_c, a.slots);
    const int pt = b.inner, ct = b.middle, slot = b.slot;
    n = b.outer;
    const int G = a.G;
    const int active = a.cnt[n];
    list_n = a.list + (int64_t)n * G;
    gate_n = a.gates + (int64_t)n * G;
    khkw = a.kh * a.kw;
    g = 0;
    K = 0;
    lo = 0;
    hi = 0;
    if (KIND == kGrouped) {
      const int s = (a.off ? active : 0) + slot;
      if (s >= (a.off ? G : active)) return false;
      g = list_n[s];
      K = a.k_per * khkw;
      lo = ct * BN;  // first column within the group
    } else if (KIND == kColListed) {
      lo = (a.off ? active : 0) * a.col_per + ct * BN;  // first virtual column
      hi = (a.off ? G : active) * a.col_per;
      if (lo >= hi) return false;
      K = a.Csrc * khkw;
    } else {
      lo = ct * BN;
      K = active * a.k_per * khkw;
    }
    Prows = a.Hd * a.Wd;
    p0 = pt * BM;
    src_plane = (int64_t)a.Hs * a.Ws;
    src_n = a.src + (int64_t)n * a.Csrc * src_plane;
    return true;
  }

  // Channel (or -1) and block of the tile's column c.
  __device__ __forceinline__ void column(const ConvArgs<scalar_t, acc_t>& a, int c, int& ch,
                                         int& blk) const {
    ch = -1;
    blk = 0;
    if (KIND == kGrouped) {
      const int l = lo + c;
      if (l < a.col_per) {
        ch = g * a.col_per + l;
        blk = g;
      }
    } else if (KIND == kColListed) {
      const int v = lo + c;
      if (v < hi) {
        blk = list_n[v / a.col_per];
        ch = blk * a.col_per + v % a.col_per;
      }
    } else {
      const int l = lo + c;
      if (l < a.Cdst) ch = l;
    }
  }

  // The operand loaders read decode tables that the kernel fills in shared memory
  // (rows once per tile, reduction indices once per K chunk), so the inner staging
  // loops do no integer division.
  //
  // Row m (pixel p0 + m): its base coordinates in the source, or kNoRow past the
  // image.  Forward: (y * sh - ph, x * sw - pw); grad_x: (y + ph, x + pw).
  __device__ __forceinline__ RowBase row_base(const ConvArgs<scalar_t, acc_t>& a, int m) const {
    const int p = p0 + m;
    if (p >= Prows) return RowBase{kNoRow, 0};
    const int y = p / a.Wd, xw = p - y * a.Wd;
    if (!DX) return RowBase{y * a.sh - a.ph, xw * a.sw - a.pw};
    return RowBase{y + a.ph, xw + a.pw};
  }

  // Reduction index k: source channel offset (-1 past K), tap offsets r * dh and
  // s * dw, A's scale (the block's gate for kKListed, else 1) and B's k part of the
  // weight index (see col_wpart).
  __device__ __forceinline__ KDecode<acc_t> k_decode(const ConvArgs<scalar_t, acc_t>& a, int k) const {
    KDecode<acc_t> d{-1, 0, 0, 0, acc_t(1)};
    if (k >= K) return d;
    const int kc = k / khkw, rs = k - kc * khkw, r = rs / a.kw, s = rs - r * a.kw;
    int blk;
    const int ch = k_channel<KIND>(kc, g, a.k_per, list_n, blk);
    d.src_off = ch * static_cast<int>(src_plane);  // Csrc * Hs * Ws < INT_MAX (host check)
    d.rd = r * a.dh;
    d.sd = s * a.dw;
    // weight[wo][wi][r][s] with (wo, wi) = (column, k channel) forward, (k channel,
    // column) for grad_x; wi taken within the group.
    d.wk = DX ? ch * a.cin_g * khkw + rs : (ch % a.cin_g) * khkw + rs;
    if (KIND == kKListed) d.scale = gate_n[blk];
    return d;
  }

  // Column channel cch's part of the weight index (unused for an empty column).
  __device__ __forceinline__ int col_wpart(const ConvArgs<scalar_t, acc_t>& a, int cch) const {
    if (cch < 0) return 0;
    return DX ? (cch % a.cin_g) * khkw : cch * a.cin_g * khkw;
  }

  // A[m, k]: the source element feeding row m at reduction index k (zero outside
  // the image, past the rows or past K), times the k's scale.
  __device__ __forceinline__ acc_t load_a(const ConvArgs<scalar_t, acc_t>& a, RowBase rb,
                                          const KDecode<acc_t>& d) const {
    if (d.src_off < 0 || rb.y == kNoRow) return acc_t(0);
    int iy, ix;
    bool ok;
    if (!DX) {
      iy = rb.y + d.rd;
      ix = rb.x + d.sd;
      ok = iy >= 0 && iy < a.Hs && ix >= 0 && ix < a.Ws;
    } else {  // input pixel (y, x) receives output pixel (ty, tx) / stride
      const int ty = rb.y - d.rd, tx = rb.x - d.sd;
      ok = ty >= 0 && tx >= 0 && (a.sh == 1 || ty % a.sh == 0) && (a.sw == 1 || tx % a.sw == 0);
      iy = a.sh == 1 ? ty : ty / a.sh;
      ix = a.sw == 1 ? tx : tx / a.sw;
      ok = ok && iy < a.Hs && ix < a.Ws;
    }
    if (!ok) return acc_t(0);
    const acc_t v = static_cast<acc_t>(src_n[d.src_off + (int64_t)iy * a.Ws + ix]);
    return KIND == kKListed ? v * d.scale : v;
  }

  // B[k, column with channel cch]: the weight element linking them (zero past K or
  // for an empty column, cch < 0).
  __device__ __forceinline__ acc_t load_b(const ConvArgs<scalar_t, acc_t>& a, const KDecode<acc_t>& d, int cch,
                                          int cpart) const {
    if (d.src_off < 0 || cch < 0) return acc_t(0);
    return static_cast<acc_t>(a.weight[d.wk + cpart]);
  }

  // Result v (bias not yet added) of row m, column (ch, blk): store it (write)
  // and/or add its dot with `other` to dsum (dot).  Rows past the image and empty
  // columns are ignored.
  __device__ __forceinline__ void epilogue(const ConvArgs<scalar_t, acc_t>& a, int m, int ch,
                                           int blk, acc_t v, bool write, bool dot,
                                           acc_t& dsum) const {
    const int p = p0 + m;
    if (p >= Prows || ch < 0) return;
    if (a.bias != nullptr) v += static_cast<acc_t>(a.bias[ch]);
    const int64_t off = ((int64_t)n * a.Cdst + ch) * Prows + p;
    if (dot) dsum += v * static_cast<acc_t>(a.other[off]);
    if (write) a.dst[off] = static_cast<scalar_t>(a.gate_epi ? v * gate_n[blk] : v);
  }

  __device__ __forceinline__ void flush_dot(const ConvArgs<scalar_t, acc_t>& a, int ch, int blk,
                                            acc_t dsum) const {
    if (a.dot && ch >= 0) atomicAdd(&a.dot_ws[(int64_t)n * a.G + blk], dsum);
  }
};

// SIMT conv: tm x tn threads, each a TM x TN register tile.
template <typename scalar_t, typename acc_t, int KIND, bool DX>
__global__ void __launch_bounds__(MAX_THREADS) conv_kernel(const ConvArgs<scalar_t, acc_t> a) {
  __shared__ acc_t As[BK][MAX_BM];
  __shared__ acc_t Bs[BK][MAX_BN];
  __shared__ int col_ch[MAX_BN];
  __shared__ int col_blk[MAX_BN];
  __shared__ int col_w[MAX_BN];
  __shared__ RowBase rows[MAX_BM];
  __shared__ KDecode<acc_t> kdec[BK];

  const int tm = a.tm, tn = a.tn, BM = tm * TM, BN = tn * TN;
  const int nthr = tm * tn, tid = threadIdx.x;
  const int ty = tid / tn, tx = tid % tn;
  ConvTile<scalar_t, acc_t, KIND, DX> t;
  if (!t.init(a, BM, BN)) return;
  for (int c = tid; c < BN; c += nthr) {
    t.column(a, c, col_ch[c], col_blk[c]);
    col_w[c] = t.col_wpart(a, col_ch[c]);
  }
  for (int m = tid; m < BM; m += nthr) rows[m] = t.row_base(a, m);
  __syncthreads();

  acc_t acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = acc_t(0);

  for (int k0 = 0; k0 < t.K; k0 += BK) {
    for (int kk = tid; kk < BK; kk += nthr) kdec[kk] = t.k_decode(a, k0 + kk);
    __syncthreads();
    // A: consecutive threads take consecutive pixels (coalesced reads of src).
    for (int e = tid; e < BK * BM; e += nthr) {
      const int m = e % BM, kk = e / BM;
      As[kk][m] = t.load_a(a, rows[m], kdec[kk]);
    }
    for (int e = tid; e < BK * BN; e += nthr) {
      const int c = e % BN, kk = e / BN;
      Bs[kk][c] = t.load_b(a, kdec[kk], col_ch[c], col_w[c]);
    }
    __syncthreads();
    chunk_mma<acc_t>(As, Bs, acc, ty, tx, tm, tn);
    __syncthreads();
  }

#pragma unroll
  for (int j = 0; j < TN; ++j) {
    const int c = tx + j * tn;
    acc_t dsum = acc_t(0);
#pragma unroll
    for (int i = 0; i < TM; ++i)
      t.epilogue(a, ty + i * tm, col_ch[c], col_blk[c], acc[i][j], a.write, a.dot, dsum);
    t.flush_dot(a, col_ch[c], col_blk[c], dsum);
  }
}

template <typename scalar_t, typename acc_t>
struct WgradArgs {
  const scalar_t* dout;  // [N, Cout, Ho, Wo]
  const scalar_t* x;     // [N, Cin, H, W]
  acc_t* gw;             // [Cout, cin_g, kh, kw] workspace, += sum over samples
  const acc_t* gates;
  const int* list;
  const int* cnt;
  int G, Cout, Ho, Wo, Cin, H, W;
  int kh, kw, sh, sw, ph, pw, dh, dw, cin_g;
  int row_per;  // group: Cout/G; out: Cout/G (listed rows); in: unused
  int q_per;    // group: Cin/G; in: Cin/G (listed columns); out: unused
  int N;
  int spc;      // samples per CTA: group mode sums several samples in registers; else 1
  int tm, tn, tiles_r, tiles_c, slots;
  int ksplit;   // CTAs sharing one tile's pixel range, kchunk pixels each (a multiple
  int kchunk;   // of every kernel's K chunk), so narrow tiles still fill the GPU
};

// grad_weight: rows = output channels, columns = q = (input channel, r, s),
// reduction over output pixels; the tile is then atomically added to the workspace.
// MODE: 0 group (group g = slot, summed in registers over the active samples of a
// chunk of spc samples, dz = dout * gate: spc times fewer atomics), 1 out (one
// sample, its listed output channels, dz = dout * gate), 2 in (one sample, all
// output channels, its listed input channels scaled by their gate).  Shared by the SIMT
// kernel below and the tensor-core one (routed_conv_cuda_tc.cuh).
template <typename scalar_t, typename acc_t, int MODE>
struct WgradTile {
  int n, n0, n1, g, r0, c0, active, khkw, K, kb, ke;  // [kb, ke): this CTA's pixels
  const int* list_n;
  const acc_t* gate_n;
  const scalar_t* dout_n;
  const scalar_t* x_n;
  int64_t x_plane;

  // Decodes blockIdx.x for BM x BN tiles; false when the tile has no work.
  __device__ __forceinline__ bool init(const WgradArgs<scalar_t, acc_t>& a, int BM, int BN) {
    const BlockIndex b = decode_block(a.tiles_c, a.tiles_r, a.slots);
    const int ct = b.inner, rt = b.middle, slot = b.slot;
    n0 = b.outer / a.ksplit * a.spc;
    n1 = n0 + a.spc < a.N ? n0 + a.spc : a.N;
    khkw = a.kh * a.kw;
    r0 = rt * BM;
    c0 = ct * BN;
    K = a.Ho * a.Wo;
    kb = b.outer % a.ksplit * a.kchunk;
    ke = kb + a.kchunk < K ? kb + a.kchunk : K;
    if (kb >= K) return false;
    x_plane = (int64_t)a.H * a.W;
    g = slot;  // group mode: the group itself (its samples are checked one by one)
    if (MODE == 0) return true;
    set_sample(a, n0);  // out / in: one sample, whose lists shape the tile
    if (MODE == 1) return r0 < active * a.row_per;
    return c0 < active * a.q_per * khkw;
  }

  // Points the tile at sample s; for group mode, whether its block g is on.
  __device__ __forceinline__ bool set_sample(const WgradArgs<scalar_t, acc_t>& a, int s) {
    n = s;
    active = a.cnt[n];
    list_n = a.list + (int64_t)n * a.G;
    gate_n = a.gates + (int64_t)n * a.G;
    dout_n = a.dout + (int64_t)n * a.Cout * K;
    x_n = a.x + (int64_t)n * a.Cin * x_plane;
    return MODE != 0 || gate_n[g] != acc_t(0);
  }

  // The scale of the current sample's dz rows common to the whole tile: group
  // mode's gate (the per-row scales are then 1).
  __device__ __forceinline__ acc_t sample_scale() const { return MODE == 0 ? gate_n[g] : acc_t(1); }

  // Output channel (or -1) of tile row m and the scale of its dout row.
  __device__ __forceinline__ void row(const WgradArgs<scalar_t, acc_t>& a, int m, int& co,
                                      acc_t& sc) const {
    co = -1;
    sc = acc_t(1);
    const int l = r0 + m;
    if (MODE == 0) {
      if (l < a.row_per) co = g * a.row_per + l;  // the gate comes per sample
    } else if (MODE == 1) {
      if (l < active * a.row_per) {
        const int blk = list_n[l / a.row_per];
        co = blk * a.row_per + l % a.row_per;
        sc = gate_n[blk];
      }
    } else {
      if (l < a.Cout) co = l;
    }
  }

  // Input channel (or -1), kernel tap rs and input scale of tile column c.
  __device__ __forceinline__ void col(const WgradArgs<scalar_t, acc_t>& a, int c, int& ci, int& rs,
                                      acc_t& sc) const {
    ci = -1;
    rs = 0;
    sc = acc_t(1);
    const int q = c0 + c;
    if (MODE == 0) {
      if (q < a.q_per * khkw) {
        ci = g * a.q_per + q / khkw;
        rs = q % khkw;
      }
    } else if (MODE == 1) {
      if (q < a.Cin * khkw) {
        ci = q / khkw;
        rs = q % khkw;
      }
    } else {
      if (q < active * a.q_per * khkw) {
        const int vc = q / khkw;
        const int blk = list_n[vc / a.q_per];
        ci = blk * a.q_per + vc % a.q_per;
        rs = q % khkw;
        sc = gate_n[blk];
      }
    }
  }

  // A[row, p] = dz[n, co, p]; zero past K or for an empty row.
  __device__ __forceinline__ acc_t load_a(int co, acc_t sc, int p) const {
    if (p >= K || co < 0) return acc_t(0);
    return static_cast<acc_t>(dout_n[(int64_t)co * K + p]) * sc;
  }

  // Decode tables, as in ConvTile: output pixel p's base input coordinates
  // (oh * sh - ph, ow * sw - pw; kNoRow past K), once per chunk, and column (ci, rs)'s
  // channel offset and tap offsets (r * dh, s * dw), once per tile.
  __device__ __forceinline__ RowBase pixel_base(const WgradArgs<scalar_t, acc_t>& a, int p) const {
    if (p >= K) return RowBase{kNoRow, 0};
    const int oh = p / a.Wo, ow = p - oh * a.Wo;
    return RowBase{oh * a.sh - a.ph, ow * a.sw - a.pw};
  }
  __device__ __forceinline__ KDecode<acc_t> col_decode(const WgradArgs<scalar_t, acc_t>& a, int ci, int rs,
                                                       acc_t sc) const {
    KDecode<acc_t> d{-1, 0, 0, 0, sc};
    if (ci < 0) return d;
    d.src_off = ci * static_cast<int>(x_plane);  // Cin * H * W < INT_MAX (host check)
    d.rd = rs / a.kw * a.dh;
    d.sd = rs % a.kw * a.dw;
    return d;
  }

  // B[p, col] = the (scaled) input element that column d's tap sees at the output
  // pixel with base pb; zero outside the image, past K or for an empty column.
  __device__ __forceinline__ acc_t load_b(const WgradArgs<scalar_t, acc_t>& a, const KDecode<acc_t>& d,
                                          RowBase pb) const {
    if (pb.y == kNoRow || d.src_off < 0) return acc_t(0);
    const int ih = pb.y + d.rd, iw = pb.x + d.sd;
    if (ih < 0 || ih >= a.H || iw < 0 || iw >= a.W) return acc_t(0);
    return static_cast<acc_t>(x_n[d.src_off + (int64_t)ih * a.W + iw]) * d.scale;
  }

  __device__ __forceinline__ void flush(const WgradArgs<scalar_t, acc_t>& a, int co, int ci, int rs,
                                        acc_t v) const {
    if (co >= 0 && ci >= 0) atomicAdd(&a.gw[((int64_t)co * a.cin_g + ci % a.cin_g) * khkw + rs], v);
  }
};

template <typename scalar_t, typename acc_t, int MODE>
__global__ void __launch_bounds__(MAX_THREADS) wgrad_kernel(const WgradArgs<scalar_t, acc_t> a) {
  __shared__ acc_t As[BK][MAX_BM];
  __shared__ acc_t Bs[BK][MAX_BN];
  __shared__ int row_co[MAX_BM];
  __shared__ acc_t row_scale[MAX_BM];
  __shared__ int col_ci[MAX_BN];
  __shared__ int col_rs[MAX_BN];
  __shared__ KDecode<acc_t> col_dec[MAX_BN];
  __shared__ RowBase pix[BK];

  const int tm = a.tm, tn = a.tn, BM = tm * TM, BN = tn * TN;
  const int nthr = tm * tn, tid = threadIdx.x;
  const int ty = tid / tn, tx = tid % tn;
  WgradTile<scalar_t, acc_t, MODE> t;
  if (!t.init(a, BM, BN)) return;
  for (int m = tid; m < BM; m += nthr) t.row(a, m, row_co[m], row_scale[m]);
  for (int c = tid; c < BN; c += nthr) {
    acc_t sc;
    t.col(a, c, col_ci[c], col_rs[c], sc);
    col_dec[c] = t.col_decode(a, col_ci[c], col_rs[c], sc);
  }
  __syncthreads();

  acc_t acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = acc_t(0);

  bool any = false;
  for (int s = t.n0; s < t.n1; ++s) {
    if (!t.set_sample(a, s)) continue;  // the same answer for the whole CTA
    any = true;
    const acc_t gs = t.sample_scale();
    for (int k0 = t.kb; k0 < t.ke; k0 += BK) {
      for (int kk = tid; kk < BK; kk += nthr) pix[kk] = t.pixel_base(a, k0 + kk);
      __syncthreads();
      // The reduction runs over pixels: kk fastest, so neighbouring threads read
      // neighbouring pixels of one channel.
      for (int e = tid; e < BK * BM; e += nthr) {
        const int kk = e % BK, m = e / BK;
        As[kk][m] = t.load_a(row_co[m], row_scale[m] * gs, k0 + kk);
      }
      for (int e = tid; e < BK * BN; e += nthr) {
        const int kk = e % BK, c = e / BK;
        Bs[kk][c] = t.load_b(a, col_dec[c], pix[kk]);
      }
      __syncthreads();
      chunk_mma<acc_t>(As, Bs, acc, ty, tx, tm, tn);
      __syncthreads();
    }
  }
  if (!any) return;

#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int c = tx + j * tn;
      t.flush(a, row_co[ty + i * tm], col_ci[c], col_rs[c], acc[i][j]);
    }
}

// grad_gates of the active blocks in the "group"/"out" modes from the saved
// output: <dout, out> over the block / gate (out = gate * ungated block).  One CTA
// of DOT_THREADS per (n, slot); the block [Cb, Ho, Wo] is contiguous in both.
constexpr int DOT_THREADS = 256;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(DOT_THREADS) active_gate_grad_kernel(
    const scalar_t* __restrict__ dout, const scalar_t* __restrict__ out,
    const acc_t* __restrict__ gates, const int* __restrict__ list, const int* __restrict__ cnt,
    acc_t* __restrict__ gg, int G, int64_t block_len) {
  __shared__ acc_t red[DOT_THREADS];
  const int slot = blockIdx.x % G, n = blockIdx.x / G;
  if (slot >= cnt[n]) return;
  const int g = list[(int64_t)n * G + slot];
  const int64_t base = ((int64_t)n * G + g) * block_len;
  acc_t s = acc_t(0);
  for (int64_t i = threadIdx.x; i < block_len; i += DOT_THREADS)
    s += static_cast<acc_t>(dout[base + i]) * static_cast<acc_t>(out[base + i]);
  red[threadIdx.x] = s;
  __syncthreads();
  for (int w = DOT_THREADS / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) red[threadIdx.x] += red[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) gg[(int64_t)n * G + g] = red[0] / gates[(int64_t)n * G + g];
}

}  // namespace kern
}  // namespace routed_conv
}  // namespace fastmod
