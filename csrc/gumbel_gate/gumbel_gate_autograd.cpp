// Autograd kernel of fastmod::gumbel_sigmoid_gate, in C++.
//
// Why C++: at the router's shapes ([64, 8, 32] = 16K elements) both CPU kernels
// take a few tens of microseconds, and a Python autograd wrapper
// (torch.library.register_autograd) cost about as much again per call.  Here the
// graph node is a C++ torch::autograd::Function: forward and backward go straight
// to the dispatcher.  torch.compile traces through it like any C++ autograd kernel.
//
// Saved for backward: for the hard gate, B~ = sigmoid((logits + t) / tau) in float32
// (float64 for float64 logits), written by the forward kernel only when a
// gradient will be needed; the backward is then one multiply, instead of
// regenerating the Philox noise and the log/exp (which was half the step's cost).
// For the soft gate: the logits and the one-element seed (the backward kernel
// regenerates the noise).  The backward itself is not differentiable.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <mutex>
#include <tuple>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The typed handle of fastmod::<name>, looked up once per call site (static).
template <typename Signature>
c10::TypedOperatorHandle<Signature> fastmod_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using OptTensor = c10::optional<at::Tensor>;

at::Tensor call_gate(const at::Tensor& logits, const OptTensor& seed, double tau, bool hard) {
  static const auto op =
      fastmod_op<at::Tensor(const at::Tensor&, const OptTensor&, double, bool)>("fastmod::gumbel_sigmoid_gate");
  return op.call(logits, seed, tau, hard);
}

at::Tensor call_backward(const at::Tensor& grad, const at::Tensor& logits, const OptTensor& seed, double tau) {
  static const auto op = fastmod_op<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, double)>(
      "fastmod::gumbel_sigmoid_gate_backward");
  return op.call(grad, logits, seed, tau);
}

std::tuple<at::Tensor, at::Tensor> call_hard_train(const at::Tensor& logits, const OptTensor& seed, double tau) {
  static const auto op = fastmod_op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const OptTensor&, double)>(
      "fastmod::gumbel_sigmoid_gate_hard_train");
  return op.call(logits, seed, tau);
}

at::Tensor call_backward_soft(const at::Tensor& grad, const at::Tensor& soft, double tau) {
  static const auto op = fastmod_op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>(
      "fastmod::gumbel_sigmoid_gate_backward_soft");
  return op.call(grad, soft, tau);
}

class GumbelSigmoidGate : public torch::autograd::Function<GumbelSigmoidGate> {
 public:
  // needs_grad is decided by the caller: inside forward, grad mode is off.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits, const OptTensor& seed,
                            double tau, bool hard, bool needs_grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->saved_data["tau"] = tau;
    if (hard && needs_grad) {  // saves one tensor, B~ (the backward tells the paths apart by that)
      auto [out, soft] = call_hard_train(logits, seed, tau);
      ctx->save_for_backward({soft});
      return out;
    }
    // An undefined tensor stands for "no seed" (deterministic gate).
    ctx->save_for_backward({logits, seed.has_value() ? *seed : at::Tensor()});
    return call_gate(logits, seed, tau, hard);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const double tau = ctx->saved_data["tau"].toDouble();
    at::Tensor grad_logits;
    if (saved.size() == 1) {  // B~
      grad_logits = call_backward_soft(grads[0], saved[0], tau);
    } else {
      const OptTensor seed = saved[1].defined() ? OptTensor(saved[1]) : c10::nullopt;
      grad_logits = call_backward(grads[0], saved[0], seed, tau);
    }
    return {grad_logits, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor gate_autograd(const at::Tensor& logits, const OptTensor& seed, double tau, bool hard) {
  const bool needs_grad = at::GradMode::is_enabled() && logits.requires_grad();
  return GumbelSigmoidGate::apply(logits, seed, tau, hard, needs_grad);
}

// gumbel_sigmoid_gate_sampled: the seed drawn in C++, then the ordinary op (so its
// autograd kernel above applies).  random64() % 2^62 is what torch.randint(0, 2**62)
// computes from one random64() on the CPU, so the generator advances and the seed
// comes out exactly as with the Python-side draw.
at::Tensor gate_sampled(const at::Tensor& logits, double tau, bool hard, c10::optional<at::Generator> generator) {
  TORCH_CHECK(logits.device().is_cpu(), "gumbel_sigmoid_gate_sampled: logits must be a CPU tensor, got ",
              logits.device());
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  uint64_t r;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    r = gen->random64();
  }
  at::Tensor seed = at::empty({1}, at::TensorOptions().dtype(at::kLong));
  *seed.data_ptr<int64_t>() = static_cast<int64_t>(r % (uint64_t{1} << 62));
  return call_gate(logits, seed, tau, hard);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmod, Autograd, m) {
  m.impl("gumbel_sigmoid_gate", &gate_autograd);
}

TORCH_LIBRARY_IMPL(fastmod, CompositeImplicitAutograd, m) {
  m.impl("gumbel_sigmoid_gate_sampled", &gate_sampled);
}
