// Direct routed convolution kernels (see routed_conv_cpu_direct.h): the plans here,
// the kernels in routed_conv_cpu_direct_isa.h, compiled once for AVX-512 and once
// for AVX2 + FMA; the CPU picks one at run time.
#include "routed_conv/routed_conv_cpu_direct.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FM_HAVE_X86 1
#include <immintrin.h>
// The register tile must be fully unrolled, or acc[][] lives on the stack.
#define FM_UNROLL _Pragma("GCC unroll 16")
#define FM_AVX512_T __attribute__((target("avx512f,fma")))
#define FM_AVX2_T __attribute__((target("avx2,fma")))
#define FM_VI static inline __attribute__((always_inline))
#endif

namespace fastmod {
namespace routed_conv {
namespace direct {

namespace {

enum class Isa { None, Avx2, Avx512 };

// FASTMOD_ROUTED_CONV_DIRECT=0 turns the direct kernels off, =avx2 forces the AVX2
// build on an AVX-512 CPU (tests use both).
Isa isa() {
#ifdef FM_HAVE_X86
  static const Isa v = [] {
    const char* env = std::getenv("FASTMOD_ROUTED_CONV_DIRECT");
    if (env != nullptr && env[0] == '0') return Isa::None;
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (env != nullptr && std::strcmp(env, "avx2") == 0) return avx2 ? Isa::Avx2 : Isa::None;
    if (__builtin_cpu_supports("avx512f")) return Isa::Avx512;
    return avx2 ? Isa::Avx2 : Isa::None;
  }();
  return v;
#else
  return Isa::None;
#endif
}

}  // namespace

bool available() { return isa() != Isa::None; }

bool same_size(int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t stride_h, int64_t stride_w,
               int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w) {
  return stride_h >= 1 && stride_w >= 1 && 2 * pad_h == dil_h * (kh - 1) &&
         2 * pad_w == dil_w * (kw - 1) && H > 0 && W > 0;
}

namespace {

int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// A plan over an Lo = Ho x Wo pixel grid whose tap t reads grid offset (di[t], dj[t])
// of the channel's part `part[t]` (Lo floats each): lanes whose grid position falls
// outside the grid are masked off.
PixelPlan grid_plan(int64_t Ho, int64_t Wo, int64_t XL, const std::vector<int64_t>& di,
                    const std::vector<int64_t>& dj, const std::vector<int64_t>& part) {
  static std::atomic<uint64_t> next_id{1};
  PixelPlan p;
  p.id = next_id.fetch_add(1, std::memory_order_relaxed);
  p.H = Ho;
  p.W = Wo;
  p.L = Ho * Wo;
  p.XL = XL;
  p.KK = (int)di.size();
  const int64_t T = p.tiles();
  p.tap_offset.resize(p.KK);
  p.tap_mask.assign(T * p.KK * 2, 0);
  p.store_mask.assign(T * 2, 0);
  for (int t = 0; t < p.KK; ++t) {
    p.tap_offset[t] = part[t] * p.L + di[t] * Wo + dj[t];
    p.max_offset = t == 0 ? p.tap_offset[t] : std::max(p.max_offset, p.tap_offset[t]);
    for (int64_t tile = 0; tile < T; ++tile)
      for (int v = 0; v < 2; ++v) {
        uint16_t m = 0;
        for (int j = 0; j < 16; ++j) {
          const int64_t px = tile * kPixels + v * 16 + j;
          if (px >= p.L) break;
          const int64_t y = px / Wo + di[t], xx = px % Wo + dj[t];
          if (y >= 0 && y < Ho && xx >= 0 && xx < Wo) m |= (uint16_t)(1u << j);
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

}  // namespace

Phases make_phases(int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t pad_h,
                   int64_t pad_w, int64_t dil_h, int64_t dil_w) {
  Phases ph;
  ph.H = H;
  ph.W = W;
  ph.sh = sh;
  ph.sw = sw;
  ph.Ho = (H + sh - 1) / sh;  // "same" padding
  ph.Wo = (W + sw - 1) / sw;
  ph.KK = (int)(kh * kw);
  for (int64_t ky = 0; ky < kh; ++ky)
    for (int64_t kx = 0; kx < kw; ++kx) {
      const int64_t r = ky * dil_h - pad_h, c = kx * dil_w - pad_w;
      const int64_t di = floor_div(r, sh), dj = floor_div(c, sw);
      ph.phase.push_back((int)((r - di * sh) * sw + (c - dj * sw)));
      ph.di.push_back(di);
      ph.dj.push_back(dj);
    }
  ph.phase_begin.assign(ph.count() + 1, 0);
  for (int64_t q = 0; q < ph.count(); ++q) {
    ph.phase_begin[q] = (int)ph.order.size();
    for (int t = 0; t < ph.KK; ++t)
      if (ph.phase[t] == q) ph.order.push_back(t);
  }
  ph.phase_begin[ph.count()] = (int)ph.order.size();
  return ph;
}

PixelPlan make_plan(const Phases& ph) {
  std::vector<int64_t> part(ph.phase.begin(), ph.phase.end());
  return grid_plan(ph.Ho, ph.Wo, ph.count() * ph.Lo(), ph.di, ph.dj, part);
}

PixelPlan make_transposed_plan(const Phases& ph, int q) {
  std::vector<int64_t> di, dj;
  for (int k = ph.phase_begin[q]; k < ph.phase_begin[q + 1]; ++k) {
    di.push_back(-ph.di[ph.order[k]]);
    dj.push_back(-ph.dj[ph.order[k]]);
  }
  return grid_plan(ph.Ho, ph.Wo, ph.Lo(), di, dj, std::vector<int64_t>(di.size(), 0));
}

PixelPlan make_plan(int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t pad_h, int64_t pad_w,
                    int64_t dil_h, int64_t dil_w) {
  return make_plan(make_phases(H, W, kh, kw, 1, 1, pad_h, pad_w, dil_h, dil_w));
}

namespace {

// dst_even[j] = src[2j], dst_odd[j] = src[2j + 1] for 2j + 1 < n; n even or odd.
// SSE (part of every x86-64 CPU): the stride-2 convs' copies in 4-float shuffles.
void deinterleave2(const float* src, int64_t n, float* even, float* odd) {
  int64_t j = 0;
#ifdef FM_HAVE_X86
  for (; 2 * j + 8 <= n; j += 4) {
    const __m128 a = _mm_loadu_ps(src + 2 * j), b = _mm_loadu_ps(src + 2 * j + 4);
    _mm_storeu_ps(even + j, _mm_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0)));
    _mm_storeu_ps(odd + j, _mm_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
  }
#endif
  for (; 2 * j < n; ++j) {
    even[j] = src[2 * j];
    if (2 * j + 1 < n) odd[j] = src[2 * j + 1];
  }
}

void interleave2(const float* even, const float* odd, int64_t n, float* dst) {
  int64_t j = 0;
#ifdef FM_HAVE_X86
  for (; 2 * j + 8 <= n; j += 4) {
    const __m128 e = _mm_loadu_ps(even + j), o = _mm_loadu_ps(odd + j);
    _mm_storeu_ps(dst + 2 * j, _mm_unpacklo_ps(e, o));
    _mm_storeu_ps(dst + 2 * j + 4, _mm_unpackhi_ps(e, o));
  }
#endif
  for (; 2 * j < n; ++j) {
    dst[2 * j] = even[j];
    if (2 * j + 1 < n) dst[2 * j + 1] = odd[j];
  }
}

}  // namespace

void pack_phases(const float* x, const Phases& ph, float* xph) {
  const int64_t Lo = ph.Lo();
  for (int64_t a = 0; a < ph.sh; ++a)
    for (int64_t i = 0; i < ph.Ho; ++i) {
      const int64_t y = i * ph.sh + a;
      float* dst = xph + a * ph.sw * Lo + i * ph.Wo;  // row i of phase (a, 0); phase (a, b) is b * Lo on
      if (y >= ph.H) {
        for (int64_t b = 0; b < ph.sw; ++b) std::memset(dst + b * Lo, 0, sizeof(float) * ph.Wo);
        continue;
      }
      const float* src = x + y * ph.W;
      if (ph.sw == 2) {
        deinterleave2(src, ph.W, dst, dst + Lo);
        if (ph.W % 2) dst[Lo + ph.Wo - 1] = 0.0f;  // odd width: the last odd column is past the image
        continue;
      }
      for (int64_t b = 0; b < ph.sw; ++b) {
        float* row = dst + b * Lo;
        const int64_t n = b < ph.W ? (ph.W - b + ph.sw - 1) / ph.sw : 0;  // columns inside the image
        for (int64_t j = 0; j < n; ++j) row[j] = src[b + j * ph.sw];
        for (int64_t j = n; j < ph.Wo; ++j) row[j] = 0.0f;
      }
    }
}

void unpack_phases(const float* xph, const Phases& ph, float* x) {
  const int64_t Lo = ph.Lo();
  for (int64_t a = 0; a < ph.sh; ++a)
    for (int64_t i = 0; i < ph.Ho && i * ph.sh + a < ph.H; ++i) {
      const float* src = xph + a * ph.sw * Lo + i * ph.Wo;
      float* dst = x + (i * ph.sh + a) * ph.W;
      if (ph.sw == 2) {
        interleave2(src, src + Lo, ph.W, dst);
        continue;
      }
      for (int64_t b = 0; b < ph.sw && b < ph.W; ++b) {
        const int64_t n = (ph.W - b + ph.sw - 1) / ph.sw;
        for (int64_t j = 0; j < n; ++j) dst[b + j * ph.sw] = src[b * Lo + j];
      }
    }
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

void transpose(const float* src, int64_t ld_src, int64_t rows, int64_t cols, float* dst, int64_t ld_dst) {
  // 16 x 16 blocks: both sides touch whole cache lines while the block is in L1.
  constexpr int64_t kB = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kB) {
    const int64_t r1 = r0 + kB < rows ? r0 + kB : rows;
    for (int64_t c0 = 0; c0 < cols; c0 += kB) {
      const int64_t c1 = c0 + kB < cols ? c0 + kB : cols;
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * ld_dst + r] = src[r * ld_src + c];
    }
  }
}

#ifdef FM_HAVE_X86
// ---- vector traits and the two kernel builds -------------------------------------
struct Avx512Traits {
  using V = __m512;
  static constexpr int W = 16;
  static constexpr int kTileRows = 12;     // 12 x 2 accumulators of 32 registers
  static constexpr int kTapRows = 2;       // 2 rows x 9 taps
  static constexpr int k1x1Channels = 8;   // 2 rows x 8 channels
  static constexpr int kClRows = 8;        // 8 rows x 2 channel vectors
  static constexpr int kLanesRows = 6;     // 6 rows x 4 column vectors (wgrad_lanes)
  static constexpr int kLanesVecs = 4;
  static constexpr int kTapsLanes2 = 12;   // 12 pairs x 2 vectors, 8 x 1 (wgrad_taps_lanes)
  static constexpr int kTapsLanes1 = 8;
  FM_AVX512_T FM_VI V zero() { return _mm512_setzero_ps(); }
  FM_AVX512_T FM_VI V set1(float f) { return _mm512_set1_ps(f); }
  FM_AVX512_T FM_VI V loadu(const float* p) { return _mm512_loadu_ps(p); }
  FM_AVX512_T FM_VI void storeu(float* p, V v) { _mm512_storeu_ps(p, v); }
  FM_AVX512_T FM_VI V add(V a, V b) { return _mm512_add_ps(a, b); }
  FM_AVX512_T FM_VI V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  FM_AVX512_T FM_VI V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  // Masked-off lanes are neither read nor written (no fault past the tensor's end).
  FM_AVX512_T FM_VI V load_mask(unsigned m, const float* p) { return _mm512_maskz_loadu_ps((__mmask16)m, p); }
  FM_AVX512_T FM_VI void store_mask(float* p, unsigned m, V v) { _mm512_mask_storeu_ps(p, (__mmask16)m, v); }
  FM_AVX512_T FM_VI float reduce(V v) { return _mm512_reduce_add_ps(v); }
};

struct Avx2Traits {
  using V = __m256;
  static constexpr int W = 8;
  static constexpr int kTileRows = 6;      // 6 x 2 accumulators of 16 registers
  static constexpr int kTapRows = 1;       // 1 row x 9 taps
  static constexpr int k1x1Channels = 6;   // 2 rows x 6 channels
  static constexpr int kClRows = 2;        // 2 rows x 4 channel vectors
  static constexpr int kLanesRows = 4;     // 4 rows x 2 column vectors (wgrad_lanes)
  static constexpr int kLanesVecs = 2;
  static constexpr int kTapsLanes2 = 6;    // 6 pairs x 2 vectors, 6 x 1 (wgrad_taps_lanes)
  static constexpr int kTapsLanes1 = 6;
  FM_AVX2_T FM_VI V zero() { return _mm256_setzero_ps(); }
  FM_AVX2_T FM_VI V set1(float f) { return _mm256_set1_ps(f); }
  FM_AVX2_T FM_VI V loadu(const float* p) { return _mm256_loadu_ps(p); }
  FM_AVX2_T FM_VI void storeu(float* p, V v) { _mm256_storeu_ps(p, v); }
  FM_AVX2_T FM_VI V add(V a, V b) { return _mm256_add_ps(a, b); }
  FM_AVX2_T FM_VI V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  FM_AVX2_T FM_VI V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  FM_AVX2_T FM_VI __m256i lanes(unsigned m) {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)m), bit), bit);
  }
  // vmaskmov does not fault on masked-off lanes either; full masks take the plain
  // (faster) load/store.
  FM_AVX2_T FM_VI V load_mask(unsigned m, const float* p) {
    return m == 0xFFu ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lanes(m));
  }
  FM_AVX2_T FM_VI void store_mask(float* p, unsigned m, V v) {
    if (m == 0xFFu) _mm256_storeu_ps(p, v);
    else _mm256_maskstore_ps(p, lanes(m), v);
  }
  FM_AVX2_T FM_VI float reduce(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
};

#define FM_NS avx512
#define FM_TARGET FM_AVX512_T
#define FM_VT Avx512Traits
#include "routed_conv/routed_conv_cpu_direct_isa.h"
#undef FM_NS
#undef FM_TARGET
#undef FM_VT

#define FM_NS avx2
#define FM_TARGET FM_AVX2_T
#define FM_VT Avx2Traits
#include "routed_conv/routed_conv_cpu_direct_isa.h"
#undef FM_NS
#undef FM_TARGET
#undef FM_VT

#define FM_DISPATCH(fn, ...) \
  (isa() == Isa::Avx512 ? avx512::fn(__VA_ARGS__) : avx2::fn(__VA_ARGS__))

// Callers check available() first.
void run_rows(const RowJob& job, const PixelPlan& plan) { FM_DISPATCH(run_rows, job, plan); }
void run_wgrad(const WgradJob* jobs, int n, const PixelPlan& plan) { FM_DISPATCH(run_wgrad, jobs, n, plan); }
void run_wgrad_cl(const WgradClJob& job, const ClPlan& plan) { FM_DISPATCH(run_wgrad_cl, job, plan); }
void run_wgrad_1x1_lanes(const Wgrad1x1LanesJob& job) { FM_DISPATCH(run_wgrad_1x1_lanes, job); }
void run_wgrad_taps_lanes(const WgradTapsLanesJob& job) { FM_DISPATCH(run_wgrad_taps_lanes, job); }
float dot(const float* a, const float* b, int64_t n) { return FM_DISPATCH(dot, a, b, n); }
#else
// Not x86: available() is false and nothing calls these.
void run_rows(const RowJob&, const PixelPlan&) { std::abort(); }
void run_wgrad(const WgradJob*, int, const PixelPlan&) { std::abort(); }
void run_wgrad_cl(const WgradClJob&, const ClPlan&) { std::abort(); }
void run_wgrad_1x1_lanes(const Wgrad1x1LanesJob&) { std::abort(); }
void run_wgrad_taps_lanes(const WgradTapsLanesJob&) { std::abort(); }
float dot(const float*, const float*, int64_t) { std::abort(); }
#endif

}  // namespace direct
}  // namespace routed_conv
}  // namespace fastmod
