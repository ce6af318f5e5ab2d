// Schemas of LNMN's fused six-op mixed node (issue 2).  Inputs are in the
// canonical 4-D form [K|1, B|1, C|1, S|1] prepared by fastmod/ops/mixed_node.py;
// w is [K, 6] (float32, float64 for float64 inputs), ops in the order
// (min, max, x1+x2, x1*x2, x1, x2).  Backends: mixed_node_cpu.cpp (CPU).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastmod, m) {
  // out[K,B,C,S] = sum_i w[k,i] * op_i(x1, x2), L2-normalised over C if `normalize`.
  m.def("mixed_node_fwd(Tensor x1, Tensor x2, Tensor w, bool normalize) -> Tensor");
  // (dx1 shaped like x1, dx2 shaped like x2, dw [K,6]); dx_i is empty when not need_dx_i.
  m.def(
      "mixed_node_bwd(Tensor grad, Tensor x1, Tensor x2, Tensor w, bool normalize, "
      "bool need_dx1, bool need_dx2) -> (Tensor, Tensor, Tensor)");
}
