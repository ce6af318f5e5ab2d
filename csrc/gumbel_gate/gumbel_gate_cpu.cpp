// CPU kernels of the Gumbel-sigmoid straight-through gate (issue 3).
//
// Noise: Philox4x32-10 keyed by the 64-bit seed (lo, hi words), counter
// (i / 4) as (lo, hi, 0, 0), output word i % 4 -- the exact stream of Triton's
// tl.randint4x, so the CPU and Triton backends draw identical noise for one
// seed.  Word r -> u = (r >> 9) * 2^-23 + 2^-24, in [2^-24, 1 - 2^-24]: never 0
// or 1, so t = log(u / (1 - u)) is finite (|t| < 16.7).
//
// The work is tiled (256 elements = 64 Philox counters) and the tile bodies are
// branch-free float loops with polynomial log/exp, so the compiler vectorises
// them; on x86-64 they are built for AVX-512, AVX2 and baseline, picked at load time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

#include "common/cpu_clones.h"

// The selects below only vectorise when FP ops may be assumed not to trap
// (GCC's default -ftrapping-math blocks if-conversion); results are unchanged.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

namespace {

constexpr int64_t kTile = 256;         // elements per tile
constexpr int64_t kCtr = kTile / 4;    // Philox counters per tile, 4 words each
constexpr int64_t kGrainTiles = 16;    // 4K elements: measured faster on 2 threads from 8K up

FM_INLINE float bits_to_float(int32_t b) { float f; std::memcpy(&f, &b, 4); return f; }
FM_INLINE int32_t float_to_bits(float f) { int32_t b; std::memcpy(&b, &f, 4); return b; }

// Cephes logf for positive normal x (about 1 ulp); branch-free so it vectorises.
FM_INLINE float fast_log(float x) {
  int32_t b = float_to_bits(x);
  int32_t e = ((b >> 23) & 0xff) - 126;
  float m = bits_to_float((b & 0x007fffff) | 0x3f000000);  // [0.5, 1)
  bool small = m < 0.707106781186547524f;
  e -= small ? 1 : 0;
  float r = small ? m + m - 1.0f : m - 1.0f;
  float z = r * r;
  float y = 7.0376836292E-2f;
  y = y * r - 1.1514610310E-1f;
  y = y * r + 1.1676998740E-1f;
  y = y * r - 1.2420140846E-1f;
  y = y * r + 1.4249322787E-1f;
  y = y * r - 1.6668057665E-1f;
  y = y * r + 2.0000714765E-1f;
  y = y * r - 2.4999993993E-1f;
  y = y * r + 3.3333331174E-1f;
  y = y * r * z;
  float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return r + y + 0.693359375f * fe;
}

// Cephes expf for a <= 0 (about 1 ulp); exactly 0 below -87 (and for -inf).
FM_INLINE float fast_exp_nonpos(float a) {
  float x = a < -87.0f ? -87.0f : a;
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (floorf would not vectorise on SSE2).
  float fl = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  x = x - fl * 0.693359375f + fl * 2.12194440e-4f;
  float z = x * x;
  float y = 1.9875691500E-4f;
  y = y * x + 1.3981999507E-3f;
  y = y * x + 8.3334519073E-3f;
  y = y * x + 4.1665795894E-2f;
  y = y * x + 1.6666665459E-1f;
  y = y * x + 5.0000001201E-1f;
  y = y * z + x + 1.0f;
  y *= bits_to_float((static_cast<int32_t>(fl) + 127) << 23);
  return a < -87.0f ? 0.0f : y;
}

// Uniforms of elements [4 * ctr0, 4 * ctr0 + 256) into u.  ctr0 is a multiple
// of kCtr, so the low counter word cannot wrap inside a tile.
FM_CLONES void noise_tile(uint64_t seed, uint64_t ctr0, float* __restrict u) {
  alignas(64) uint32_t r[4][kCtr];
  const uint32_t k0_init = static_cast<uint32_t>(seed), k1_init = static_cast<uint32_t>(seed >> 32);
  const uint32_t lo0 = static_cast<uint32_t>(ctr0), hi = static_cast<uint32_t>(ctr0 >> 32);
  for (uint32_t j = 0; j < static_cast<uint32_t>(kCtr); ++j) {
    // 32-bit words kept in 64-bit lanes: each multiply is then one vpmuludq giving
    // both mulhi and mullo (measured 1.6x faster than uint32 lanes, same stream).
    uint64_t c0 = lo0 + j, c1 = hi, c2 = 0, c3 = 0;
    uint64_t k0 = k0_init, k1 = k1_init;
    for (int round = 0; round < 10; ++round) {
      const uint64_t pa = 0xCD9E8D57ull * c2;
      const uint64_t pb = 0xD2511F53ull * c0;
      c0 = (pa >> 32) ^ c1 ^ k0;
      c2 = (pb >> 32) ^ c3 ^ k1;
      c1 = pa & 0xffffffffull;
      c3 = pb & 0xffffffffull;
      k0 = (k0 + 0x9E3779B9u) & 0xffffffffull;
      k1 = (k1 + 0xBB67AE85u) & 0xffffffffull;
    }
    r[0][j] = static_cast<uint32_t>(c0); r[1][j] = static_cast<uint32_t>(c1);
    r[2][j] = static_cast<uint32_t>(c2); r[3][j] = static_cast<uint32_t>(c3);
  }
  for (int64_t j = 0; j < kCtr; ++j)
    for (int k = 0; k < 4; ++k)
      u[4 * j + k] = static_cast<float>(r[k][j] >> 9) * 0x1p-23f + 0x1p-24f;
}

FM_INLINE float logistic(float u) { return fast_log(u / (1.0f - u)); }
// -|w| without std::fabs (which is not inlined under the pragma above).
FM_INLINE float neg_abs(float w) { return w < 0.0f ? w : -w; }

FM_INLINE float sigmoid_of(float w) {
  float e = fast_exp_nonpos(neg_abs(w));
  float d = 1.0f / (1.0f + e);
  return w >= 0.0f ? d : e * d;
}

// soft != nullptr (hard training forward): also write B~ = sigmoid(z / tau), the
// one value the straight-through backward needs.
template <bool kHard, bool kStochastic, bool kSoft>
FM_INLINE void fwd_body(const float* __restrict x, const float* __restrict u, float* __restrict out,
                        float* __restrict soft, int64_t n, float inv_tau) {
  for (int64_t i = 0; i < n; ++i) {
    float z = x[i];
    if (kStochastic) z += logistic(u[i]);
    if (kHard) {
      out[i] = z > 0.0f ? 1.0f : 0.0f;  // == sigmoid(z / tau) > 0.5, without rounding at 0.5
      if (kSoft) soft[i] = sigmoid_of(z * inv_tau);
    } else {
      out[i] = sigmoid_of(z * inv_tau);
    }
  }
}

FM_CLONES void fwd_tile(const float* x, const float* u, float* out, float* soft, int64_t n, float inv_tau,
                        bool hard) {
  if (!hard) {
    u ? fwd_body<false, true, false>(x, u, out, soft, n, inv_tau)
      : fwd_body<false, false, false>(x, u, out, soft, n, inv_tau);
  } else if (soft) {
    u ? fwd_body<true, true, true>(x, u, out, soft, n, inv_tau) : fwd_body<true, false, true>(x, u, out, soft, n, inv_tau);
  } else {
    u ? fwd_body<true, true, false>(x, u, out, soft, n, inv_tau)
      : fwd_body<true, false, false>(x, u, out, soft, n, inv_tau);
  }
}

// grad * s(1 - s) / tau with s(1 - s) = e / (1 + e)^2, e = exp(-|w|): no cancellation, 0 at |w| = inf.
template <bool kStochastic>
FM_INLINE void bwd_body(const float* __restrict g, const float* __restrict x, const float* __restrict u,
                        float* __restrict gin, int64_t n, float inv_tau) {
  for (int64_t i = 0; i < n; ++i) {
    float z = x[i];
    if (kStochastic) z += logistic(u[i]);
    float e = fast_exp_nonpos(neg_abs(z * inv_tau));
    float d = 1.0f / (1.0f + e);
    gin[i] = g[i] * (e * d * d * inv_tau);
  }
}

FM_CLONES void bwd_tile(const float* g, const float* x, const float* u, float* gin, int64_t n, float inv_tau) {
  u ? bwd_body<true>(g, x, u, gin, n, inv_tau) : bwd_body<false>(g, x, u, gin, n, inv_tau);
}

// grad * s(1 - s) / tau from the saved s = B~ (what autograd through sigmoid computes).
FM_CLONES void bwd_soft_tile(const float* __restrict g, const float* __restrict soft, float* __restrict gin,
                             int64_t n, float inv_tau) {
  for (int64_t i = 0; i < n; ++i) gin[i] = g[i] * (soft[i] * (1.0f - soft[i]) * inv_tau);
}

// float64: the same noise, exact libm math (used by gradcheck).
FM_INLINE double ref_z(double x, const float* u, int64_t i) {
  return u ? x + std::log(static_cast<double>(u[i]) / (1.0 - static_cast<double>(u[i]))) : x;
}

// Tile views in float: float data is used in place, other dtypes go through a buffer.
template <typename T>
FM_INLINE const float* load_tile(const T* src, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
    return buf;
  }
}
template <typename T>
FM_INLINE float* out_tile(T* dst, float* buf) {
  if constexpr (std::is_same_v<T, float>) return dst; else return buf;
}
template <typename T>
FM_INLINE void store_tile(T* dst, const float* buf, int64_t n) {
  if constexpr (!std::is_same_v<T, float>)
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(buf[i]);
}

