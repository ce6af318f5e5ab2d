// The direct kernels for one instruction set; included once per ISA by
// routed_conv_cpu_direct.cpp with FM_NS (namespace), FM_TARGET (target attribute)
// and FM_VT (vector traits: V, W lanes, register-tile sizes, masked load/store)
// defined.  Pixel masks come from the plan as 16-lane words per 32-pixel tile;
// lane_bits() cuts the W lanes a vector needs out of them.

namespace FM_NS {

using VT = FM_VT;
using V = typename VT::V;
constexpr int W = VT::W;
#define FM_KERNEL_INLINE FM_TARGET inline __attribute__((always_inline))

// The mask bits of lanes [lane0, lane0 + W) of a tile (lane0 < 32, multiple of W).
inline unsigned lane_bits(const uint16_t* tile_words, int64_t lane0) {
  return (unsigned)(tile_words[lane0 >> 4] >> (lane0 & 15)) & ((1u << W) - 1u);
}

// acc += the segment's channels [c0, c1) over all taps, for the NV vectors at
// pixel lanes lane0 ... of a tile; bits[t * NV + v] is the lane mask of tap t's
// vector v (the same for every channel, so the caller works it out once per tile).
// SCALED multiplies the input vectors by the segment scale (a template flag: a
// runtime test per tap costs as much as the FMAs it guards).
template <int MR, int NV, int KKT, bool SCALED, bool FLIP>
FM_KERNEL_INLINE void accumulate(V (&acc)[MR][NV], const float* x, const float* const* w,
                                 int64_t cstride, int64_t c0, int64_t c1, float scale, int64_t XL,
                                 int KK_rt, const int64_t* off, const unsigned* bits, int64_t pf) {
  const int KK = KKT ? KKT : KK_rt;
  const V sc = VT::set1(scale);
  for (int64_t c = c0; c < c1; ++c) {
    const float* xc = x + c * XL;
    const int64_t wc = c * cstride;
    // The lines of this channel the next pixel tile reaches furthest into (pf).  A
    // channel's rows are XL floats apart, too many interleaved streams for the
    // hardware prefetcher; asking a tile ahead (into L2: a whole tile's channels
    // pass before they are read) measured 0.75-0.93x the time on the cold 1x1
    // convs of a bottleneck, ~1.0x on warm 3x3 ones.
    _mm_prefetch((const char*)(xc + pf), _MM_HINT_T1);
    _mm_prefetch((const char*)(xc + pf + 16), _MM_HINT_T1);
    _mm_prefetch((const char*)(xc + pf + 31), _MM_HINT_T1);
    FM_UNROLL for (int t = 0; t < KK; ++t) {
      V b[NV];
      FM_UNROLL for (int v = 0; v < NV; ++v) {
        b[v] = VT::load_mask(bits[t * NV + v], xc + off[t] + v * W);
        if (SCALED) b[v] = VT::mul(b[v], sc);
      }
      FM_UNROLL for (int i = 0; i < MR; ++i) {
        const V a = VT::set1(w[i][wc + (FLIP ? -t : t)]);
        FM_UNROLL for (int v = 0; v < NV; ++v) acc[i][v] = VT::fmadd(a, b[v], acc[i][v]);
      }
    }
  }
}

// One register tile: MR rows x NV vectors of pixels starting at lane0 of 32-pixel
// tile tile_idx, all segments and taps.  KKT is the tap count when known at compile
// time (1, 2, 4 or 9), else 0 (runtime kk).
template <int MR, int NV, int KKT, bool FLIP>
FM_TARGET void tile(const RowJob& job, const PixelPlan& plan, int64_t tile_idx, int64_t lane0) {
  const int64_t p0 = tile_idx * kPixels + lane0;
  const uint16_t* masks = plan.tap_mask.data() + tile_idx * plan.KK * 2;
  // The tile's lane masks per (tap, vector), out of the channel loop (worked out
  // per channel, they cost several scalar instructions per vector load).
  unsigned fixed_bits[(KKT ? KKT : 1) * NV];
  unsigned* bits = fixed_bits;
  if constexpr (!KKT) {  // kernel sizes other than 1x1 and 3x3
    thread_local std::vector<unsigned> any_bits;
    any_bits.resize((size_t)plan.KK * NV);
    bits = any_bits.data();
  }
  for (int t = 0; t < plan.KK; ++t)
    FM_UNROLL for (int v = 0; v < NV; ++v) bits[t * NV + v] = lane_bits(masks + t * 2, lane0 + v * W);
  V acc[MR][NV];
  FM_UNROLL for (int i = 0; i < MR; ++i)
    FM_UNROLL for (int v = 0; v < NV; ++v) acc[i][v] = VT::zero();
  const float* x = job.x + p0;
  // Prefetch offset: the next tile's first pixel plus the largest tap offset.
  const int64_t pf = kPixels - lane0 + plan.max_offset;
  for (int s = 0; s < job.nseg; ++s) {
    const Segment seg = job.segs[s];
    if (seg.scale == 1.0f)
      accumulate<MR, NV, KKT, false, FLIP>(acc, x, job.w_row, job.w_cstride, seg.c0, seg.c1, 1.0f,
                                           plan.XL, plan.KK, plan.tap_offset.data(), bits, pf);
    else
      accumulate<MR, NV, KKT, true, FLIP>(acc, x, job.w_row, job.w_cstride, seg.c0, seg.c1,
                                          seg.scale, plan.XL, plan.KK, plan.tap_offset.data(), bits, pf);
  }
  const uint16_t* sm = plan.store_mask.data() + tile_idx * 2;
  FM_UNROLL for (int i = 0; i < MR; ++i) {
    const V bias = VT::set1(job.bias ? job.bias[i] : 0.0f);
    const V rs = VT::set1(job.row_scale ? job.row_scale[i] : 1.0f);
    FM_UNROLL for (int v = 0; v < NV; ++v) {
      V r = VT::add(acc[i][v], bias);
      if (job.row_scale) r = VT::mul(r, rs);
      VT::store_mask(job.out_row[i] + p0 + v * W, lane_bits(sm, lane0 + v * W), r);
    }
  }
}

FM_TARGET float dot(const float* a, const float* b, int64_t n) {
  V acc[4] = {VT::zero(), VT::zero(), VT::zero(), VT::zero()};
  int64_t j = 0;
  for (; j + 4 * W <= n; j += 4 * W)
    FM_UNROLL for (int u = 0; u < 4; ++u)
      acc[u] = VT::fmadd(VT::loadu(a + j + W * u), VT::loadu(b + j + W * u), acc[u]);
  for (; j < n; j += W) {
    const unsigned m = n - j >= W ? (1u << W) - 1u : (1u << (n - j)) - 1u;
    acc[0] = VT::fmadd(VT::load_mask(m, a + j), VT::load_mask(m, b + j), acc[0]);
  }
  return VT::reduce(VT::add(VT::add(acc[0], acc[1]), VT::add(acc[2], acc[3])));
}

// How many of the last pixels go to tail_pixels() instead of a vector pass: the
// L % W left over after whole vectors, when at most W / 4.  A vector pass over them
// costs as much as W pixels; a dot product per row and pixel about a tenth of that.
// Measured at N = 8, "out" 3x3, G = Cout, forward, A/B in one process: 512 -> 512 at
// 7x7 (49 = 3 x 16 + 1) ~11% faster; 256 -> 256 at 14x14 (196 = 12 x 16 + 4) 0-6%.
// Forward layout (contiguous weight rows), and grad_x's transposed, flipped layout
// when a channel's taps fit one vector (its KK weights per row are contiguous).
inline int64_t dot_tail(const RowJob& job, const PixelPlan& plan) {
  if (job.w_flip ? (plan.KK < 2 || plan.KK > W) : job.w_cstride != plan.KK) return 0;
  const int64_t tail = plan.L % W;
  return tail <= W / 4 ? tail : 0;
}

// The input columns of the tail pixels of one sample: [pixel][channel][tap], zero
// where a tap falls into the padding, times the segment's scale; taps in reverse
// order for a flipped job (so that they line up with its weights).  Consecutive jobs
// of a thread are mostly rows of the same sample, so the last columns gathered are
// kept and reused while (call, x, segments, flip) are the same.
struct TailColumns {
  uint64_t plan_id = 0, x_tag = 0;
  const float* x = nullptr;
  bool flip = false;
  std::vector<Segment> segs;
  int64_t cols = 0;  // floats per pixel
  std::vector<float> data;
  std::vector<int64_t> off;  // per tap: its input offset for the pixel, -1 in the padding

