// The closing conv of a routed ResNeXt bottleneck and its epilogue in one pass, for
// inference on the CPU (float32):
//   out = relu(GroupNorm(routed_conv2d(x, w, gates, gate_on="in")) + residual).
// Why: at low gate density the conv reads few input channels but writes a full-size
// output, which GroupNorm then reads back; here each (sample, norm group) block of
// output rows is computed by the direct kernels into `out`, normalised, added and
// rectified while it is still in cache, so that tensor never goes to memory and back.
// Geometries or CPUs the direct kernels do not handle compute the conv first (same
// result, without the saving).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "fused_norm/fused_norm_cpu.h"
#include "routed_conv/routed_conv.h"
#include "routed_conv/routed_conv_cpu_direct.h"
#include "routed_conv_gn/routed_conv_gn_cpu.h"

namespace fastmod::routed_conv {
namespace {

void check(const at::Tensor& x, const at::Tensor& w, const at::Tensor& gates, const at::Tensor& residual,
           at::IntArrayRef padding, int64_t num_groups, const at::Tensor& gn_w, const at::Tensor& gn_b) {
  check_inputs(x, w, gates, c10::nullopt, 1, Mode::In);
  TORCH_CHECK(x.dim() == 4 && w.dim() == 4, "routed_conv2d_gn_add_relu: x and weight must be 4-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat && residual.scalar_type() == at::kFloat &&
                  gn_w.scalar_type() == at::kFloat && gn_b.scalar_type() == at::kFloat,
              "routed_conv2d_gn_add_relu: float32 only");
  TORCH_CHECK(padding.size() == 2 && w.size(2) == 2 * padding[0] + 1 && w.size(3) == 2 * padding[1] + 1,
              "routed_conv2d_gn_add_relu: odd kernel with 'same' padding only");
  const int64_t C = w.size(0);
  TORCH_CHECK(num_groups >= 1 && C % num_groups == 0, "routed_conv2d_gn_add_relu: num_groups must divide Cout");
  TORCH_CHECK(residual.dim() == 4 && residual.size(0) == x.size(0) && residual.size(1) == C &&
                  residual.size(2) == x.size(2) && residual.size(3) == x.size(3),
              "routed_conv2d_gn_add_relu: residual must have the output's shape");
  TORCH_CHECK(gn_w.dim() == 1 && gn_w.size(0) == C && gn_b.dim() == 1 && gn_b.size(0) == C,
              "routed_conv2d_gn_add_relu: gn_weight and gn_bias must be [Cout]");
}

at::Tensor conv_gn_add_relu(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& gates,
                            const at::Tensor& residual_, at::IntArrayRef padding, int64_t num_groups,
                            const at::Tensor& gn_w_, const at::Tensor& gn_b_, double eps) {
  check(x_, w_, gates, residual_, padding, num_groups, gn_w_, gn_b_);
  const at::Tensor x = x_.detach().contiguous(), w = w_.detach().contiguous();
  const at::Tensor r = residual_.detach().contiguous();
  const at::Tensor gn_w = gn_w_.detach().contiguous(), gn_b = gn_b_.detach().contiguous();
  const int64_t N = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3), C = w.size(0);
  const int64_t L = H * W, Cg = C / num_groups;
  const float* rp = r.data_ptr<float>();
  const float* gwp = gn_w.data_ptr<float>();
  const float* gbp = gn_b.data_ptr<float>();
  if (!(direct::available() && L > 0)) {
    // The conv on its ATen path, then the epilogue in place, block by block.
    at::Tensor out = forward(x, w, gates, c10::nullopt, {1, 1}, padding, {1, 1}, 1, "in", false).contiguous();
    if (out.numel() == 0) return out;
    float* op = out.data_ptr<float>();
    at::parallel_for(0, N * num_groups, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t q = b % num_groups, off = b * Cg * L;
        fused_norm::gn_add_relu_block(op + off, rp + off, op + off, Cg, L, gwp + q * Cg, gbp + q * Cg, eps);
      }
    });
    return out;
  }
  at::Tensor out = at::empty({N, C, H, W}, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor gf = gates.detach().to(at::kCPU, at::kFloat).contiguous();
  const direct::PixelPlan plan = direct::make_plan(H, W, w.size(2), w.size(3), padding[0], padding[1], 1, 1);
  conv_gn_direct({x.data_ptr<float>(), Cin, w.data_ptr<float>(), gf.data_ptr<float>(),
                  gates.size(1), rp, out.data_ptr<float>(), N, C, num_groups, gwp, gbp, eps},
                 plan);
  return out;
}

}  // namespace

void conv_gn_direct(const ConvGnArgs& a, const direct::PixelPlan& plan) {
  const int64_t L = plan.L, KK = plan.KK, Cb = a.Cin / a.G, Cg = a.C / a.num_groups;
  // Per sample: its active input blocks as reduction segments scaled by their gates.
  std::vector<std::vector<direct::Segment>> segs(a.N);
  for (int64_t n = 0; n < a.N; ++n)
    for (int64_t b = 0; b < a.G; ++b) {
      const float g = a.gates[n * a.G + b];
      if (g != 0.0f) direct::add_segment(segs[n], 0, b * Cb, (b + 1) * Cb, g);
    }
  // One task per sample and run of `per` norm groups: its output rows by the direct
  // kernels (a multiple of their 12-row register tile where the group size allows:
  // 8-row groups alone measured 1.05x the unfused time at rho = 0.3), then each
  // group's epilogue while the rows are in cache.
  const int64_t tile = direct::kRows, lcm = Cg / std::gcd(Cg, tile) * tile;
  const int64_t per = lcm <= 4 * tile ? lcm / Cg : std::max<int64_t>(1, 4 * tile / Cg);
  const int64_t runs = (a.num_groups + per - 1) / per;
  at::parallel_for(0, a.N * runs, 1, [&](int64_t t0, int64_t t1) {
    std::vector<const float*> w_row(per * Cg);
    std::vector<float*> out_row(per * Cg);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / runs, q0 = (t % runs) * per, q1 = std::min(a.num_groups, q0 + per);
      const int64_t c0 = q0 * Cg, rows = (q1 - q0) * Cg;
      float* o = a.out + (n * a.C + c0) * L;
      const auto& s = segs[n];
      if (s.empty()) {
        std::fill(o, o + rows * L, 0.0f);  // no active block: the conv output is zero
      } else {
        for (int64_t i = 0; i < rows; ++i) {
          w_row[i] = a.w + (c0 + i) * a.Cin * KK;
          out_row[i] = o + i * L;
        }
        const direct::RowJob job{a.x + n * a.Cin * L, w_row.data(), KK, false, out_row.data(), nullptr,
                                 nullptr, (int)rows, s.data(), (int)s.size()};
        direct::run_rows(job, plan);
      }
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t off = (n * a.C + q * Cg) * L;
        fused_norm::gn_add_relu_block(a.out + off, a.residual + off, a.out + off, Cg, L, a.gn_w + q * Cg,
                                      a.gn_b + q * Cg, a.eps);
      }
    }
  });
}

}  // namespace fastmod::routed_conv

TORCH_LIBRARY_IMPL(fastmod, CPU, m) {
  m.impl("routed_conv2d_gn_add_relu", &fastmod::routed_conv::conv_gn_add_relu);
}