uint64_t read_seed(const c10::optional<at::Tensor>& seed, bool* stochastic) {
  *stochastic = seed.has_value() && seed->defined();
  if (!*stochastic) return 0;
  TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1,
              "gumbel_sigmoid_gate: seed must be an int64 tensor of one element, got ",
              seed->scalar_type(), " of shape ", seed->sizes());
  TORCH_CHECK(seed->device().is_cpu(), "gumbel_sigmoid_gate: seed must be on the CPU, got ", seed->device());
  // The seed is on the CPU: read it directly (item() is a dispatcher call per gate).
  return static_cast<uint64_t>(*seed->const_data_ptr<int64_t>());
}

at::ScalarType soft_dtype(at::ScalarType logits) {
  return logits == at::kDouble ? at::kDouble : at::kFloat;
}

void check_common(const at::Tensor& logits, double tau) {
  TORCH_CHECK(logits.device().is_cpu(), "gumbel_sigmoid_gate: logits must be a CPU tensor");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "gumbel_sigmoid_gate: logits must be floating, got ",
              logits.scalar_type());
  TORCH_CHECK(tau > 0 && std::isfinite(tau), "gumbel_sigmoid_gate: tau must be positive and finite, got ", tau);
}

template <typename F>
void for_tiles(int64_t n, const F& f) {
  at::parallel_for(0, (n + kTile - 1) / kTile, kGrainTiles, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) f(t * kTile, std::min(kTile, n - t * kTile));
  });
}