  bool same(const RowJob& job, const PixelPlan& plan) const {
    if (plan_id != plan.id || x != job.x || x_tag != job.x_tag || flip != job.w_flip ||
        (int)segs.size() != job.nseg)
      return false;
    for (int s = 0; s < job.nseg; ++s)
      if (segs[s].c0 != job.segs[s].c0 || segs[s].c1 != job.segs[s].c1 || segs[s].scale != job.segs[s].scale)
        return false;
    return true;
  }

  void gather(const RowJob& job, const PixelPlan& plan, int64_t p0) {
    const int KK = plan.KK;
    const int64_t L = plan.L;
    int64_t cmax = 0;
    for (int s = 0; s < job.nseg; ++s) cmax = job.segs[s].c1 > cmax ? job.segs[s].c1 : cmax;
    plan_id = plan.id;
    x = job.x;
    x_tag = job.x_tag;
    flip = job.w_flip;
    segs.assign(job.segs, job.segs + job.nseg);
    cols = cmax * KK;
    data.resize((L - p0) * cols);
    off.resize(KK);
    for (int64_t p = p0; p < L; ++p) {
      const int64_t lane = p % kPixels;
      const uint16_t* tm = plan.tap_mask.data() + (p / kPixels) * KK * 2 + (lane >> 4);
      for (int t = 0; t < KK; ++t) off[t] = ((tm[t * 2] >> (lane & 15)) & 1u) ? p + plan.tap_offset[t] : -1;
      float* col = data.data() + (p - p0) * cols;
      for (int s = 0; s < job.nseg; ++s) {  // channel by channel: its taps share cache lines
        const Segment seg = job.segs[s];
        for (int64_t c = seg.c0; c < seg.c1; ++c) {
          const float* xc = job.x + c * plan.XL;
          for (int t = 0; t < KK; ++t)
            col[c * KK + (flip ? KK - 1 - t : t)] = off[t] >= 0 ? seg.scale * xc[off[t]] : 0.0f;
        }
      }
    }
  }
};

// Flipped (grad_x) layout: row i's KK weights of channel c run backwards from
// w_row[i] + c * w_cstride, i.e. forwards from there minus KK - 1, and the column's
// taps are stored reversed to match; one masked vector per (row, channel), reduced
// once per row and pixel.
template <int MR>
FM_TARGET void tail_pixels_flip(const RowJob& job, const PixelPlan& plan, int64_t p0, const TailColumns& cols) {
  const int KK = plan.KK;
  const unsigned m = (1u << KK) - 1u;
  for (int64_t p = p0; p < plan.L; ++p) {
    const float* col = cols.data.data() + (p - p0) * cols.cols;
    V acc[MR];
    FM_UNROLL for (int i = 0; i < MR; ++i) acc[i] = VT::zero();
    for (int s = 0; s < job.nseg; ++s)
      for (int64_t c = job.segs[s].c0; c < job.segs[s].c1; ++c) {
        const V b = VT::load_mask(m, col + c * KK);
        const int64_t wo = c * job.w_cstride - (KK - 1);
        FM_UNROLL for (int i = 0; i < MR; ++i) acc[i] = VT::fmadd(VT::load_mask(m, job.w_row[i] + wo), b, acc[i]);
      }
    FM_UNROLL for (int i = 0; i < MR; ++i) {
      const float v = (job.bias ? job.bias[i] : 0.0f) + VT::reduce(acc[i]);
      job.out_row[i][p] = job.row_scale ? v * job.row_scale[i] : v;
    }
  }
}

// Output pixels [p0, L) of every row as dot products of the weight row with the
// pixel's input column.
inline TailColumns& tail_cache() {
  thread_local TailColumns cache;  // one per thread, whatever the tile size
  return cache;
}

template <int MR>
FM_TARGET void tail_pixels(const RowJob& job, const PixelPlan& plan, int64_t p0) {
  TailColumns& cache = tail_cache();
  if (!cache.same(job, plan)) cache.gather(job, plan, p0);
  if (job.w_flip) {
    tail_pixels_flip<MR>(job, plan, p0, cache);
    return;
  }
  const int KK = plan.KK;
  for (int64_t p = p0; p < plan.L; ++p) {
    const float* col = cache.data.data() + (p - p0) * cache.cols;
    for (int i = 0; i < job.nrows; ++i) {
      float acc = job.bias ? job.bias[i] : 0.0f;
      for (int s = 0; s < job.nseg; ++s) {
        const Segment seg = job.segs[s];
        acc += dot(job.w_row[i] + seg.c0 * KK, col + seg.c0 * KK, (seg.c1 - seg.c0) * KK);
      }
      job.out_row[i][p] = job.row_scale ? acc * job.row_scale[i] : acc;
    }
  }
}

// A 32-pixel tile is processed in parts of 2 vectors (one part for 16 lanes, two
// for 8); a part with at most W pixels left uses one vector.  Pixels from L - tail
// on go to tail_pixels().
template <int MR, int KKT, bool FLIP>
FM_TARGET void rows_flip(const RowJob& job, const PixelPlan& plan) {
  const int64_t T = plan.tiles();
  const int64_t tail = dot_tail(job, plan), Lv = plan.L - tail;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t lane0 = 0; lane0 < kPixels; lane0 += 2 * W) {
      const int64_t left = Lv - t * kPixels - lane0;
      if (left <= 0) break;
      if (left > W) tile<MR, 2, KKT, FLIP>(job, plan, t, lane0);
      else tile<MR, 1, KKT, FLIP>(job, plan, t, lane0);
    }
  if (tail) tail_pixels<MR>(job, plan, Lv);
}

