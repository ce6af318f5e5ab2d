// CPU kernels of the fused normalisation epilogues of a routed block
// (Python side and semantics: fastmod/ops/fused_norm.py).
//
// routed_batch_norm_relu: out = mask * relu(BN(mask * x)), mask[n, c] = (gates[n, g(c)] != 0).
//   A block whose gate is 0 is never read: it adds zeros to the batch statistics,
//   which enter in closed form, and its output and input gradient are zeros
//   (memset).  So the passes over x shrink with the gate density.
// group_norm_add_relu: out = relu(GN(x) + residual).  Per (sample, group) block
//   one pass for the statistics and one for the output; the block (C/G x H x W
//   floats) stays in cache between them, so x, residual and out move once.
//
// float32 only (other dtypes take the PyTorch reference); inputs are made
// contiguous NCHW.  Statistics are accumulated in double across rows.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <tuple>

#include "common/cpu_clones.h"
#include "fused_norm/fused_norm_cpu.h"

// The selects below only vectorise when FP ops may be assumed not to trap
// (GCC's default -ftrapping-math blocks if-conversion); results are unchanged.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

namespace fastmod::fused_norm {
namespace {

using at::Tensor;

// ~16K floats per parallel chunk: below that the thread hand-off costs more.
constexpr int64_t kGrainElems = 1 << 14;

// ---- row kernels: one contiguous run of n floats --------------------------------

FM_CLONES float row_sum(const float* __restrict x, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i];
  return s;
}

FM_CLONES float row_sq_dev(const float* __restrict x, int64_t n, float mean) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    float d = x[i] - mean;
    s += d * d;
  }
  return s;
}

// y = relu(x * a + b [+ r]).  `v < 0 ? 0 : v` keeps NaN, as torch.relu does.
// y may be x (the in-place ops): no __restrict on them.
FM_CLONES void row_affine_relu(const float* x, const float* __restrict r, float* y,
                               int64_t n, float a, float b) {
  if (r) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      float v = x[i] * a + b + r[i];
      y[i] = v < 0.0f ? 0.0f : v;
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      float v = x[i] * a + b;
      y[i] = v < 0.0f ? 0.0f : v;
    }
  }
}

// ReLU's backward where the ReLU input is recomputed as x * a + b (BN): dz = dy
// where it was > 0 (NaN passes, as in threshold_backward).  Returns the sums
// sum(dz) and sum(dz * (x - mean)).
FM_CLONES void row_bn_relu_dz(const float* __restrict x, const float* __restrict dy, float* __restrict dz,
                              int64_t n, float a, float b, float mean, float* sdz, float* sdzx) {
  float s0 = 0.0f, s1 = 0.0f;
#pragma omp simd reduction(+ : s0, s1)
  for (int64_t i = 0; i < n; ++i) {
    const float g = dy[i];  // loaded unconditionally: a conditional load would not vectorise
    const float d = (x[i] * a + b) <= 0.0f ? 0.0f : g;
    dz[i] = d;
    s0 += d;
    s1 += d * (x[i] - mean);
  }
  *sdz = s0;
  *sdzx = s1;
}

// The same with the ReLU's output at hand (group_norm_add_relu).
FM_CLONES void row_relu_dz(const float* __restrict out, const float* __restrict x, const float* __restrict dy,
                           float* __restrict dz, int64_t n, float mean, float* sdz, float* sdzx) {
  float s0 = 0.0f, s1 = 0.0f;
#pragma omp simd reduction(+ : s0, s1)
  for (int64_t i = 0; i < n; ++i) {
    const float g = dy[i];
    const float d = out[i] <= 0.0f ? 0.0f : g;
    dz[i] = d;
    s0 += d;
    s1 += d * (x[i] - mean);
  }
  *sdz = s0;
  *sdzx = s1;
}

// Normalisation backward, both norms: dx = k1 * dz + k2 + k3 * (x - mean).
// dz may alias dx (no __restrict on them).
FM_CLONES void row_norm_grad(const float* dz, const float* __restrict x, float* dx, int64_t n, float k1,
                             float k2, float k3, float mean) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dx[i] = k1 * dz[i] + k2 + k3 * (x[i] - mean);
}