// The forward; with `soft` (hard gates only) it also fills B~, float32 (float64
// for float64 logits), for the backward of a training step.
at::Tensor gate_impl(const at::Tensor& logits, const c10::optional<at::Tensor>& seed, double tau, bool hard,
                     at::Tensor* soft) {
  check_common(logits, tau);
  bool stochastic;
  const uint64_t s = read_seed(seed, &stochastic);
  const at::Tensor x = logits.contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (soft) *soft = at::empty(x.sizes(), x.options().dtype(soft_dtype(x.scalar_type())));
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gumbel_sigmoid_gate_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    // B~ is float64 for float64 logits, float32 otherwise (the lambda is no template,
    // so both branches below must compile for every scalar_t).
    double* spd = soft && soft->scalar_type() == at::kDouble ? soft->data_ptr<double>() : nullptr;
    float* spf = soft && soft->scalar_type() == at::kFloat ? soft->data_ptr<float>() : nullptr;
    for_tiles(n, [&](int64_t e0, int64_t m) {
      alignas(64) float ub[kTile], xb[kTile], ob[kTile];
      if (stochastic) noise_tile(s, static_cast<uint64_t>(e0 / 4), ub);
      const float* u = stochastic ? ub : nullptr;
      if constexpr (std::is_same_v<scalar_t, double>) {
        for (int64_t i = 0; i < m; ++i) {
          double z = ref_z(xp[e0 + i], u, i);
          if (hard) {
            op[e0 + i] = z > 0 ? 1.0 : 0.0;
            if (spd) spd[e0 + i] = 1.0 / (1.0 + std::exp(-z / tau));
          } else {
            op[e0 + i] = 1.0 / (1.0 + std::exp(-z / tau));
          }
        }
      } else {
        float* o = out_tile(op + e0, ob);
        fwd_tile(load_tile(xp + e0, m, xb), u, o, spf ? spf + e0 : nullptr, m, static_cast<float>(1.0 / tau), hard);
        store_tile(op + e0, ob, m);
      }
    });
  });
  return out;
}

at::Tensor gate_cpu(const at::Tensor& logits, const c10::optional<at::Tensor>& seed, double tau, bool hard) {
  return gate_impl(logits, seed, tau, hard, nullptr);
}

std::tuple<at::Tensor, at::Tensor> gate_hard_train_cpu(const at::Tensor& logits, const c10::optional<at::Tensor>& seed,
                                                       double tau) {
  at::Tensor soft;
  at::Tensor out = gate_impl(logits, seed, tau, /*hard=*/true, &soft);
  return {out, soft};
}