template <int MR, int KKT>
void rows_mr(const RowJob& job, const PixelPlan& plan) {
  if (job.w_flip) rows_flip<MR, KKT, true>(job, plan);
  else rows_flip<MR, KKT, false>(job, plan);
}

// nrows (1 ... M) -> the MR = nrows instantiation.
template <int KKT, int M = VT::kTileRows>
void rows_any(const RowJob& job, const PixelPlan& plan) {
  if constexpr (M == 1) {
    rows_mr<1, KKT>(job, plan);
  } else {
    if (job.nrows >= M) rows_mr<M, KKT>(job, plan);
    else rows_any<KKT, M - 1>(job, plan);
  }
}

void run_rows(const RowJob& job, const PixelPlan& plan) {
  for (int r0 = 0; r0 < job.nrows; r0 += VT::kTileRows) {
    const RowJob sub = job.slice(r0, job.nrows - r0 < VT::kTileRows ? job.nrows - r0 : VT::kTileRows);
    if (plan.KK == 9) rows_any<9>(sub, plan);
    else if (plan.KK == 1) rows_any<1>(sub, plan);
    else if (plan.KK == 4) rows_any<4>(sub, plan);  // the phases of a stride-2 3x3's grad_x:
    else if (plan.KK == 2) rows_any<2>(sub, plan);  // 1, 2, 2 and 4 taps
    else rows_any<0>(sub, plan);
  }
}

