// Direct routed convolution kernels (see routed_conv_cpu_direct.h).
#include "routed_conv/routed_conv_cpu_direct.h"

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FM_HAVE_AVX512 1
#include <immintrin.h>
#define FM_AVX512 __attribute__((target("avx512f,fma")))
// The register tile must be fully unrolled, or acc[][] lives on the stack.
#define FM_UNROLL _Pragma("GCC unroll 16")
#endif

namespace fastmod {
namespace routed_conv {
namespace direct {

bool available() {
#ifdef FM_HAVE_AVX512
  static const bool yes = [] {
    const char* env = std::getenv("FASTMOD_ROUTED_CONV_DIRECT");
    if (env != nullptr && env[0] == '0') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return yes;
#else
  return false;
#endif
}

bool same_size(int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t stride_h, int64_t stride_w,
               int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w) {
  return stride_h == 1 && stride_w == 1 && 2 * pad_h == dil_h * (kh - 1) &&
         2 * pad_w == dil_w * (kw - 1) && H > 0 && W > 0;
}

PixelPlan make_plan(int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t pad_h, int64_t pad_w,
                    int64_t dil_h, int64_t dil_w) {
  PixelPlan p;
  p.H = H;
  p.W = W;
  p.L = H * W;
  p.KK = (int)(kh * kw);
  const int64_t T = p.tiles();
  p.tap_offset.resize(p.KK);
  p.tap_mask.assign(T * p.KK * 2, 0);
  p.store_mask.assign(T * 2, 0);
  for (int64_t ky = 0; ky < kh; ++ky)
    for (int64_t kx = 0; kx < kw; ++kx) {
      const int64_t t = ky * kw + kx, dy = ky * dil_h - pad_h, dx = kx * dil_w - pad_w;
      p.tap_offset[t] = dy * W + dx;
      for (int64_t tile = 0; tile < T; ++tile)
        for (int v = 0; v < 2; ++v) {
          uint16_t m = 0;
          for (int j = 0; j < 16; ++j) {
            const int64_t px = tile * kPixels + v * 16 + j;
            if (px >= p.L) break;
            const int64_t y = px / W + dy, xx = px % W + dx;
            if (y >= 0 && y < H && xx >= 0 && xx < W) m |= (uint16_t)(1u << j);
          }
          p.tap_mask[(tile * p.KK + t) * 2 + v] = m;
        }
    }
  for (int64_t tile = 0; tile < T; ++tile)
    for (int v = 0; v < 2; ++v) {
      uint16_t m = 0;
      for (int j = 0; j < 16; ++j)
        if (tile * kPixels + v * 16 + j < p.L) m |= (uint16_t)(1u << j);
      p.store_mask[tile * 2 + v] = m;
    }
  return p;
}

#ifdef FM_HAVE_AVX512
namespace {

// acc += the segment's channels [c0, c1) over all taps; SCALED multiplies the
// input vectors by the segment scale (a template flag: a runtime test per tap
// costs as much as the FMAs it guards).
template <int MR, int NV, int KKT, bool SCALED, bool FLIP>
FM_AVX512 inline __attribute__((always_inline)) void accumulate(
    __m512 (&acc)[MR][NV], const float* x, const float* const* w, int64_t cstride, int64_t c0,
    int64_t c1, float scale, int64_t L, int KK_rt, const int64_t* off, const uint16_t* masks) {
  const int KK = KKT ? KKT : KK_rt;
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t c = c0; c < c1; ++c) {
    const float* xc = x + c * L;
    const int64_t wc = c * cstride;
    FM_UNROLL for (int t = 0; t < KK; ++t) {
      __m512 b[NV];
      FM_UNROLL for (int v = 0; v < NV; ++v) {
        b[v] = _mm512_maskz_loadu_ps((__mmask16)masks[t * 2 + v], xc + off[t] + v * 16);
        if (SCALED) b[v] = _mm512_mul_ps(b[v], sc);
      }
      FM_UNROLL for (int i = 0; i < MR; ++i) {
        const __m512 a = _mm512_set1_ps(w[i][wc + (FLIP ? -t : t)]);
        FM_UNROLL for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(a, b[v], acc[i][v]);
      }
    }
  }
}

// One register tile: MR rows x NV*16 pixels starting at tile_idx*kPixels, all
// segments and taps.  KKT is the tap count when known at compile time (1 or 9),
// else 0 (runtime kk).
template <int MR, int NV, int KKT, bool FLIP>
FM_AVX512 void tile(const RowJob& job, const PixelPlan& plan, int64_t tile_idx) {
  const int64_t p0 = tile_idx * kPixels;
  const uint16_t* masks = plan.tap_mask.data() + tile_idx * plan.KK * 2;
  __m512 acc[MR][NV];
  FM_UNROLL for (int i = 0; i < MR; ++i)
    FM_UNROLL for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  const float* x = job.x + p0;
  for (int s = 0; s < job.nseg; ++s) {
    const Segment seg = job.segs[s];
    if (seg.scale == 1.0f)
      accumulate<MR, NV, KKT, false, FLIP>(acc, x, job.w_row, job.w_cstride, seg.c0, seg.c1, 1.0f,
                                           plan.L, plan.KK, plan.tap_offset.data(), masks);
    else
      accumulate<MR, NV, KKT, true, FLIP>(acc, x, job.w_row, job.w_cstride, seg.c0, seg.c1,
                                          seg.scale, plan.L, plan.KK, plan.tap_offset.data(), masks);
  }
  const uint16_t* sm = plan.store_mask.data() + tile_idx * 2;
  FM_UNROLL for (int i = 0; i < MR; ++i) {
    const __m512 bias = _mm512_set1_ps(job.bias ? job.bias[i] : 0.0f);
    const __m512 rs = _mm512_set1_ps(job.row_scale ? job.row_scale[i] : 1.0f);
    FM_UNROLL for (int v = 0; v < NV; ++v) {
      __m512 r = _mm512_add_ps(acc[i][v], bias);
      if (job.row_scale) r = _mm512_mul_ps(r, rs);
      _mm512_mask_storeu_ps(job.out_row[i] + p0 + v * 16, (__mmask16)sm[v], r);
    }
  }
}

template <int MR, int KKT, bool FLIP>
FM_AVX512 void rows_flip(const RowJob& job, const PixelPlan& plan) {
  const int64_t T = plan.tiles();
  for (int64_t t = 0; t < T; ++t) {
    if (plan.L - t * kPixels > 16) tile<MR, 2, KKT, FLIP>(job, plan, t);
    else tile<MR, 1, KKT, FLIP>(job, plan, t);
  }
}

template <int MR, int KKT>
void rows(const RowJob& job, const PixelPlan& plan) {
  if (job.w_flip) rows_flip<MR, KKT, true>(job, plan);
  else rows_flip<MR, KKT, false>(job, plan);
}

template <int KKT>
void rows_any(const RowJob& job, const PixelPlan& plan) {
  switch (job.nrows) {
    case 1: return rows<1, KKT>(job, plan);
    case 2: return rows<2, KKT>(job, plan);
    case 3: return rows<3, KKT>(job, plan);
    case 4: return rows<4, KKT>(job, plan);
    case 5: return rows<5, KKT>(job, plan);
    case 6: return rows<6, KKT>(job, plan);
    case 7: return rows<7, KKT>(job, plan);
    case 8: return rows<8, KKT>(job, plan);
    case 9: return rows<9, KKT>(job, plan);
    case 10: return rows<10, KKT>(job, plan);
    case 11: return rows<11, KKT>(job, plan);
    default: return rows<12, KKT>(job, plan);
  }
}

// Weight-gradient tile: MR dy rows x NT taps (t0 ...) of channel c, summed over
// every pixel in 16-lane vectors, then reduced across lanes once.
template <int MR, int NT>
FM_AVX512 void wgrad_taps(const WgradJob& job, const PixelPlan& plan, int64_t c, int t0) {
  const int64_t L = plan.L, V = (L + 15) / 16;
  const int KK = plan.KK;
  const float* xc = job.x + c * L;
  const int64_t* off = plan.tap_offset.data() + t0;
  __m512 acc[MR][NT];
  FM_UNROLL for (int i = 0; i < MR; ++i)
    FM_UNROLL for (int t = 0; t < NT; ++t) acc[i][t] = _mm512_setzero_ps();
  for (int64_t v = 0; v < V; ++v) {
    const int64_t p = v * 16;
    const uint16_t* tm = plan.tap_mask.data() + (v >> 1) * KK * 2 + (v & 1) + t0 * 2;
    const __mmask16 sm = (__mmask16)plan.store_mask[(v >> 1) * 2 + (v & 1)];
    __m512 a[MR];
    FM_UNROLL for (int i = 0; i < MR; ++i) a[i] = _mm512_maskz_loadu_ps(sm, job.dy_row[i] + p);
    FM_UNROLL for (int t = 0; t < NT; ++t) {
      const __m512 b = _mm512_maskz_loadu_ps((__mmask16)tm[t * 2], xc + p + off[t]);
      FM_UNROLL for (int i = 0; i < MR; ++i) acc[i][t] = _mm512_fmadd_ps(a[i], b, acc[i][t]);
    }
  }
  FM_UNROLL for (int i = 0; i < MR; ++i) {
    const float s = job.row_scale ? job.row_scale[i] : 1.0f;
    float* dw = job.dw_row[i] + c * KK + t0;
    FM_UNROLL for (int t = 0; t < NT; ++t) dw[t] += s * _mm512_reduce_add_ps(acc[i][t]);
  }
}

// 1x1 weight-gradient tile: MR dy rows x CT channels (c0 ...).
template <int MR, int CT>
FM_AVX512 void wgrad_1x1(const WgradJob& job, const PixelPlan& plan, int64_t c0) {
  const int64_t L = plan.L, V = (L + 15) / 16;
  __m512 acc[MR][CT];
  FM_UNROLL for (int i = 0; i < MR; ++i)
    FM_UNROLL for (int j = 0; j < CT; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t v = 0; v < V; ++v) {
    const int64_t p = v * 16;
    const __mmask16 sm = (__mmask16)plan.store_mask[(v >> 1) * 2 + (v & 1)];
    __m512 a[MR];
    FM_UNROLL for (int i = 0; i < MR; ++i) a[i] = _mm512_maskz_loadu_ps(sm, job.dy_row[i] + p);
    FM_UNROLL for (int j = 0; j < CT; ++j) {
      const __m512 b = _mm512_maskz_loadu_ps(sm, job.x + (c0 + j) * L + p);
      FM_UNROLL for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_fmadd_ps(a[i], b, acc[i][j]);
    }
  }
  FM_UNROLL for (int i = 0; i < MR; ++i) {
    const float s = job.row_scale ? job.row_scale[i] : 1.0f;
    FM_UNROLL for (int j = 0; j < CT; ++j) job.dw_row[i][c0 + j] += s * _mm512_reduce_add_ps(acc[i][j]);
  }
}

template <int MR>
void wgrad_rows(const WgradJob& job, const PixelPlan& plan) {
  if (plan.KK == 9) {
    for (int64_t c = job.c0; c < job.c1; ++c) wgrad_taps<MR, 9>(job, plan, c, 0);
  } else if (plan.KK == 1) {
    int64_t c = job.c0;
    for (; c + 8 <= job.c1; c += 8) wgrad_1x1<MR, 8>(job, plan, c);
    for (; c < job.c1; ++c) wgrad_1x1<MR, 1>(job, plan, c);
  } else {
    for (int64_t c = job.c0; c < job.c1; ++c)
      for (int t = 0; t < plan.KK; ++t) wgrad_taps<MR, 1>(job, plan, c, t);
  }
}

// Channels-last weight-gradient tile: MR rows x kChunk channels, one tap at a time.
template <int MR>
FM_AVX512 void wgrad_cl(const WgradClJob& job, const ClPlan& plan) {
  constexpr int NC = kChunk / 16;
  const int64_t H = plan.H, W = plan.W, Wp = plan.Wp;
  for (int t = 0; t < plan.KK; ++t) {
    __m512 acc[MR][NC];
    FM_UNROLL for (int i = 0; i < MR; ++i)
      FM_UNROLL for (int j = 0; j < NC; ++j) acc[i][j] = _mm512_setzero_ps();
    for (int64_t y = 0; y < H; ++y) {
      const float* xr = job.xp + (y * Wp + plan.tap_offset[t]) * kChunk;
      const int64_t p0 = y * W;
      for (int64_t x = 0; x < W; ++x) {
        __m512 b[NC];
        FM_UNROLL for (int j = 0; j < NC; ++j) b[j] = _mm512_loadu_ps(xr + x * kChunk + 16 * j);
        FM_UNROLL for (int i = 0; i < MR; ++i) {
          const __m512 a = _mm512_set1_ps(job.dy_row[i][p0 + x]);
          FM_UNROLL for (int j = 0; j < NC; ++j) acc[i][j] = _mm512_fmadd_ps(a, b[j], acc[i][j]);
        }
      }
    }
    FM_UNROLL for (int i = 0; i < MR; ++i) {
      const __m512 s = _mm512_set1_ps(job.row_scale ? job.row_scale[i] : 1.0f);
      float* dst = job.acc_row[i] + t * kChunk;
      FM_UNROLL for (int j = 0; j < NC; ++j)
        _mm512_storeu_ps(dst + 16 * j, _mm512_fmadd_ps(s, acc[i][j], _mm512_loadu_ps(dst + 16 * j)));
    }
  }
}

}  // namespace
#endif

void run_rows(const RowJob& job, const PixelPlan& plan) {
#ifdef FM_HAVE_AVX512
  for (int r0 = 0; r0 < job.nrows; r0 += kRows) {
    RowJob sub = job;
    sub.w_row += r0;
    sub.out_row += r0;
    if (sub.row_scale) sub.row_scale += r0;
    if (sub.bias) sub.bias += r0;
    sub.nrows = job.nrows - r0 < kRows ? job.nrows - r0 : kRows;
    if (plan.KK == 9) rows_any<9>(sub, plan);
    else if (plan.KK == 1) rows_any<1>(sub, plan);
    else rows_any<0>(sub, plan);
  }
#else
  (void)job;
  (void)plan;
  std::abort();  // callers check available() first
#endif
}

void run_wgrad(const WgradJob& job, const PixelPlan& plan) {
#ifdef FM_HAVE_AVX512
  for (int r0 = 0; r0 < job.nrows; r0 += 2) {
    WgradJob sub = job;
    sub.dy_row += r0;
    sub.dw_row += r0;
    if (sub.row_scale) sub.row_scale += r0;
    if (job.nrows - r0 >= 2) wgrad_rows<2>(sub, plan);
    else wgrad_rows<1>(sub, plan);
  }
#else
  (void)job;
  (void)plan;
  std::abort();
#endif
}

ClPlan make_cl_plan(int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t pad_h, int64_t pad_w,
                    int64_t dil_h, int64_t dil_w) {
  ClPlan p;
  p.H = H;
  p.W = W;
  p.pad_h = pad_h;
  p.pad_w = pad_w;
  p.Hp = H + 2 * pad_h;
  p.Wp = W + 2 * pad_w;
  p.KK = (int)(kh * kw);
  for (int64_t ky = 0; ky < kh; ++ky)
    for (int64_t kx = 0; kx < kw; ++kx) p.tap_offset.push_back(ky * dil_h * p.Wp + kx * dil_w);
  return p;
}

void pack_cl(const float* x, const ClPlan& plan, float* xp) {
  // Blocked over pixels so the kChunk channel rows are read in runs and xp written
  // in whole cache lines.
  const int64_t L = plan.H * plan.W;
  constexpr int64_t kB = 64;
  for (int64_t p0 = 0; p0 < L; p0 += kB) {
    const int64_t p1 = p0 + kB < L ? p0 + kB : L;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t y = p / plan.W, xx = p % plan.W;
      float* dst = xp + ((y + plan.pad_h) * plan.Wp + xx + plan.pad_w) * kChunk;
      for (int j = 0; j < kChunk; ++j) dst[j] = x[j * L + p];
    }
  }
}

void run_wgrad_cl(const WgradClJob& job, const ClPlan& plan) {
#ifdef FM_HAVE_AVX512
  constexpr int kClRows = 8;  // 8 rows x 2 channel vectors = 16 accumulators
  for (int r0 = 0; r0 < job.nrows; r0 += kClRows) {
    WgradClJob sub = job;
    sub.dy_row += r0;
    sub.acc_row += r0;
    if (sub.row_scale) sub.row_scale += r0;
    switch (job.nrows - r0 < kClRows ? job.nrows - r0 : kClRows) {
      case 1: wgrad_cl<1>(sub, plan); break;
      case 2: wgrad_cl<2>(sub, plan); break;
      case 3: wgrad_cl<3>(sub, plan); break;
      case 4: wgrad_cl<4>(sub, plan); break;
      case 5: wgrad_cl<5>(sub, plan); break;
      case 6: wgrad_cl<6>(sub, plan); break;
      case 7: wgrad_cl<7>(sub, plan); break;
      default: wgrad_cl<8>(sub, plan); break;
    }
  }
#else
  (void)job;
  (void)plan;
  std::abort();
#endif
}

#ifdef FM_HAVE_AVX512
FM_AVX512 static float dot_avx512(const float* a, const float* b, int64_t n) {
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t j = 0;
  for (; j + 64 <= n; j += 64)
    FM_UNROLL for (int u = 0; u < 4; ++u)
      acc[u] = _mm512_fmadd_ps(_mm512_loadu_ps(a + j + 16 * u), _mm512_loadu_ps(b + j + 16 * u), acc[u]);
  for (; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
    acc[0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + j), _mm512_maskz_loadu_ps(m, b + j), acc[0]);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}
#endif

float dot(const float* a, const float* b, int64_t n) {
#ifdef FM_HAVE_AVX512
  return dot_avx512(a, b, n);
#else
  float s = 0.0f;
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
#endif
}

}  // namespace direct
}  // namespace routed_conv
}  // namespace fastmod
