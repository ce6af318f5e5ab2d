// CUDA registration of the routed convolution: custom kernels over a work list
// built on the device (routed_conv_cuda_kernels.cuh), so no call reads the gates on
// the host: no synchronisation, and the ops can be captured in CUDA graphs.
//
// Semantics are those of the ATen/CPU path and of routed_conv2d_reference
// (fastmod/ops/routed_conv.py).  Passes, per gate mode (kernel kind in brackets):
//   forward:  group [kGrouped], out [kColListed], in [kKListed]; off blocks are
//             never touched ("group"/"out" outputs start as zeros).
//   grad_x:   the transposed conv with the roles swapped: group [kGrouped],
//             out [kKListed: dout scaled by the gate on load], in [kColListed].
//   grad_w:   wgrad_kernel(_tc), per sample and active block, atomically summed
//             over samples in an fp32 (fp64 for double) workspace.
//   grad_b:   plain ATen reductions of grad_out (no sync).
//   grad_gates: group/out: active blocks from the saved output (<dout, out>/gate),
//             off blocks (exact) by a forward pass over the off list whose epilogue
//             dots the ungated result with dout; in: the grad_x pass's epilogue dots
//             the ungated transposed conv with x (active blocks, and the off ones
//             when exact).
// Precision: fp16/bf16/fp32 accumulate in fp32, float64 in double.  The forward,
// grad_x and grad_weight passes run on tensor cores (WMMA, routed_conv_cuda_tc.cuh)
// on sm_80+ when a tile is >= 32 wide (channels; for grad_weight both sides):
// fp16/bf16 always, fp32 as TF32 only when torch allows TF32 convolutions
// (torch.backends.cudnn.allow_tf32, read on every call).  Everything else (float64,
// narrow tiles) is SIMT.
// FASTMOD_ROUTED_CONV_TC=0 in the environment forces the SIMT path (read on every
// call; for tests and bisecting).
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <type_traits>

#include "routed_conv/routed_conv.h"
#include "routed_conv/routed_conv_cuda_kernels.cuh"
#include "routed_conv/routed_conv_cuda_tc.cuh"