at::Tensor gate_backward_soft_cpu(const at::Tensor& grad, const at::Tensor& soft, double tau) {
  TORCH_CHECK(tau > 0 && std::isfinite(tau), "gumbel_sigmoid_gate: tau must be positive and finite, got ", tau);
  TORCH_CHECK(grad.device().is_cpu() && soft.device().is_cpu() && grad.sizes() == soft.sizes() &&
                  at::isFloatingType(grad.scalar_type()) && soft.scalar_type() == soft_dtype(grad.scalar_type()),
              "gumbel_sigmoid_gate_backward_soft: grad and soft must be CPU tensors of one shape, soft float32 "
              "(float64 for float64 grad)");
  const at::Tensor g = grad.contiguous(), b = soft.contiguous();
  at::Tensor gin = at::empty_like(g, at::MemoryFormat::Contiguous);
  const int64_t n = g.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "gumbel_sigmoid_gate_backward_soft", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* op = gin.data_ptr<scalar_t>();
    if constexpr (std::is_same_v<scalar_t, double>) {
      const double* bp = b.const_data_ptr<double>();
      at::parallel_for(0, n, kGrainTiles * kTile, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) op[i] = gp[i] * bp[i] * (1.0 - bp[i]) / tau;
      });
    } else {
      const float* bp = b.const_data_ptr<float>();
      for_tiles(n, [&](int64_t e0, int64_t m) {
        alignas(64) float gb[kTile], ob[kTile];
        float* o = out_tile(op + e0, ob);
        bwd_soft_tile(load_tile(gp + e0, m, gb), bp + e0, o, m, static_cast<float>(1.0 / tau));
        store_tile(op + e0, ob, m);
      });
    }
  });
  return gin;
}

at::Tensor gate_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, const c10::optional<at::Tensor>& seed,
                             double tau) {
  check_common(logits, tau);
  TORCH_CHECK(grad.sizes() == logits.sizes() && grad.scalar_type() == logits.scalar_type() && grad.device().is_cpu(),
              "gumbel_sigmoid_gate_backward: grad must match logits in shape, dtype and device");
  bool stochastic;
  const uint64_t s = read_seed(seed, &stochastic);
  const at::Tensor x = logits.contiguous(), g = grad.contiguous();
  at::Tensor gin = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gumbel_sigmoid_gate_backward_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* op = gin.data_ptr<scalar_t>();
    for_tiles(n, [&](int64_t e0, int64_t m) {
      alignas(64) float ub[kTile], xb[kTile], gb[kTile], ob[kTile];
      if (stochastic) noise_tile(s, static_cast<uint64_t>(e0 / 4), ub);
      const float* u = stochastic ? ub : nullptr;
      if constexpr (std::is_same_v<scalar_t, double>) {
        for (int64_t i = 0; i < m; ++i) {
          double sg = 1.0 / (1.0 + std::exp(-std::fabs(ref_z(xp[e0 + i], u, i) / tau)));
          op[e0 + i] = gp[e0 + i] * sg * (1.0 - sg) / tau;
        }
      } else {
        float* o = out_tile(op + e0, ob);
        bwd_tile(load_tile(gp + e0, m, gb), load_tile(xp + e0, m, xb), u, o, m, static_cast<float>(1.0 / tau));
        store_tile(op + e0, ob, m);
      }
    });
  });
  return gin;
}

at::Tensor noise_cpu(const at::Tensor& logits, const at::Tensor& seed) {
  bool stochastic;
  const uint64_t s = read_seed(seed, &stochastic);
  at::Tensor u = at::empty(logits.sizes(), logits.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous));
  float* up = u.data_ptr<float>();
  for_tiles(u.numel(), [&](int64_t e0, int64_t m) {
    alignas(64) float ub[kTile];
    noise_tile(s, static_cast<uint64_t>(e0 / 4), ub);
    std::memcpy(up + e0, ub, m * sizeof(float));
  });
  return u;
}

}  // namespace

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

TORCH_LIBRARY_IMPL(fastmod, CPU, m) {
  m.impl("gumbel_sigmoid_gate", &gate_cpu);
  m.impl("gumbel_sigmoid_gate_backward", &gate_backward_cpu);
  m.impl("gumbel_sigmoid_gate_hard_train", &gate_hard_train_cpu);
  m.impl("gumbel_sigmoid_gate_backward_soft", &gate_backward_soft_cpu);
  m.impl("gumbel_sigmoid_noise", &noise_cpu);
}