void zero_row(float* y, int64_t n) { std::memset(y, 0, sizeof(float) * n); }

int64_t grain(int64_t elems_per_item) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, elems_per_item));
}

// ---- checks (the Python wrappers raise friendlier errors first) -----------------

void check_float4d(const Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 4, name, " must be a 4-D float32 tensor");
}

void check_vec(const Tensor& t, int64_t c, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == c, name,
              " must be a float32 tensor of shape [", c, "]");
}

// Per-channel affine of the BN in the form y = x * a + b; the forward and the
// backward use this one function so the recomputed ReLU mask matches exactly.
struct BnAffine {
  float a, b;
  double invstd;
};

BnAffine bn_affine(float weight, float bias, double mean, double var, double eps) {
  double invstd = 1.0 / std::sqrt(var + eps);
  double a = weight * invstd;
  return {static_cast<float>(a), static_cast<float>(bias - mean * a), invstd};
}

// ---- routed_batch_norm_relu ------------------------------------------------------

struct RoutedLayout {
  int64_t N, C, HW, G, Cb;
  Tensor mask;  // uint8 [N, G]: gate != 0
  const uint8_t* on(int64_t n) const { return mask.data_ptr<uint8_t>() + n * G; }
};

RoutedLayout routed_layout(const Tensor& x, const Tensor& gates) {
  check_float4d(x, "x");
  TORCH_CHECK(gates.dim() == 2 && gates.size(0) == x.size(0) && gates.size(1) >= 1 &&
                  x.size(1) % gates.size(1) == 0,
              "gates must be [N, G] with G dividing the channels of x");
  RoutedLayout l{x.size(0), x.size(1), x.size(2) * x.size(3), gates.size(1), x.size(1) / gates.size(1),
                 gates.ne(0).to(at::kByte).contiguous()};
  return l;
}

// Writes `out` (contiguous, x's shape; may be x itself: each channel's statistics are
// taken before its rows are written); returns (mean, var).
std::tuple<Tensor, Tensor> routed_bn_relu_into(const Tensor& x, const Tensor& gates, const Tensor& weight,
                                               const Tensor& bias, const std::optional<Tensor>& running_mean,
                                               const std::optional<Tensor>& running_var, bool training,
                                               double eps, Tensor& out) {
  const RoutedLayout l = routed_layout(x, gates);
  check_vec(weight, l.C, "weight");
  check_vec(bias, l.C, "bias");
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && out.sizes() == x.sizes(), "x and out must be contiguous");
  Tensor mean = at::empty({l.C}, x.options().dtype(at::kFloat));
  Tensor var = at::empty({l.C}, x.options().dtype(at::kFloat));
  const double count = static_cast<double>(l.N) * l.HW;
  if (training) {
    TORCH_CHECK(count > 1, "routed_batch_norm_relu: need more than one value per channel in training");
  } else {
    TORCH_CHECK(running_mean && running_var, "routed_batch_norm_relu: running statistics are needed "
                "when training=False");
    mean.copy_(*running_mean);
    var.copy_(*running_var);
  }
  if (x.numel() == 0) return {mean, var};
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* mp = mean.data_ptr<float>();
  float* vp = var.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  at::parallel_for(0, l.C, grain(l.N * l.HW), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t g = c / l.Cb;
      if (training) {
        double s = 0.0;
        int64_t n_on = 0;
        for (int64_t n = 0; n < l.N; ++n) {
          if (!l.on(n)[g]) continue;
          s += row_sum(xp + (n * l.C + c) * l.HW, l.HW);
          ++n_on;
        }
        const double m = s / count;
        // Off rows are zeros: each adds HW * m^2 to the centred sum of squares.
        double q = static_cast<double>(l.N - n_on) * l.HW * m * m;
        for (int64_t n = 0; n < l.N; ++n) {
          if (l.on(n)[g]) q += row_sq_dev(xp + (n * l.C + c) * l.HW, l.HW, static_cast<float>(m));
        }
        mp[c] = static_cast<float>(m);
        vp[c] = static_cast<float>(q / count);
      }
      const BnAffine aff = bn_affine(wp[c], bp[c], mp[c], vp[c], eps);
      for (int64_t n = 0; n < l.N; ++n) {
        float* y = op + (n * l.C + c) * l.HW;
        if (l.on(n)[g]) {
          row_affine_relu(xp + (n * l.C + c) * l.HW, nullptr, y, l.HW, aff.a, aff.b);
        } else {
          zero_row(y, l.HW);
        }
      }
    }
  });
  return {mean, var};
}