namespace fastmod {
namespace routed_conv {
namespace {

using kern::ConvArgs;
using kern::WgradArgs;

constexpr int64_t kIntMax = std::numeric_limits<int>::max();

struct Geo {
  int N, Cin, H, W, Cout, kh, kw, Ho, Wo, sh, sw, ph, pw, dh, dw, cin_g, G;
};

Geo geometry(const at::Tensor& x, const at::Tensor& w, const at::Tensor& gates,
             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
             int64_t groups) {
  TORCH_CHECK(x.dim() == 4 && w.dim() == 4, "routed_conv2d: x and weight must be 4-D");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "routed_conv2d: stride, padding and dilation must have 2 entries");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && padding[0] >= 0 && padding[1] >= 0 &&
                  dilation[0] >= 1 && dilation[1] >= 1,
              "routed_conv2d: bad stride, padding or dilation");
  const int64_t Ho = (x.size(2) + 2 * padding[0] - dilation[0] * (w.size(2) - 1) - 1) / stride[0] + 1;
  const int64_t Wo = (x.size(3) + 2 * padding[1] - dilation[1] * (w.size(3) - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(Ho > 0 && Wo > 0, "routed_conv2d: output would be empty");
  // The kernels index within one sample (and the weight) with 32-bit ints.
  TORCH_CHECK(x.size(1) * x.size(2) * x.size(3) < kIntMax && w.size(0) * Ho * Wo < kIntMax &&
                  w.numel() < kIntMax && x.size(0) * gates.size(1) < kIntMax &&
                  padding[0] < 65536 && padding[1] < 65536 && stride[0] < 65536 &&
                  stride[1] < 65536 && dilation[0] < 65536 && dilation[1] < 65536,
              "routed_conv2d (CUDA): sizes too large for 32-bit indexing within a sample");
  Geo g;
  g.N = (int)x.size(0); g.Cin = (int)x.size(1); g.H = (int)x.size(2); g.W = (int)x.size(3);
  g.Cout = (int)w.size(0); g.kh = (int)w.size(2); g.kw = (int)w.size(3);
  g.Ho = (int)Ho; g.Wo = (int)Wo;
  g.sh = (int)stride[0]; g.sw = (int)stride[1];
  g.ph = (int)padding[0]; g.pw = (int)padding[1];
  g.dh = (int)dilation[0]; g.dw = (int)dilation[1];
  g.cin_g = (int)(x.size(1) / groups);
  g.G = (int)gates.size(1);
  return g;
}

void check_device(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "routed_conv2d: ", name, " is on ", t.device(),
              ", x on ", x.device());
}

at::ScalarType acc_type(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// Per-sample list of blocks, active first (see routed_conv_cuda_kernels.cuh).
struct WorkList {
  at::Tensor list, cnt;  // int32 [N, G], [N]
};

WorkList build_worklist(const at::Tensor& gacc, cudaStream_t stream) {
  const int64_t N = gacc.size(0), G = gacc.size(1);
  auto opts = gacc.options().dtype(at::kInt);
  WorkList wl{at::empty({N, G}, opts), at::empty({N}, opts)};
  if (N == 0) return wl;
  AT_DISPATCH_FLOATING_TYPES(gacc.scalar_type(), "routed_conv2d_worklist", [&] {
    kern::worklist_kernel<scalar_t><<<(int)N, kern::WL_THREADS, 0, stream>>>(
        gacc.data_ptr<scalar_t>(), (int)G, wl.list.data_ptr<int>(), wl.cnt.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return wl;
}

// Thread layout: tn threads along the columns (enough for `cols`, at most 16) and
// tm along the rows (enough for `rows`, at most 64 and 256 threads in all), at
// least one warp.
struct Layout {
  int tm, tn;
  int bm() const { return tm * kern::TM; }
  int bn() const { return tn * kern::TN; }
};

Layout pick_layout(int64_t rows, int64_t cols) {
  int tn = 1;
  while (tn < kern::MAX_TN_THREADS && (int64_t)tn * kern::TN < cols) tn *= 2;
  const int tm_max = std::min(kern::MAX_TM_THREADS, kern::MAX_THREADS / tn);
  int tm = 1;
  while (tm < tm_max && (int64_t)tm * kern::TM < rows) tm *= 2;
  while (tm * tn < 32 && tm < tm_max) tm *= 2;
  return {tm, tn};
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int checked_grid(int64_t grid) {
  TORCH_CHECK(grid <= kIntMax, "routed_conv2d (CUDA): too many tiles (", grid, ")");
  return (int)grid;
}

bool use_tensor_cores(int64_t cols) {
  const char* env = std::getenv("FASTMOD_ROUTED_CONV_TC");
  if (env != nullptr && env[0] == '0') return false;
  return cols >= 32 && at::cuda::getCurrentDeviceProperties()->major >= 8;
}

// Whether this dtype's conv passes may use tensor cores (fp32 only as TF32, when
// torch allows TF32 convolutions).
template <typename scalar_t>
bool tensor_core_dtype() {
  if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
    return true;
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    return at::globalContext().allowTF32CuDNN();
  } else {
    return false;
  }
}

// Tile shape and threads of one launch: WMMA tiles when the dtype allows tensor
// cores and `tc_width` (the narrower tile side) is wide enough, else the SIMT
// layout that fits rows x cols (tm/tn are unused by the WMMA kernels).
struct Tiling {
  bool tc;
  int bm, bn, threads, tm, tn;
};

template <typename scalar_t>
Tiling pick_tiling(int64_t rows, int64_t cols, int64_t tc_width) {
  Tiling t{false, kern::TC_BM, kern::TC_BN, kern::TC_THREADS, 0, 0};
  if constexpr (!std::is_same_v<scalar_t, double>) {
    t.tc = tensor_core_dtype<scalar_t>() && use_tensor_cores(tc_width);
  }
  if (!t.tc) {
    const Layout L = pick_layout(rows, cols);
    t = Tiling{false, L.bm(), L.bn(), L.tm * L.tn, L.tm, L.tn};
  }
  return t;
}

// Calls f(kind, dx) with both as compile-time constants (std::integral_constant):
// the conv kernels take the tile kind and the direction as template parameters.
template <typename F>
void with_kind(int kind, bool dx, const F& f) {
  auto on_dx = [&](auto k) {
    if (dx) {
      f(k, std::true_type{});
    } else {
      f(k, std::false_type{});
    }
  };
  switch (kind) {
    case kern::kGrouped: on_dx(std::integral_constant<int, kern::kGrouped>{}); break;
    case kern::kColListed: on_dx(std::integral_constant<int, kern::kColListed>{}); break;
    default: on_dx(std::integral_constant<int, kern::kKListed>{});
  }
}

// Fills the launch fields of `a` and runs the conv kernel of the given kind:
// WMMA tiles when the dtype and the column count allow tensor cores, else SIMT
// tiles whose thread layout fits `cols` (which bounds one tile's column set).
template <typename scalar_t, typename acc_t>
void launch_conv(int kind, bool dx, ConvArgs<scalar_t, acc_t> a, int N, int64_t cols,
                 cudaStream_t stream) {
  const int64_t rows = (int64_t)a.Hd * a.Wd;
  const Tiling T = pick_tiling<scalar_t>(rows, cols, cols);
  const bool tc = T.tc;
  const int threads = T.threads;
  a.tm = T.tm;
  a.tn = T.tn;
  a.tiles_p = (int)ceil_div(rows, T.bm);
  a.tiles_c = (int)std::max<int64_t>(1, ceil_div(cols, T.bn));
  a.slots = kind == kern::kGrouped ? a.G : 1;
  const int64_t grid64 = (int64_t)N * a.slots * a.tiles_c * a.tiles_p;
  if (grid64 == 0) return;
  const int grid = checked_grid(grid64);
  with_kind(kind, dx, [&](auto k, auto d) {
    constexpr int KIND = decltype(k)::value;
    constexpr bool DX = decltype(d)::value;
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (tc) {
        kern::conv_kernel_tc<scalar_t, KIND, DX><<<grid, threads, 0, stream>>>(a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
    }
    kern::conv_kernel<scalar_t, acc_t, KIND, DX><<<grid, threads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Samples one group-mode grad_weight CTA sums in registers before its atomics.
constexpr int kWgradSamplesPerCta = 8;
constexpr int64_t kWgradTargetCtas = 2048;  // ~16 per SM on an H100: enough to hide latency

// grad_weight: tiles of `rows` output channels x `cols` (input channel, tap)
// columns per (sample chunk, slot); tensor cores when both are >= 32 wide.
template <typename scalar_t, typename acc_t>
void launch_wgrad(Mode mode, WgradArgs<scalar_t, acc_t> a, int N, int64_t rows, int64_t cols,
                  cudaStream_t stream) {
  a.slots = mode == Mode::Group ? a.G : 1;
  a.N = N;
  a.spc = mode == Mode::Group ? kWgradSamplesPerCta : 1;
  const Tiling T = pick_tiling<scalar_t>(rows, cols, std::min(rows, cols));
  const bool tc = T.tc;
  const int threads = T.threads;
  a.tm = T.tm;
  a.tn = T.tn;
  a.tiles_r = (int)ceil_div(rows, T.bm);
  a.tiles_c = (int)ceil_div(cols, T.bn);
  // Split the pixel reduction over more CTAs when the tiles alone are too few (group
  // mode's narrow groups: 256 one-warp CTAs, each walking 8 samples' pixels, took
  // 4 ms for the w128 c16 stage on the H100, 2026-11-27).  Chunks stay multiples of
  // both kernels' K chunk; each CTA adds its part with the usual atomics.
  const int64_t base = ceil_div(N, a.spc) * a.slots * a.tiles_r * a.tiles_c;
  const int64_t K = std::max<int64_t>((int64_t)a.Ho * a.Wo, 1);
  constexpr int64_t kChunkAlign = 32;  // kern::BK and kern::TC_BK divide it
  static_assert(kChunkAlign % kern::BK == 0 && kChunkAlign % kern::TC_BK == 0, "chunk alignment");
  const int64_t want = std::min(ceil_div(K, kChunkAlign), ceil_div(kWgradTargetCtas, std::max<int64_t>(base, 1)));
  a.kchunk = (int)(ceil_div(ceil_div(K, want), kChunkAlign) * kChunkAlign);
  a.ksplit = (int)ceil_div(K, a.kchunk);
  const int grid = checked_grid(base * a.ksplit);
  if (grid == 0) return;
  // The kernels' MODE: 0 group, 1 out, 2 in (see wgrad_kernel).
  auto launch = [&](auto m) {
    constexpr int MODE = decltype(m)::value;
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (tc) {
        kern::wgrad_kernel_tc<scalar_t, MODE><<<grid, threads, 0, stream>>>(a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
    }
    kern::wgrad_kernel<scalar_t, acc_t, MODE><<<grid, threads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (mode == Mode::Group) {
    launch(std::integral_constant<int, 0>{});
  } else if (mode == Mode::Out) {
    launch(std::integral_constant<int, 1>{});
  } else {
    launch(std::integral_constant<int, 2>{});
  }
}

template <typename scalar_t, typename acc_t>
ConvArgs<scalar_t, acc_t> conv_args(const Geo& g, const at::Tensor& gacc, const WorkList& wl,
                                    const at::Tensor& w) {
  ConvArgs<scalar_t, acc_t> a{};
  a.weight = w.data_ptr<scalar_t>();
  a.gates = gacc.data_ptr<acc_t>();
  a.list = wl.list.data_ptr<int>();
  a.cnt = wl.cnt.data_ptr<int>();
  a.G = g.G;
  a.kh = g.kh; a.kw = g.kw; a.sh = g.sh; a.sw = g.sw;
  a.ph = g.ph; a.pw = g.pw; a.dh = g.dh; a.dw = g.dw;
  a.cin_g = g.cin_g;
  a.col_per = 1;
  a.k_per = 1;
  return a;
}

// Operand shapes and tile kind of one conv pass.  dx = false: the forward conv,
// rows = output pixels, src = x, dst shaped like the output.  dx = true: the
// transposed conv (grad_x), src = grad_out, dst shaped like x.  The gated blocks
// sit on the result side ("listed columns") for the forward of "out" and the
// grad_x of "in", on the reduction side ("listed K") for the other two.
template <typename scalar_t, typename acc_t>
void set_dims(ConvArgs<scalar_t, acc_t>& a, const Geo& g, Mode mode, bool dx, int& kind,
              int64_t& cols) {
  a.Csrc = dx ? g.Cout : g.Cin; a.Hs = dx ? g.Ho : g.H; a.Ws = dx ? g.Wo : g.W;
  a.Cdst = dx ? g.Cin : g.Cout; a.Hd = dx ? g.H : g.Ho; a.Wd = dx ? g.W : g.Wo;
  if (mode == Mode::Group) {
    kind = kern::kGrouped; a.col_per = a.Cdst / g.G; a.k_per = a.Csrc / g.G; cols = a.col_per;
  } else if ((mode == Mode::Out) != dx) {
    kind = kern::kColListed; a.col_per = a.Cdst / g.G; cols = a.Cdst;
  } else {
    kind = kern::kKListed; a.k_per = a.Csrc / g.G; cols = a.Cdst;
  }
}

c10::optional<at::Tensor> contiguous_bias(const c10::optional<at::Tensor>& bias) {
  if (bias.has_value() && bias->defined()) return bias->detach().contiguous();
  return c10::nullopt;
}

at::Tensor forward_cuda(const at::Tensor& x_, const at::Tensor& weight, const at::Tensor& gates,
                        const c10::optional<at::Tensor>& bias_, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                        c10::string_view gate_on, bool /*exact: backward only*/) {
  const Mode mode = parse_mode(gate_on);
  check_inputs(x_, weight, gates, bias_, groups, mode);
  check_device(weight, x_, "weight");
  check_device(gates, x_, "gates");
  TORCH_CHECK(at::isFloatingType(gates.scalar_type()), "routed_conv2d: gates must be floating");
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.detach().contiguous();
  const at::Tensor w = weight.detach().contiguous();
  const auto bias = contiguous_bias(bias_);
  if (bias) check_device(*bias, x, "bias");
  const Geo g = geometry(x, w, gates, stride, padding, dilation, groups);

  // "group"/"out": off blocks stay exactly zero; "in" writes every element.
  at::Tensor out = mode == Mode::In ? at::empty({g.N, g.Cout, g.Ho, g.Wo}, x.options())
                                    : at::zeros({g.N, g.Cout, g.Ho, g.Wo}, x.options());
  if (g.N == 0) return out;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor gacc = gates.detach().to(acc_type(x.scalar_type())).contiguous();
  const WorkList wl = build_worklist(gacc, stream);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "routed_conv2d_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    auto a = conv_args<scalar_t, acc_t>(g, gacc, wl, w);
    int kind = 0;
    int64_t cols = 0;
    set_dims(a, g, mode, /*dx=*/false, kind, cols);
    a.src = x.data_ptr<scalar_t>();
    a.bias = bias ? bias->data_ptr<scalar_t>() : nullptr;
    a.dst = out.data_ptr<scalar_t>();
    a.write = true;
    a.gate_epi = mode != Mode::In;
    launch_conv<scalar_t, acc_t>(kind, false, a, g.N, cols, stream);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x_, const at::Tensor& weight,
    const at::Tensor& gates, const c10::optional<at::Tensor>& bias_,
    const c10::optional<at::Tensor>& out_, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, c10::string_view gate_on,
    std::array<bool, 4> output_mask, bool exact) {
  const Mode mode = parse_mode(gate_on);
  check_inputs(x_, weight, gates, bias_, groups, mode);
  check_device(weight, x_, "weight");
  check_device(gates, x_, "gates");
  check_device(grad_out, x_, "grad_out");
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.detach().contiguous();
  const at::Tensor w = weight.detach().contiguous();
  const at::Tensor dout = grad_out.detach().contiguous();
  const auto bias = contiguous_bias(bias_);
  const Geo g = geometry(x, w, gates, stride, padding, dilation, groups);
  TORCH_CHECK(dout.dim() == 4 && dout.size(0) == g.N && dout.size(1) == g.Cout &&
                  dout.size(2) == g.Ho && dout.size(3) == g.Wo,
              "routed_conv2d_backward: grad_out has the wrong shape");
  TORCH_CHECK(dout.scalar_type() == x.scalar_type(), "routed_conv2d_backward: grad_out dtype differs from x");
  const bool need_x = output_mask[0], need_w = output_mask[1];
  const bool need_b = output_mask[2] && bias.has_value(), need_g = output_mask[3];
  const auto acc = acc_type(x.scalar_type());
  const auto acc_opts = x.options().dtype(acc);

  at::Tensor gx = at::zeros_like(x);  // x is contiguous, so gx is too
  at::Tensor gw = at::zeros(w.sizes(), acc_opts);
  at::Tensor gb = at::zeros({g.Cout}, acc_opts);
  at::Tensor gg = at::zeros({g.N, g.G}, acc_opts);
  auto finish = [&]() {
    return std::make_tuple(gx, gw.to(w.scalar_type()), gb.to(w.scalar_type()),
                           gg.to(gates.scalar_type()));
  };
  if (g.N == 0) return finish();
  at::Tensor out;
  if (need_g && mode != Mode::In) {
    TORCH_CHECK(out_.has_value() && out_->defined(),
                "routed_conv2d_backward: grad_gates needs the forward output");
    check_device(*out_, x, "out");
    out = out_->detach().contiguous();
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor gacc = gates.detach().to(acc).contiguous();
  const WorkList wl = build_worklist(gacc, stream);

  if (need_b) {  // gated blocks contribute gate * dout; "in" adds the bias ungated
    if (mode == Mode::In) {
      gb = dout.sum({0, 2, 3}, false, acc);
    } else {
      const int64_t Cb = g.Cout / g.G;
      gb = (dout.sum({2, 3}, false, acc).view({g.N, g.G, Cb}) * gacc.view({g.N, g.G, 1}))
               .sum(0)
               .view({g.Cout});
    }
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "routed_conv2d_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    acc_t* gg_ptr = gg.data_ptr<acc_t>();

    // grad_x (+ grad_gates of "in" through the epilogue's dot with x).
    const bool dx_pass = need_x || (need_g && mode == Mode::In);
    if (dx_pass) {
      auto a = conv_args<scalar_t, acc_t>(g, gacc, wl, w);
      int kind = 0;
      int64_t cols = 0;
      set_dims(a, g, mode, /*dx=*/true, kind, cols);
      a.src = dout.data_ptr<scalar_t>();
      a.dst = gx.data_ptr<scalar_t>();
      a.other = x.data_ptr<scalar_t>();
      a.dot_ws = gg_ptr;
      a.write = need_x;
      a.dot = need_g && mode == Mode::In;
      a.gate_epi = mode != Mode::Out;  // "out" scales dout by the gate on load instead
      launch_conv<scalar_t, acc_t>(kind, true, a, g.N, cols, stream);
      if (a.dot && exact) {  // d(input) of the skipped blocks, for their gates only
        a.off = true;
        a.write = false;
        launch_conv<scalar_t, acc_t>(kind, true, a, g.N, cols, stream);
      }
    }

    if (need_g && mode != Mode::In) {
      const int64_t block_len = (int64_t)(g.Cout / g.G) * g.Ho * g.Wo;
      const int grid = checked_grid((int64_t)g.N * g.G);
      kern::active_gate_grad_kernel<scalar_t, acc_t><<<grid, kern::DOT_THREADS, 0, stream>>>(
          dout.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), gacc.data_ptr<acc_t>(),
          wl.list.data_ptr<int>(), wl.cnt.data_ptr<int>(), gg_ptr, g.G, block_len);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (exact) {  // ungated forward of the off blocks, dotted with dout
        auto a = conv_args<scalar_t, acc_t>(g, gacc, wl, w);
        int kind = 0;
        int64_t cols = 0;
        set_dims(a, g, mode, /*dx=*/false, kind, cols);
        a.src = x.data_ptr<scalar_t>();
        a.bias = bias ? bias->data_ptr<scalar_t>() : nullptr;
        a.other = dout.data_ptr<scalar_t>();
        a.dot_ws = gg_ptr;
        a.off = true;
        a.dot = true;
        launch_conv<scalar_t, acc_t>(kind, false, a, g.N, cols, stream);
      }
    }

    if (need_w) {
      WgradArgs<scalar_t, acc_t> a{};
      a.dout = dout.data_ptr<scalar_t>();
      a.x = x.data_ptr<scalar_t>();
      a.gw = gw.data_ptr<acc_t>();
      a.gates = gacc.data_ptr<acc_t>();
      a.list = wl.list.data_ptr<int>();
      a.cnt = wl.cnt.data_ptr<int>();
      a.G = g.G; a.Cout = g.Cout; a.Ho = g.Ho; a.Wo = g.Wo; a.Cin = g.Cin; a.H = g.H; a.W = g.W;
      a.kh = g.kh; a.kw = g.kw; a.sh = g.sh; a.sw = g.sw;
      a.ph = g.ph; a.pw = g.pw; a.dh = g.dh; a.dw = g.dw;
      a.cin_g = g.cin_g;
      a.row_per = g.Cout / g.G;
      a.q_per = g.Cin / g.G;
      const int64_t khkw = (int64_t)g.kh * g.kw;
      int64_t rows, cols;
      if (mode == Mode::Group) {
        rows = a.row_per; cols = a.q_per * khkw;
      } else {
        rows = g.Cout; cols = g.Cin * khkw;
      }
      launch_wgrad<scalar_t, acc_t>(mode, a, g.N, rows, cols, stream);
    }
  });
  return finish();
}

}  // namespace
}  // namespace routed_conv
}  // namespace fastmod

TORCH_LIBRARY_IMPL(fastmod, CUDA, m) {
  m.impl("routed_conv2d", &fastmod::routed_conv::forward_cuda);
  m.impl("routed_conv2d_backward", &fastmod::routed_conv::backward_cuda);
}
