// Block-sparse routed convolution: shared declarations.
//
// The CPU registration (routed_conv_cpu.cpp) runs forward()/backward() below
// (routed_conv_aten.cpp).  They first try the direct kernels
// (routed_conv_cpu_direct*: float32 stride-1 "same" convs on AVX-512/AVX2 CPUs,
// reading and writing the active blocks in place); otherwise they read the gates on
// the host, build the list of active (sample, block) pairs and run oneDNN
// convolutions on compacted sub-problems that contain the active blocks only.  The
// CUDA registration (routed_conv_cuda.cu) has
// its own kernels over a device-built work list and shares only the argument checks
// below.  Semantics: see fastmod/ops/routed_conv.py.
#pragma once

// Only ATen's core Tensor header: declarations need nothing more.
#include <ATen/core/Tensor.h>

#include <array>
#include <tuple>

namespace fastmod {
namespace routed_conv {

enum class Mode { Group, Out, In };

// gate_on string -> Mode; raises on anything else.
Mode parse_mode(c10::string_view s);

// Shapes, dtypes and the gate_on/groups/G constraints (TORCH_CHECK).
void check_inputs(const at::Tensor& x, const at::Tensor& w, const at::Tensor& gates,
                  const c10::optional<at::Tensor>& bias, int64_t groups, Mode mode);

at::Tensor forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& gates,
                   const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                   c10::string_view gate_on, bool exact);

// The CPU fp32 forward on the direct AVX-512/AVX2 kernels (routed_conv_cpu_direct_aten.cpp)
// for "same"-padded convolutions at any stride; returns an undefined tensor when the dtype, the
// geometry or the CPU is not one it handles (the caller then uses the ATen path).
at::Tensor forward_direct(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& gates,
                          const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                          Mode mode);

// The backward on the direct kernels (same file, same conditions): fills the
// requested ones of gx, gw, gb (float32; the others stay undefined) and gg, and
// returns true, or returns false and leaves them alone.
bool backward_direct(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                     const at::Tensor& gates, const c10::optional<at::Tensor>& bias,
                     const at::Tensor& out, at::IntArrayRef stride, at::IntArrayRef padding,
                     at::IntArrayRef dilation, int64_t groups, Mode mode,
                     std::array<bool, 4> output_mask, bool exact, at::Tensor& gx, at::Tensor& gw,
                     at::Tensor& gb, at::Tensor& gg);

// output_mask = (grad_x, grad_weight, grad_bias, grad_gates).  `out` is the forward
// output (needed for grad_gates in the "group"/"out" modes).  exact=false gives the
// gates of skipped blocks a zero gradient and never touches those blocks.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& gates, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& out, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, c10::string_view gate_on,
    std::array<bool, 4> output_mask, bool exact);

}  // namespace routed_conv
}  // namespace fastmod
