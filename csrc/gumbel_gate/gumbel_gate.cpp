// Schemas of the Gumbel-sigmoid straight-through gate (issue 3).  The CPU
// kernels are in gumbel_gate_cpu.cpp; Python (fastmod/ops/gumbel_gate.py)
// registers the fake kernels and the autograd formula.
//
// `seed` is an int64 tensor of one element (drawn from torch's generator per
// call, so torch.compile cannot bake it in); None means deterministic.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastmod, m) {
  // hard: 1[logits + t > 0] (straight-through); soft: sigmoid((logits + t) / tau).
  m.def("gumbel_sigmoid_gate(Tensor logits, Tensor? seed, float tau, bool hard) -> Tensor");
  // grad * s(1 - s) / tau, s = sigmoid((logits + t) / tau), t recomputed from seed.
  m.def("gumbel_sigmoid_gate_backward(Tensor grad, Tensor logits, Tensor? seed, float tau) -> Tensor");
  // CPU training forward of the hard gate: (gate, B~) with B~ = sigmoid((logits + t) / tau)
  // in float32 (float64 for float64 logits), which the C++ autograd kernel saves.
  m.def("gumbel_sigmoid_gate_hard_train(Tensor logits, Tensor? seed, float tau) -> (Tensor, Tensor)");
  // grad * soft * (1 - soft) / tau: the straight-through backward from the saved B~.
  m.def("gumbel_sigmoid_gate_backward_soft(Tensor grad, Tensor soft, float tau) -> Tensor");
  // The float32 uniform noise u a gate call with this seed uses (for tests).
  m.def("gumbel_sigmoid_noise(Tensor logits, Tensor seed) -> Tensor");
}
