// A whole routed ResNeXt bottleneck (stride 1, GroupNorm closing it) in one op, for
// inference on the CPU (float32); the eval-mode BatchNorms come folded into a
// per-channel scale and shift (schema: routed_bottleneck.cpp).
// Why: a gated-off block's rows of the two inner activations are never read (conv2's
// block g reads only conv1's block g and is itself off; conv3 skips off input
// blocks), so here they are neither computed nor written, not even as zeros, and
// each active block's BatchNorm + ReLU runs on its rows while they are in cache.
// The unfused ops must write both activations in full (they are ordinary tensors):
// at low density that writing, and the page faults of the fresh buffers, cost more
// than the convolutions.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "routed_conv/routed_conv.h"
#include "routed_conv/routed_conv_cpu_direct.h"
#include "routed_conv_gn/routed_conv_gn_cpu.h"

namespace fastmod::routed_conv {
namespace {

void check(const at::Tensor& x, const at::Tensor& gates, const at::Tensor& w1, const at::Tensor& s1,
           const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& s2, const at::Tensor& b2,
           const at::Tensor& w3, const at::Tensor& residual, int64_t num_groups, const at::Tensor& gn_w,
           const at::Tensor& gn_b) {
  for (const at::Tensor* t : {&x, &w1, &s1, &b1, &w2, &s2, &b2, &w3, &residual, &gn_w, &gn_b})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device() == x.device(),
                "routed_bottleneck_gn: float32 tensors on x's device only");
  TORCH_CHECK(x.dim() == 4 && w1.dim() == 4 && w2.dim() == 4 && w3.dim() == 4,
              "routed_bottleneck_gn: x and the conv weights must be 4-D");
  TORCH_CHECK(gates.dim() == 2, "routed_bottleneck_gn: gates must be [N, G]");
  const int64_t width = w1.size(0), G = gates.size(1), k = w2.size(2);
  check_inputs(x, w1, gates, c10::nullopt, 1, Mode::Out);
  TORCH_CHECK(w1.size(2) == 1 && w1.size(3) == 1 && w3.size(2) == 1 && w3.size(3) == 1,
              "routed_bottleneck_gn: conv1 and conv3 must be 1x1");
  TORCH_CHECK(G >= 1 && width % G == 0 && w2.size(0) == width && w2.size(1) == width / G && k % 2 == 1 &&
                  w2.size(3) == k,
              "routed_bottleneck_gn: conv2_weight must be [width, width / G, k, k] with k odd");
  TORCH_CHECK(w3.size(1) == width, "routed_bottleneck_gn: conv3_weight must be [Cout, width, 1, 1]");
  for (const at::Tensor* t : {&s1, &b1, &s2, &b2})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == width, "routed_bottleneck_gn: BN scales and shifts must be [width]");
  const int64_t C = w3.size(0);
  TORCH_CHECK(num_groups >= 1 && C % num_groups == 0, "routed_bottleneck_gn: num_groups must divide Cout");
  TORCH_CHECK(residual.dim() == 4 && residual.size(0) == x.size(0) && residual.size(1) == C &&
                  residual.size(2) == x.size(2) && residual.size(3) == x.size(3),
              "routed_bottleneck_gn: residual must have the output's shape");
  TORCH_CHECK(gn_w.dim() == 1 && gn_w.size(0) == C && gn_b.dim() == 1 && gn_b.size(0) == C,
              "routed_bottleneck_gn: gn_weight and gn_bias must be [Cout]");
}

// row = max(row * a + b, 0) over n floats (the folded BatchNorm and the ReLU).
inline void affine_relu(float* row, int64_t n, float a, float b) {
  for (int64_t p = 0; p < n; ++p) row[p] = std::max(row[p] * a + b, 0.0f);
}

