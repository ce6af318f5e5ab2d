// Schemas of the routed convolution ops (implementations: routed_conv_cpu.cpp,
// routed_conv_cuda.cu).  Python: fastmod/ops/routed_conv.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastmod, m) {
  m.def(
      "routed_conv2d(Tensor x, Tensor weight, Tensor gates, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, str gate_on, bool exact) -> Tensor");
  m.def(
      "routed_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor gates, "
      "Tensor? bias, Tensor? out, int[2] stride, int[2] padding, int[2] dilation, int groups, "
      "str gate_on, bool[4] output_mask, bool exact) -> (Tensor, Tensor, Tensor, Tensor)");
}
