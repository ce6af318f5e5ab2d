// Schema of the whole routed ResNeXt bottleneck for inference (implementation:
// routed_bottleneck_cpu.cpp).  Python: fastmod/ops/routed_bottleneck.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastmod, m) {
  // y1 = relu(bn1_scale * routed_conv2d(x, conv1_weight, gates, gate_on="out") + bn1_shift)
  // y2 = relu(bn2_scale * routed_conv2d(y1, conv2_weight, gates, padding=k // 2, groups=G,
  //                                     gate_on="group") + bn2_shift)
  // out = relu(group_norm(routed_conv2d(y2, conv3_weight, gates, gate_on="in"), num_groups,
  //                       gn_weight, gn_bias, eps) + residual); stride 1, no conv biases.
  m.def(
      "routed_bottleneck_gn(Tensor x, Tensor gates, Tensor conv1_weight, Tensor bn1_scale, "
      "Tensor bn1_shift, Tensor conv2_weight, Tensor bn2_scale, Tensor bn2_shift, Tensor conv3_weight, "
      "Tensor residual, int num_groups, Tensor gn_weight, Tensor gn_bias, float eps) -> Tensor");
}
