// CPU helpers of the fused normalisation epilogues that other ops' kernels reuse
// (fused_norm_cpu.cpp).  No torch in here.
#pragma once

#include <cstdint>

namespace fastmod::fused_norm {

struct GnStats {
  float mean, rstd;
};

// out = relu(GroupNorm(x) + r) over one (sample, group) block: cg channel rows of hw
// contiguous floats at x, r and out (out may be x: the statistics are taken first);
// w, b are the block's cg affine entries.  Returns the block's mean and 1/std.
GnStats gn_add_relu_block(const float* x, const float* r, float* out, int64_t cg, int64_t hw,
                          const float* w, const float* b, double eps);

}  // namespace fastmod::fused_norm
