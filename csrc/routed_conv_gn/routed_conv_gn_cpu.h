// The direct-kernel core of the fused in-gated conv + GroupNorm + residual + ReLU
// (routed_conv_gn_cpu.cpp), shared with the whole-bottleneck op
// (routed_bottleneck/).  No torch in here.
#pragma once

#include <cstdint>

#include "routed_conv/routed_conv_cpu_direct.h"

namespace fastmod::routed_conv {

// Contiguous float32 NCHW buffers (pixels flattened to plan.L) of one call.
struct ConvGnArgs {
  const float* x;         // [N, Cin, L]: only the active input blocks are read
  int64_t Cin;
  const float* w;         // [C, Cin, plan.KK]
  const float* gates;     // [N, G]: gate g scales input block g; 0 skips it
  int64_t G;
  const float* residual;  // [N, C, L]
  float* out;             // [N, C, L]
  int64_t N, C, num_groups;
  const float* gn_w;      // [C]
  const float* gn_b;      // [C]
  double eps;
};

// out = relu(GroupNorm(routed_conv2d(x, w, gates, gate_on="in")) + residual) on the
// direct kernels; the caller checked direct::available() and that `plan` is the
// conv's "same"-size geometry with L > 0.
void conv_gn_direct(const ConvGnArgs& a, const direct::PixelPlan& plan);

}  // namespace fastmod::routed_conv
