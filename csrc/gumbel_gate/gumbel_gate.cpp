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
  // gumbel_sigmoid_gate with a seed drawn here, on the CPU, from `generator` (default:
  // torch's CPU generator) exactly as torch.randint(0, 2**62, (1,)) draws it (one
  // random64).  The eager CPU path: a Python-side randint cost ~10 us per gate in a
  // training step.  Not for torch.compile, which needs the seed as a graph tensor.
  m.def("gumbel_sigmoid_gate_sampled(Tensor logits, float tau, bool hard, Generator? generator=None) -> Tensor");
  // The float32 uniform noise u a gate call with this seed uses (for tests).
  m.def("gumbel_sigmoid_noise(Tensor logits, Tensor seed) -> Tensor");
}