// One job's dy rows and (PRE) row scales, in locals for its pixel loop.
template <int MR, bool PRE>
struct DyRows {
  const float* row[MR];
  V scale[MR];
  FM_KERNEL_INLINE explicit DyRows(const WgradJob& job) {
    FM_UNROLL for (int i = 0; i < MR; ++i) {
      row[i] = job.dy_row[i];
      if (PRE) scale[i] = VT::set1(job.row_scale[i]);
    }
  }
  // Row i's vector at pixel p (times its scale when PRE).
  FM_KERNEL_INLINE void load(V (&a)[MR], int64_t p, unsigned sm) const {
    FM_UNROLL for (int i = 0; i < MR; ++i) {
      a[i] = VT::load_mask(sm, row[i] + p);
      if (PRE) a[i] = VT::mul(a[i], scale[i]);
    }
  }
};

// How a weight-gradient tile takes its jobs: one job, its row scale applied to the
// reduced sums (the loop over jobs compiles away); several, unscaled; several, each
// job's row scale applied to dy as it is loaded.
enum JobCount { kOneJob = 0, kJobs = 1, kScaledJobs = 2 };

// Weight-gradient tile: MR dy rows x NT taps (t0 ...) of channel c, summed over
// every pixel of every job (sample) in W-lane vectors, then reduced across lanes once.
template <int MR, int NT, int JOBS>
FM_TARGET void wgrad_taps(const WgradJob* jobs, int nj, const PixelPlan& plan, int64_t c, int t0) {
  constexpr bool PRE = JOBS == kScaledJobs;
  if (JOBS == kOneJob) nj = 1;
  const int64_t L = plan.L;
  const int KK = plan.KK;
  const int64_t* off = plan.tap_offset.data() + t0;
  V acc[MR][NT];
  FM_UNROLL for (int i = 0; i < MR; ++i)
    FM_UNROLL for (int t = 0; t < NT; ++t) acc[i][t] = VT::zero();
  for (int s = 0; s < nj; ++s) {
    const DyRows<MR, PRE> dy(jobs[s]);
    const float* xc = jobs[s].x + c * plan.XL;
    for (int64_t p = 0; p < L; p += W) {
      const int64_t tile = p / kPixels, lane = p % kPixels;
      const uint16_t* tm = plan.tap_mask.data() + (tile * KK + t0) * 2;
      V a[MR];
      dy.load(a, p, lane_bits(plan.store_mask.data() + tile * 2, lane));
      FM_UNROLL for (int t = 0; t < NT; ++t) {
        const V b = VT::load_mask(lane_bits(tm + t * 2, lane), xc + p + off[t]);
        FM_UNROLL for (int i = 0; i < MR; ++i) acc[i][t] = VT::fmadd(a[i], b, acc[i][t]);
      }
    }
  }
  const WgradJob& j0 = jobs[0];
  FM_UNROLL for (int i = 0; i < MR; ++i) {
    const float s = (!PRE && j0.row_scale) ? j0.row_scale[i] : 1.0f;
    float* dw = j0.dw_row[i] + c * KK + t0;
    FM_UNROLL for (int t = 0; t < NT; ++t) dw[t] += s * VT::reduce(acc[i][t]);
  }
}

