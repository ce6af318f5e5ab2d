// Schema of the routed "in" convolution with a fused GroupNorm + residual + ReLU
// epilogue, for inference (implementation: routed_conv_gn_cpu.cpp).  Python:
// fastmod/ops/routed_conv_gn.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastmod, m) {
  // relu(group_norm(routed_conv2d(x, weight, gates, gate_on="in", padding), num_groups,
  //      gn_weight, gn_bias, eps) + residual); stride 1, no conv bias.
  m.def(
      "routed_conv2d_gn_add_relu(Tensor x, Tensor weight, Tensor gates, Tensor residual, "
      "int[2] padding, int num_groups, Tensor gn_weight, Tensor gn_bias, float eps) -> Tensor");
}