// The same arithmetic through the unfused ops (CPUs or geometries the direct kernels
// do not handle).
at::Tensor unfused(const at::Tensor& x, const at::Tensor& gates, const at::Tensor& w1, const at::Tensor& s1,
                   const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& s2, const at::Tensor& b2,
                   const at::Tensor& w3, const at::Tensor& residual, int64_t num_groups,
                   const at::Tensor& gn_w, const at::Tensor& gn_b, double eps) {
  const int64_t pad = w2.size(2) / 2;
  auto bn_relu = [](const at::Tensor& y, const at::Tensor& s, const at::Tensor& b) {
    return (y * s.view({1, -1, 1, 1}) + b.view({1, -1, 1, 1})).relu_();
  };
  at::Tensor y = forward(x, w1, gates, c10::nullopt, {1, 1}, {0, 0}, {1, 1}, 1, "out", false);
  y = bn_relu(y, s1, b1);
  y = forward(y, w2, gates, c10::nullopt, {1, 1}, {pad, pad}, {1, 1}, gates.size(1), "group", false);
  y = bn_relu(y, s2, b2);
  static const auto conv_gn = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("fastmod::routed_conv2d_gn_add_relu", "")
                                  .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, at::IntArrayRef, int64_t,
                                                    const at::Tensor&, const at::Tensor&, double)>();
  return conv_gn.call(y, w3, gates, residual, {0, 0}, num_groups, gn_w, gn_b, eps);
}