// 1x1 weight-gradient tile: MR dy rows x CT channels (job.channel(k0) ...), every job.
template <int MR, int CT, int JOBS>
FM_TARGET void wgrad_1x1(const WgradJob* jobs, int nj, const PixelPlan& plan, int64_t k0) {
  constexpr bool PRE = JOBS == kScaledJobs;
  if (JOBS == kOneJob) nj = 1;
  const int64_t L = plan.L;
  V acc[MR][CT];
  FM_UNROLL for (int i = 0; i < MR; ++i)
    FM_UNROLL for (int j = 0; j < CT; ++j) acc[i][j] = VT::zero();
  for (int s = 0; s < nj; ++s) {
    const WgradJob& job = jobs[s];
    const DyRows<MR, PRE> dy(job);
    const float* xc[CT];
    FM_UNROLL for (int j = 0; j < CT; ++j) xc[j] = job.x + job.channel(k0 + j) * plan.XL;
    for (int64_t p = 0; p < L; p += W) {
      const unsigned sm = lane_bits(plan.store_mask.data() + (p / kPixels) * 2, p % kPixels);
      V a[MR];
      dy.load(a, p, sm);
      FM_UNROLL for (int j = 0; j < CT; ++j) {
        const V b = VT::load_mask(sm, xc[j] + p);
        FM_UNROLL for (int i = 0; i < MR; ++i) acc[i][j] = VT::fmadd(a[i], b, acc[i][j]);
      }
    }
  }
  const WgradJob& j0 = jobs[0];
  FM_UNROLL for (int i = 0; i < MR; ++i) {
    const float s = (!PRE && j0.row_scale) ? j0.row_scale[i] : 1.0f;
    FM_UNROLL for (int j = 0; j < CT; ++j) j0.dw_row[i][j0.channel(k0 + j)] += s * VT::reduce(acc[i][j]);
  }
}