std::tuple<Tensor, Tensor, Tensor> routed_bn_relu_forward(const Tensor& x_, const Tensor& gates,
                                                          const Tensor& weight, const Tensor& bias,
                                                          const std::optional<Tensor>& running_mean,
                                                          const std::optional<Tensor>& running_var,
                                                          bool training, double eps) {
  const Tensor x = x_.contiguous();
  Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto [mean, var] = routed_bn_relu_into(x, gates, weight, bias, running_mean, running_var, training, eps, out);
  return {out, mean, var};
}

// In place (inference: no allocation, no first-touch page faults for the output).
std::tuple<Tensor, Tensor> routed_bn_relu_inplace(Tensor& x, const Tensor& gates, const Tensor& weight,
                                                  const Tensor& bias, const std::optional<Tensor>& running_mean,
                                                  const std::optional<Tensor>& running_var, bool training,
                                                  double eps) {
  return routed_bn_relu_into(x, gates, weight, bias, running_mean, running_var, training, eps, x);
}

std::tuple<Tensor, Tensor, Tensor> routed_bn_relu_backward(const Tensor& grad_out, const Tensor& x_,
                                                           const Tensor& gates, const Tensor& weight,
                                                           const Tensor& bias, const Tensor& mean,
                                                           const Tensor& var, bool training, double eps) {
  const RoutedLayout l = routed_layout(x_, gates);
  check_vec(weight, l.C, "weight");
  check_vec(bias, l.C, "bias");
  check_vec(mean, l.C, "mean");
  check_vec(var, l.C, "var");
  TORCH_CHECK(grad_out.sizes() == x_.sizes(), "grad_out must have x's shape");
  const Tensor x = x_.contiguous();
  const Tensor dy = grad_out.to(at::kFloat).contiguous();
  Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  Tensor dw = at::zeros({l.C}, x.options());
  Tensor db = at::zeros({l.C}, x.options());
  if (x.numel() == 0) return {dx, dw, db};
  const double count = static_cast<double>(l.N) * l.HW;
  const float* xp = x.data_ptr<float>();
  const float* dyp = dy.data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  const float* mp = mean.data_ptr<float>();
  const float* vp = var.data_ptr<float>();
  float* dwp = dw.data_ptr<float>();
  float* dbp = db.data_ptr<float>();
  at::parallel_for(0, l.C, grain(l.N * l.HW), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t g = c / l.Cb;
      const BnAffine aff = bn_affine(wp[c], bp[c], mp[c], vp[c], eps);
      const float m = mp[c];
      double sdz = 0.0, sdzx = 0.0;  // sum(dz), sum(dz * (x - mean)) over active rows
      for (int64_t n = 0; n < l.N; ++n) {
        if (!l.on(n)[g]) continue;
        const int64_t off = (n * l.C + c) * l.HW;
        float s0, s1;
        row_bn_relu_dz(xp + off, dyp + off, dxp + off, l.HW, aff.a, aff.b, m, &s0, &s1);
        sdz += s0;
        sdzx += s1;
      }
      dbp[c] = static_cast<float>(sdz);
      dwp[c] = static_cast<float>(sdzx * aff.invstd);
      // dx = w * invstd * (dz - mean(dz) - xhat * mean(dz * xhat)); the batch
      // terms only exist when the statistics came from the batch.
      const double k1 = wp[c] * aff.invstd;
      const double k2 = training ? -k1 * sdz / count : 0.0;
      const double k3 = training ? -k1 * aff.invstd * aff.invstd * sdzx / count : 0.0;
      for (int64_t n = 0; n < l.N; ++n) {
        float* d = dxp + (n * l.C + c) * l.HW;
        if (l.on(n)[g]) {
          row_norm_grad(d, xp + (n * l.C + c) * l.HW, d, l.HW, static_cast<float>(k1),
                        static_cast<float>(k2), static_cast<float>(k3), m);
        } else {
          zero_row(d, l.HW);
        }
      }
    }
  });
  return {dx, dw, db};
}

}  // namespace

