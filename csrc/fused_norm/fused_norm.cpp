// Schemas of the fused normalisation epilogues of a routed block
// (implementation: fused_norm_cpu.cpp).  Python: fastmod/ops/fused_norm.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastmod, m) {
  // -> (out, mean, var): the batch statistics (biased var) when training, else the
  // running ones as given.
  m.def(
      "routed_batch_norm_relu(Tensor x, Tensor gates, Tensor weight, Tensor bias, "
      "Tensor? running_mean, Tensor? running_var, bool training, float eps) -> (Tensor, Tensor, Tensor)");
  // -> (grad_x, grad_weight, grad_bias)
  m.def(
      "routed_batch_norm_relu_backward(Tensor grad_out, Tensor x, Tensor gates, Tensor weight, "
      "Tensor bias, Tensor mean, Tensor var, bool training, float eps) -> (Tensor, Tensor, Tensor)");
  // -> (out, mean [N, G], rstd [N, G])
  m.def(
      "group_norm_add_relu(Tensor x, Tensor residual, Tensor weight, Tensor bias, int num_groups, "
      "float eps) -> (Tensor, Tensor, Tensor)");
  // In place on x (contiguous float32), for inference: -> (mean, var) / (mean, rstd).
  m.def(
      "routed_batch_norm_relu_(Tensor(a!) x, Tensor gates, Tensor weight, Tensor bias, "
      "Tensor? running_mean, Tensor? running_var, bool training, float eps) -> (Tensor, Tensor)");
  m.def(
      "group_norm_add_relu_(Tensor(a!) x, Tensor residual, Tensor weight, Tensor bias, int num_groups, "
      "float eps) -> (Tensor, Tensor)");
  // -> (grad_x, grad_residual, grad_weight, grad_bias)
  m.def(
      "group_norm_add_relu_backward(Tensor grad_out, Tensor out, Tensor x, Tensor weight, Tensor mean, "
      "Tensor rstd, int num_groups) -> (Tensor, Tensor, Tensor, Tensor)");
}