template <int MR, int JOBS>
void wgrad_rows_jobs(const WgradJob* jobs, int nj, const PixelPlan& plan) {
  constexpr int CT = VT::k1x1Channels;
  const WgradJob& j0 = jobs[0];  // the channels are the same for every job
  if (plan.KK == 9 && VT::kTapRows >= MR) {
    for (int64_t k = j0.c0; k < j0.c1; ++k) wgrad_taps<MR, 9, JOBS>(jobs, nj, plan, j0.channel(k), 0);
  } else if (plan.KK == 1) {
    // Full CT-channel tiles, then a half tile (ResNeXt's 4-channel branches), then singles.
    int64_t k = j0.c0;
    for (; k + CT <= j0.c1; k += CT) wgrad_1x1<MR, CT, JOBS>(jobs, nj, plan, k);
    for (; k + CT / 2 <= j0.c1; k += CT / 2) wgrad_1x1<MR, CT / 2, JOBS>(jobs, nj, plan, k);
    for (; k < j0.c1; ++k) wgrad_1x1<MR, 1, JOBS>(jobs, nj, plan, k);
  } else {
    for (int64_t k = j0.c0; k < j0.c1; ++k)
      for (int t = 0; t < plan.KK; ++t) wgrad_taps<MR, 1, JOBS>(jobs, nj, plan, j0.channel(k), t);
  }
}

template <int MR>
void wgrad_rows(const WgradJob* jobs, int nj, const PixelPlan& plan) {
  if (nj == 1) wgrad_rows_jobs<MR, kOneJob>(jobs, nj, plan);
  else if (jobs[0].row_scale) wgrad_rows_jobs<MR, kScaledJobs>(jobs, nj, plan);
  else wgrad_rows_jobs<MR, kJobs>(jobs, nj, plan);
}

void run_wgrad(const WgradJob* jobs, int nj, const PixelPlan& plan) {
  // Rows in pairs when the ISA's registers hold 2 x 9 tap accumulators (and always
  // for 1x1); otherwise one row at a time for 3x3.
  constexpr int R = 2;
  const int step = (plan.KK == 9 && VT::kTapRows < R) ? 1 : R;
  thread_local std::vector<WgradJob> sub;
  sub.resize(nj);
  const int nrows = jobs[0].nrows;
  for (int r0 = 0; r0 < nrows; r0 += step) {
    const int n = (step == R && nrows - r0 >= R) ? R : 1;
    for (int s = 0; s < nj; ++s) sub[s] = jobs[s].slice(r0, n);
    if (n == R) wgrad_rows<R>(sub.data(), nj, plan);
    else wgrad_rows<1>(sub.data(), nj, plan);
  }
}

// Channels-last weight-gradient tile: MR rows x kChunk channels, one tap at a time.
template <int MR>
FM_TARGET void wgrad_cl(const WgradClJob& job, const ClPlan& plan) {
  constexpr int NC = kChunk / W;
  const int64_t H = plan.H, Wd = plan.W, Wp = plan.Wp;
  for (int t = 0; t < plan.KK; ++t) {
    V acc[MR][NC];
    FM_UNROLL for (int i = 0; i < MR; ++i)
      FM_UNROLL for (int j = 0; j < NC; ++j) acc[i][j] = VT::zero();
    for (int64_t y = 0; y < H; ++y) {
      const float* xr = job.xp + (y * Wp + plan.tap_offset[t]) * kChunk;
      const int64_t p0 = y * Wd;
      for (int64_t x = 0; x < Wd; ++x) {
        V b[NC];
        FM_UNROLL for (int j = 0; j < NC; ++j) b[j] = VT::loadu(xr + x * kChunk + W * j);
        FM_UNROLL for (int i = 0; i < MR; ++i) {
          const V a = VT::set1(job.dy_row[i][p0 + x]);
          FM_UNROLL for (int j = 0; j < NC; ++j) acc[i][j] = VT::fmadd(a, b[j], acc[i][j]);
        }
      }
    }
    FM_UNROLL for (int i = 0; i < MR; ++i) {
      const V s = VT::set1(job.row_scale ? job.row_scale[i] : 1.0f);
      float* dst = job.acc_row[i] + t * kChunk;
      FM_UNROLL for (int j = 0; j < NC; ++j)
        VT::storeu(dst + W * j, VT::fmadd(s, acc[i][j], VT::loadu(dst + W * j)));
    }
  }
}