// Declared in fused_norm_cpu.h (the routed conv's fused inference epilogue uses it).
GnStats gn_add_relu_block(const float* x, const float* r, float* out, int64_t cg, int64_t hw,
                          const float* w, const float* b, double eps) {
  const double M = static_cast<double>(cg) * hw;
  double s = 0.0;
  for (int64_t c = 0; c < cg; ++c) s += row_sum(x + c * hw, hw);
  const double m = s / M;
  double q = 0.0;
  for (int64_t c = 0; c < cg; ++c) q += row_sq_dev(x + c * hw, hw, static_cast<float>(m));
  const double rs = 1.0 / std::sqrt(q / M + eps);
  for (int64_t c = 0; c < cg; ++c) {
    const double a = w[c] * rs;
    row_affine_relu(x + c * hw, r + c * hw, out + c * hw, hw, static_cast<float>(a),
                    static_cast<float>(b[c] - m * a));
  }
  return {static_cast<float>(m), static_cast<float>(rs)};
}

namespace {

// ---- group_norm_add_relu -----------------------------------------------------------

struct GroupLayout {
  int64_t N, C, HW, G, Cg;
};

GroupLayout group_layout(const Tensor& x, int64_t num_groups) {
  check_float4d(x, "x");
  TORCH_CHECK(num_groups >= 1 && x.size(1) % num_groups == 0, "num_groups must divide the channels of x");
  return {x.size(0), x.size(1), x.size(2) * x.size(3), num_groups, x.size(1) / num_groups};
}

// Writes `out` (contiguous, x's shape; may be x itself: a block's statistics are taken
// before it is written); returns (mean, rstd).
std::tuple<Tensor, Tensor> gn_add_relu_into(const Tensor& x, const Tensor& residual_, const Tensor& weight,
                                            const Tensor& bias, int64_t num_groups, double eps, Tensor& out) {
  const GroupLayout l = group_layout(x, num_groups);
  check_float4d(residual_, "residual");
  TORCH_CHECK(residual_.sizes() == x.sizes(), "residual must have x's shape");
  check_vec(weight, l.C, "weight");
  check_vec(bias, l.C, "bias");
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && out.sizes() == x.sizes(), "x and out must be contiguous");
  const Tensor r = residual_.contiguous();
  Tensor mean = at::empty({l.N, l.G}, x.options());
  Tensor rstd = at::empty({l.N, l.G}, x.options());
  if (x.numel() == 0) return {mean, rstd};
  const float* xp = x.data_ptr<float>();
  const float* rp = r.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* mp = mean.data_ptr<float>();
  float* sp = rstd.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  at::parallel_for(0, l.N * l.G, grain(l.Cg * l.HW), [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t c_first = (blk % l.G) * l.Cg, off = (blk / l.G) * l.C * l.HW + c_first * l.HW;
      const GnStats st = gn_add_relu_block(xp + off, rp + off, op + off, l.Cg, l.HW, wp + c_first,
                                           bp + c_first, eps);
      mp[blk] = st.mean;
      sp[blk] = st.rstd;
    }
  });
  return {mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> gn_add_relu_forward(const Tensor& x_, const Tensor& residual,
                                                       const Tensor& weight, const Tensor& bias,
                                                       int64_t num_groups, double eps) {
  const Tensor x = x_.contiguous();
  Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto [mean, rstd] = gn_add_relu_into(x, residual, weight, bias, num_groups, eps, out);
  return {out, mean, rstd};
}

std::tuple<Tensor, Tensor> gn_add_relu_inplace(Tensor& x, const Tensor& residual, const Tensor& weight,
                                               const Tensor& bias, int64_t num_groups, double eps) {
  at::assert_no_overlap(x, residual);  // residual is read after x's blocks are written
  return gn_add_relu_into(x, residual, weight, bias, num_groups, eps, x);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gn_add_relu_backward(const Tensor& grad_out, const Tensor& out_,
                                                                const Tensor& x_, const Tensor& weight,
                                                                const Tensor& mean, const Tensor& rstd,
                                                                int64_t num_groups) {
  const GroupLayout l = group_layout(x_, num_groups);
  check_vec(weight, l.C, "weight");
  TORCH_CHECK(out_.sizes() == x_.sizes() && grad_out.sizes() == x_.sizes(),
              "out and grad_out must have x's shape");
  TORCH_CHECK(mean.numel() == l.N * l.G && rstd.numel() == l.N * l.G, "mean and rstd must be [N, num_groups]");
  const Tensor x = x_.contiguous();
  const Tensor out = out_.contiguous();
  const Tensor dy = grad_out.to(at::kFloat).contiguous();
  const Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  Tensor dres = at::empty_like(x, at::MemoryFormat::Contiguous);  // the ReLU's input gradient
  // Per (sample, channel): sum(dz * (x - mean)) and sum(dz); reduced over samples below.
  Tensor part = at::empty({2, l.N, l.C}, x.options().dtype(at::kDouble));
  if (x.numel() == 0) return {dx, dres, at::zeros({l.C}, x.options()), at::zeros({l.C}, x.options())};
  const float* xp = x.data_ptr<float>();
  const float* op = out.data_ptr<float>();
  const float* dyp = dy.data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  float* dzp = dres.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* mp = mean_c.data_ptr<float>();
  const float* sp = rstd_c.data_ptr<float>();
  double* pdx = part.data_ptr<double>();
  double* pdz = pdx + l.N * l.C;
  const double M = static_cast<double>(l.Cg) * l.HW;
  at::parallel_for(0, l.N * l.G, grain(l.Cg * l.HW), [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n = blk / l.G, c_first = (blk % l.G) * l.Cg, base = n * l.C * l.HW;
      const float m = mp[blk];
      const double rs = sp[blk];
      double A = 0.0, B = 0.0;  // sum_c w_c * sum(dz * (x - mean)), sum_c w_c * sum(dz)
      for (int64_t c = c_first; c < c_first + l.Cg; ++c) {
        const int64_t off = base + c * l.HW;
        float s0, s1;
        row_relu_dz(op + off, xp + off, dyp + off, dzp + off, l.HW, m, &s0, &s1);
        pdz[n * l.C + c] = s0;
        pdx[n * l.C + c] = s1;
        A += wp[c] * static_cast<double>(s1);
        B += wp[c] * static_cast<double>(s0);
      }
      // dx = rstd * (w dz - mean_block(w dz) - xhat * mean_block(w dz xhat))
      const float k2 = static_cast<float>(-rs * B / M);
      const float k3 = static_cast<float>(-rs * rs * rs * A / M);
      for (int64_t c = c_first; c < c_first + l.Cg; ++c) {
        const int64_t off = base + c * l.HW;
        row_norm_grad(dzp + off, xp + off, dxp + off, l.HW, static_cast<float>(rs * wp[c]), k2, k3, m);
      }
    }
  });
  // grad_weight[c] = sum_n rstd[n, g(c)] * sum(dz * (x - mean)); grad_bias[c] = sum_n sum(dz).
  Tensor dw = at::empty({l.C}, x.options());
  Tensor db = at::empty({l.C}, x.options());
  float* dwp = dw.data_ptr<float>();
  float* dbp = db.data_ptr<float>();
  for (int64_t c = 0; c < l.C; ++c) {
    double sw = 0.0, sb = 0.0;
    for (int64_t n = 0; n < l.N; ++n) {
      sw += sp[n * l.G + c / l.Cg] * pdx[n * l.C + c];
      sb += pdz[n * l.C + c];
    }
    dwp[c] = static_cast<float>(sw);
    dbp[c] = static_cast<float>(sb);
  }
  return {dx, dres, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmod, CPU, m) {
  m.impl("routed_batch_norm_relu", &routed_bn_relu_forward);
  m.impl("routed_batch_norm_relu_backward", &routed_bn_relu_backward);
  m.impl("group_norm_add_relu", &gn_add_relu_forward);
  m.impl("group_norm_add_relu_backward", &gn_add_relu_backward);
  m.impl("routed_batch_norm_relu_", &routed_bn_relu_inplace);
  m.impl("group_norm_add_relu_", &gn_add_relu_inplace);
}

}  // namespace fastmod::fused_norm

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