at::Tensor bottleneck_gn(const at::Tensor& x_, const at::Tensor& gates, const at::Tensor& w1_,
                         const at::Tensor& s1_, const at::Tensor& b1_, const at::Tensor& w2_,
                         const at::Tensor& s2_, const at::Tensor& b2_, const at::Tensor& w3_,
                         const at::Tensor& residual_, int64_t num_groups, const at::Tensor& gn_w_,
                         const at::Tensor& gn_b_, double eps) {
  check(x_, gates, w1_, s1_, b1_, w2_, s2_, b2_, w3_, residual_, num_groups, gn_w_, gn_b_);
  auto in = [](const at::Tensor& t) { return t.detach().contiguous(); };
  const at::Tensor x = in(x_), w1 = in(w1_), s1 = in(s1_), b1 = in(b1_), w2 = in(w2_), s2 = in(s2_),
                   b2 = in(b2_), w3 = in(w3_), r = in(residual_), gn_w = in(gn_w_), gn_b = in(gn_b_);
  const int64_t N = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3), L = H * W;
  const int64_t width = w1.size(0), G = gates.size(1), Cb = width / G, C = w3.size(0);
  const int64_t k = w2.size(2), KK = k * k;
  if (!(direct::available() && L > 0))
    return unfused(x, gates, w1, s1, b1, w2, s2, b2, w3, r, num_groups, gn_w, gn_b, eps);
  at::Tensor out = at::empty({N, C, H, W}, x.options());
  if (out.numel() == 0) return out;
  // The inner activations: only the active blocks' rows are ever written or read,
  // so the buffers are never cleared (untouched pages are not even mapped in).
  at::Tensor y1 = at::empty({N, width, L}, x.options()), y2 = at::empty({N, width, L}, x.options());
  const at::Tensor gf = gates.detach().to(at::kCPU, at::kFloat).contiguous();
  const float* gp = gf.data_ptr<float>();
  const float *xp = x.data_ptr<float>(), *w1p = w1.data_ptr<float>(), *w2p = w2.data_ptr<float>();
  const float *s1p = s1.data_ptr<float>(), *b1p = b1.data_ptr<float>();
  const float *s2p = s2.data_ptr<float>(), *b2p = b2.data_ptr<float>();
  float *y1p = y1.data_ptr<float>(), *y2p = y2.data_ptr<float>();
  const direct::PixelPlan plan1 = direct::make_plan(H, W, 1, 1, 0, 0, 1, 1);
  const direct::PixelPlan plank = direct::make_plan(H, W, k, k, k / 2, k / 2, 1, 1);

  // The active (sample, block) pairs, sample by sample.
  struct Block {
    int64_t n, g;
    float gate;
  };
  std::vector<Block> blocks;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g)
      if (gp[n * G + g] != 0.0f) blocks.push_back({n, g, gp[n * G + g]});

  // conv1: tasks of up to two register tiles of one sample's active rows (every input
  // channel, scale 1), each followed by its BN1 + ReLU (gate folded into the scale).
  struct Rows {
    size_t b0, b1;  // blocks [b0, b1) of one sample
  };
  std::vector<Rows> tasks1;
  const size_t per_task = std::max<int64_t>(1, 2 * direct::kRows / Cb);
  for (size_t b = 0; b < blocks.size();) {
    size_t e = b + 1;
    while (e < blocks.size() && e - b < per_task && blocks[e].n == blocks[b].n) ++e;
    tasks1.push_back({b, e});
    b = e;
  }
  const direct::Segment all1{0, Cin, 1.0f};
  at::parallel_for(0, (int64_t)tasks1.size(), 1, [&](int64_t t0, int64_t t1) {
    std::vector<const float*> w_row;
    std::vector<float*> out_row;
    for (int64_t t = t0; t < t1; ++t) {
      w_row.clear();
      out_row.clear();
      const int64_t n = blocks[tasks1[t].b0].n;
      for (size_t b = tasks1[t].b0; b < tasks1[t].b1; ++b)
        for (int64_t c = blocks[b].g * Cb; c < (blocks[b].g + 1) * Cb; ++c) {
          w_row.push_back(w1p + c * Cin);
          out_row.push_back(y1p + (n * width + c) * L);
        }
      direct::run_rows({xp + n * Cin * L, w_row.data(), 1, false, out_row.data(), nullptr, nullptr,
                        (int)w_row.size(), &all1, 1},
                       plan1);
      size_t i = 0;
      for (size_t b = tasks1[t].b0; b < tasks1[t].b1; ++b)
        for (int64_t c = blocks[b].g * Cb; c < (blocks[b].g + 1) * Cb; ++c)
          affine_relu(out_row[i++], L, blocks[b].gate * s1p[c], b1p[c]);
    }
  });

  // conv2 (grouped): one task per active block over its own Cb input rows, then BN2 + ReLU.
  const direct::Segment all2{0, Cb, 1.0f};
  at::parallel_for(0, (int64_t)blocks.size(), 1, [&](int64_t t0, int64_t t1) {
    std::vector<const float*> w_row(Cb);
    std::vector<float*> out_row(Cb);
    for (int64_t t = t0; t < t1; ++t) {
      const Block& bk = blocks[t];
      const int64_t c0 = bk.g * Cb;
      for (int64_t i = 0; i < Cb; ++i) {
        w_row[i] = w2p + (c0 + i) * Cb * KK;
        out_row[i] = y2p + (bk.n * width + c0 + i) * L;
      }
      direct::run_rows({y1p + (bk.n * width + c0) * L, w_row.data(), KK, false, out_row.data(), nullptr,
                        nullptr, (int)Cb, &all2, 1},
                       plank);
      for (int64_t i = 0; i < Cb; ++i) affine_relu(out_row[i], L, bk.gate * s2p[c0 + i], b2p[c0 + i]);
    }
  });

  // conv3 + GroupNorm + residual + ReLU: reads the active blocks of y2 only.
  conv_gn_direct({y2p, width, w3.data_ptr<float>(), gp, G, r.data_ptr<float>(), out.data_ptr<float>(), N, C,
                  num_groups, gn_w.data_ptr<float>(), gn_b.data_ptr<float>(), eps},
                 plan1);
  return out;
}

}  // namespace
}  // namespace fastmod::routed_conv

TORCH_LIBRARY_IMPL(fastmod, CPU, m) {
  m.impl("routed_bottleneck_gn", &fastmod::routed_conv::bottleneck_gn);
}