template <int M = VT::kClRows>
void cl_any(const WgradClJob& job, const ClPlan& plan) {
  if constexpr (M == 1) {
    wgrad_cl<1>(job, plan);
  } else {
    if (job.nrows >= M) wgrad_cl<M>(job, plan);
    else cl_any<M - 1>(job, plan);
  }
}

void run_wgrad_cl(const WgradClJob& job, const ClPlan& plan) {
  for (int r0 = 0; r0 < job.nrows; r0 += VT::kClRows) {
    cl_any(job.slice(r0, job.nrows - r0 < VT::kClRows ? job.nrows - r0 : VT::kClRows), plan);
  }
}

// The register tile of the lanes-over-columns kernels: MR accumulator rows x NV
// vectors of columns, the last vector under `last` (the lanes left at the end).
template <int MR, int NV>
struct LanesTile {
  static constexpr unsigned kFull = (1u << W) - 1u;
  V acc[MR][NV];
  unsigned last;

  FM_KERNEL_INLINE explicit LanesTile(unsigned last_lanes) : last(last_lanes) {
    FM_UNROLL for (int i = 0; i < MR; ++i)
      FM_UNROLL for (int v = 0; v < NV; ++v) acc[i][v] = VT::zero();
  }
  // acc[i] += a(i) * the columns at b (one pixel).
  template <class A>
  FM_KERNEL_INLINE void step(const float* b, A a) {
    V bv[NV];
    FM_UNROLL for (int v = 0; v < NV; ++v) bv[v] = VT::load_mask(v == NV - 1 ? last : kFull, b + v * W);
    FM_UNROLL for (int i = 0; i < MR; ++i) {
      const V ai = VT::set1(a(i));
      FM_UNROLL for (int v = 0; v < NV; ++v) acc[i][v] = VT::fmadd(ai, bv[v], acc[i][v]);
    }
  }
  // row(i)[columns] += scale(i) * acc[i].
  template <class Row, class Scale>
  FM_KERNEL_INLINE void add_to(Row row, Scale scale) const {
    FM_UNROLL for (int i = 0; i < MR; ++i) {
      const V s = VT::set1(scale(i));
      float* t = row(i);
      FM_UNROLL for (int v = 0; v < NV; ++v) {
        const unsigned m = v == NV - 1 ? last : kFull;
        VT::store_mask(t + v * W, m, VT::fmadd(s, acc[i][v], VT::load_mask(m, t + v * W)));
      }
    }
  }
};

// 1x1 weight-gradient tile: rows [r0, r0 + MR) x NV vectors of columns from j0.
template <int MR, int NV>
FM_TARGET void wgrad_lanes_tile(const Wgrad1x1LanesJob& job, int r0, int64_t j0, unsigned last) {
  LanesTile<MR, NV> tile(last);
  const float* a[MR];
  FM_UNROLL for (int i = 0; i < MR; ++i) a[i] = job.a_row[r0 + i];
  const float* b = job.bt + j0;
  for (int64_t p = 0; p < job.L; ++p, b += job.ldb) tile.step(b, [&](int i) { return a[i][p]; });
  tile.add_to([&](int i) { return job.t_row[r0 + i] + j0; },
              [&](int i) { return job.row_scale ? job.row_scale[r0 + i] : 1.0f; });
}

