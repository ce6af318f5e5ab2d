// The CPU fp32 forward on the direct kernels: builds the per-call row jobs from the
// gates (which rows of which sample, which reduction channels, what scale) and runs
// them with at::parallel_for.  The kernels themselves are in routed_conv_cpu_direct.cpp.
#include "routed_conv/routed_conv.h"
#include "routed_conv/routed_conv_cpu_direct.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

namespace fastmod {
namespace routed_conv {

namespace {

// The jobs of one call.  Each job covers up to direct::kRows output rows of one
// sample; its pointers index the flat arrays below.
struct Jobs {
  std::vector<const float*> x, w_row;
  std::vector<float*> out_row;
  std::vector<float> row_scale, bias;
  std::vector<direct::Segment> segs;
  struct Job {
    int64_t x_idx, row0, seg0;
    int nrows, nseg;
    bool scaled, biased;
  };
  std::vector<Job> list;

  // Rows [r0, r1) of the flat row arrays become jobs of at most kRows rows.
  void add(const float* xp, int64_t r0, int64_t r1, int64_t seg0, int nseg, bool scaled, bool biased) {
    x.push_back(xp);
    for (int64_t r = r0; r < r1; r += direct::kRows) {
      const int n = (int)std::min<int64_t>(direct::kRows, r1 - r);
      list.push_back({(int64_t)x.size() - 1, r, seg0, n, nseg, scaled, biased});
    }
  }

  void run(const direct::PixelPlan& plan) const {
    at::parallel_for(0, (int64_t)list.size(), 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const Job& jb = list[j];
        direct::RowJob rj{x[jb.x_idx], w_row.data() + jb.row0, out_row.data() + jb.row0,
                          jb.scaled ? row_scale.data() + jb.row0 : nullptr,
                          jb.biased ? bias.data() + jb.row0 : nullptr, jb.nrows,
                          segs.data() + jb.seg0, jb.nseg};
        direct::run_rows(rj, plan);
      }
    });
  }
};

}  // namespace

at::Tensor forward_direct(const at::Tensor& x, const at::Tensor& w, const at::Tensor& gates,
                          const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                          Mode mode) {
  if (!x.is_cpu() || x.scalar_type() != at::kFloat || !direct::available()) return at::Tensor();
  const int64_t N = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Cout = w.size(0), kh = w.size(2), kw = w.size(3), G = gates.size(1);
  if (!direct::same_size(H, W, kh, kw, stride[0], stride[1], padding[0], padding[1], dilation[0],
                         dilation[1]))
    return at::Tensor();
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const at::Tensor g = gates.detach().to(at::kCPU, at::kFloat).contiguous();
  const float* gp = g.data_ptr<float>();
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  const float* bp = (bias.has_value() && bias->defined()) ? bias->data_ptr<float>() : nullptr;
  const int64_t L = H * W, KK = kh * kw;
  at::Tensor out = at::empty({N, Cout, H, W}, x.options());
  float* op = out.data_ptr<float>();
  const direct::PixelPlan plan = direct::make_plan(H, W, kh, kw, padding[0], padding[1],
                                                   dilation[0], dilation[1]);
  Jobs jobs;
  std::vector<int64_t> off_blocks;  // n * G + g of the blocks to zero ("group"/"out")

  if (mode == Mode::Group || mode == Mode::Out) {
    // Rows of an active block read all their reduction channels; the gate scales the
    // result (bias included), so one segment of scale 1 per job.
    const int64_t Cbo = Cout / G, Cw = w.size(1);  // Cw: reduction channels per row
    const int64_t Cbi = mode == Mode::Group ? Cin / G : 0;
    jobs.segs.push_back({0, Cw, 1.0f});
    bool binary = true;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t sample_r0 = (int64_t)jobs.w_row.size();
      for (int64_t b = 0; b < G; ++b) {
        const float gv = gp[n * G + b];
        if (gv == 0.0f) { off_blocks.push_back(n * G + b); continue; }
        if (gv != 1.0f) binary = false;
        const int64_t r0 = (int64_t)jobs.w_row.size();
        for (int64_t c = b * Cbo; c < (b + 1) * Cbo; ++c) {
          jobs.w_row.push_back(wp + c * Cw * KK);
          jobs.out_row.push_back(op + (n * Cout + c) * L);
          jobs.row_scale.push_back(gv);
          jobs.bias.push_back(bp ? bp[c] : 0.0f);
        }
        // "group": each active block is one job over its own input channels.
        if (mode == Mode::Group)
          jobs.add(xp + (n * Cin + b * Cbi) * L, r0, (int64_t)jobs.w_row.size(), 0, 1, true, bp != nullptr);
      }
      // "out": the sample's active rows, whatever their blocks, fill whole kRows jobs.
      if (mode == Mode::Out && (int64_t)jobs.w_row.size() > sample_r0)
        jobs.add(xp + n * Cin * L, sample_r0, (int64_t)jobs.w_row.size(), 0, 1, true, bp != nullptr);
    }
    if (binary)
      for (auto& jb : jobs.list) jb.scaled = false;
  } else {  // In: every output row, reduction over the active input blocks, gate per segment
    const int64_t Cbi = Cin / G;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t seg0 = (int64_t)jobs.segs.size();
      for (int64_t b = 0; b < G; ++b) {
        const float gv = gp[n * G + b];
        if (gv != 0.0f) jobs.segs.push_back({b * Cbi, (b + 1) * Cbi, gv});
      }
      const int nseg = (int)(jobs.segs.size() - seg0);
      if (nseg == 0) {  // no active block: the output is the bias
        at::Tensor on = out[n];
        if (bp) on.copy_(bias->view({Cout, 1, 1}).expand({Cout, H, W}));
        else on.zero_();
        continue;
      }
      const int64_t r0 = (int64_t)jobs.out_row.size();
      for (int64_t c = 0; c < Cout; ++c) {
        jobs.w_row.push_back(wp + c * Cin * KK);
        jobs.out_row.push_back(op + (n * Cout + c) * L);
        jobs.bias.push_back(bp ? bp[c] : 0.0f);
      }
      jobs.add(xp + n * Cin * L, r0, r0 + Cout, seg0, nseg, false, bp != nullptr);
    }
  }
  if (!off_blocks.empty()) {
    const at::Tensor idx = at::tensor(off_blocks, at::TensorOptions().dtype(at::kLong));
    out.view({N * G, -1}).index_fill_(0, idx, 0);
  }
  jobs.run(plan);
  return out;
}

}  // namespace routed_conv
}  // namespace fastmod