// Rows [r0, nrows) of one column tile of nv (1 ... NV) vectors: MR-row tiles, then
// the rows left one size down at a time.
template <int NV, int MR = VT::kLanesRows>
FM_TARGET void wgrad_lanes_rows(const Wgrad1x1LanesJob& job, int r0, int64_t j0, unsigned last) {
  for (; r0 + MR <= job.nrows; r0 += MR) wgrad_lanes_tile<MR, NV>(job, r0, j0, last);
  if constexpr (MR > 1) wgrad_lanes_rows<NV, MR - 1>(job, r0, j0, last);
}

void run_wgrad_1x1_lanes(const Wgrad1x1LanesJob& job) {
  constexpr int NV = VT::kLanesVecs;
  for (int64_t j0 = 0; j0 < job.ncols; j0 += NV * W) {
    const int64_t left = job.ncols - j0 < NV * W ? job.ncols - j0 : NV * W;
    const int nv = (int)((left + W - 1) / W);
    const int64_t tail = left - (int64_t)(nv - 1) * W;  // lanes of the last vector, 1 ... W
    const unsigned last = tail == W ? (1u << W) - 1u : (1u << tail) - 1u;
    static_assert(NV <= 4, "wgrad_lanes: extend the switch below");
    switch (nv) {
      case 4: if constexpr (NV >= 4) wgrad_lanes_rows<4>(job, 0, j0, last); break;
      case 3: if constexpr (NV >= 3) wgrad_lanes_rows<3>(job, 0, j0, last); break;
      case 2: wgrad_lanes_rows<2>(job, 0, j0, last); break;
      default: wgrad_lanes_rows<1>(job, 0, j0, last); break;
    }
  }
}

// Grouped-conv lanes tile: pairs [k0, k0 + MR) x NV vectors of columns from j0,
// summed over every sample and pixel, then added into t.
template <int MR, int NV>
FM_TARGET void taps_lanes_tile(const WgradTapsLanesJob& job, int k0, int64_t j0, unsigned last) {
  LanesTile<MR, NV> tile(last);
  for (int s = 0; s < job.ns; ++s) {
    const float* a[MR];
    FM_UNROLL for (int i = 0; i < MR; ++i) a[i] = job.xpad[s] + job.koff[k0 + i];
    const float* b = job.bt[s] + j0;
    for (int64_t y = 0; y < job.H; ++y) {
      const int64_t q0 = y * job.Wp;
      for (int64_t x = 0; x < job.W; ++x, b += job.ldb) tile.step(b, [&](int i) { return a[i][q0 + x]; });
    }
  }
  tile.add_to([&](int i) { return job.t + (k0 + i) * job.ldt + j0; }, [](int) { return 1.0f; });
}

// Pairs [k0, nk) for one column tile of NV vectors: MR-pair tiles, then smaller.
template <int NV, int MR>
FM_TARGET void taps_lanes_pairs(const WgradTapsLanesJob& job, int k0, int64_t j0, unsigned last) {
  for (; k0 + MR <= job.nk; k0 += MR) taps_lanes_tile<MR, NV>(job, k0, j0, last);
  if constexpr (MR > 1) taps_lanes_pairs<NV, MR - 1>(job, k0, j0, last);
}

void run_wgrad_taps_lanes(const WgradTapsLanesJob& job) {
  // Column tiles of 2 vectors or of 1 (a block of 16 rows; AVX2: 8).
  constexpr int M2 = VT::kTapsLanes2, M1 = VT::kTapsLanes1;
  for (int64_t j0 = 0; j0 < job.ncols; j0 += 2 * W) {
    const int64_t left = job.ncols - j0 < 2 * W ? job.ncols - j0 : 2 * W;
    const int64_t tail = left > W ? left - W : left;
    const unsigned last = tail == W ? (1u << W) - 1u : (1u << tail) - 1u;
    if (left > W) taps_lanes_pairs<2, M2>(job, 0, j0, last);
    else taps_lanes_pairs<1, M1>(job, 0, j0, last);
  }
}

#undef FM_KERNEL_INLINE

}  // namespace FM_NS
