// Routed convolution on compacted sub-problems, written against ATen only (see
// routed_conv.h).  forward()/backward() hand float32 stride-1 "same" convs to the
// direct kernels first (forward_direct/backward_direct); the rest runs here.
//
// Strategy, per gate mode (G blocks, P active (n, g) pairs):
//   group: every active pair becomes one group of a single grouped convolution with
//          P groups over the gathered input blocks, so one vendor conv call runs
//          exactly the active work.
//   out:   per sample, one convolution with the weight rows of the active blocks.
//   in:    per sample, one convolution over the input channels of the active blocks.
// When every gate is non-zero the dense conv runs (nothing to skip).  Gates are
// applied by scaling the (small) gathered weights, never the activations; binary
// gates skip the scaling.
#include "routed_conv/routed_conv.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <mutex>
#include <vector>

namespace fastmod {
namespace routed_conv {

// Shared with the CUDA registration (declared in routed_conv.h).
Mode parse_mode(c10::string_view s) {
  if (s == "group") return Mode::Group;
  if (s == "out") return Mode::Out;
  if (s == "in") return Mode::In;
  TORCH_CHECK(false, "routed_conv2d: gate_on must be 'group', 'out' or 'in', got '", std::string(s), "'");
}

void check_inputs(const at::Tensor& x, const at::Tensor& w, const at::Tensor& gates,
                  const c10::optional<at::Tensor>& bias, int64_t groups, Mode mode) {
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "routed_conv2d: weight and x dtypes differ");
  TORCH_CHECK(gates.dim() == 2 && gates.size(0) == x.size(0), "routed_conv2d: gates must be [N, G]");
  TORCH_CHECK(groups >= 1 && x.size(1) == w.size(1) * groups && w.size(0) % groups == 0,
              "routed_conv2d: channels do not match groups");
  int64_t G = gates.size(1);
  TORCH_CHECK(G >= 1, "routed_conv2d: gates needs at least one block");
  if (mode == Mode::Group) TORCH_CHECK(G == groups, "routed_conv2d: gate_on='group' needs G == groups");
  if (mode == Mode::Out) TORCH_CHECK(groups == 1 && w.size(0) % G == 0, "routed_conv2d: gate_on='out' needs groups == 1, G | Cout");
  if (mode == Mode::In) TORCH_CHECK(groups == 1 && x.size(1) % G == 0, "routed_conv2d: gate_on='in' needs groups == 1, G | Cin");
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0) && bias->scalar_type() == x.scalar_type(),
                "routed_conv2d: bias must be [Cout] with x's dtype");
}

namespace {

// Which (n, g) pairs are active, read once on the host (on CUDA this copy is the
// one host synchronisation of the call).
struct Plan {
  int64_t N = 0, G = 0;
  std::vector<int64_t> act_flat, act_g, off_flat, off_g;  // n-major; flat = n * G + g
  std::vector<int64_t> act_start, off_start;              // per-sample offsets, size N + 1
  bool all_on = true;   // no gate is exactly zero
  bool binary = true;   // every gate is 0 or 1 (no scaling needed)
  at::Tensor d_act_flat, d_act_g, d_off_flat, d_off_g;    // the lists on the device

  int64_t n_act(int64_t n) const { return act_start[n + 1] - act_start[n]; }
  int64_t n_off(int64_t n) const { return off_start[n + 1] - off_start[n]; }
  at::Tensor act(int64_t n) const { return d_act_g.narrow(0, act_start[n], n_act(n)); }
  at::Tensor off(int64_t n) const { return d_off_g.narrow(0, off_start[n], n_off(n)); }
};

at::Tensor to_device(const std::vector<int64_t>& v, const at::Device& device) {
  auto t = at::empty({(int64_t)v.size()}, at::TensorOptions().dtype(at::kLong));
  if (!v.empty()) std::copy(v.begin(), v.end(), t.data_ptr<int64_t>());
  return device.is_cpu() ? t : t.to(device, /*non_blocking=*/false);
}

Plan make_plan(const at::Tensor& gates, const at::Device& device) {
  Plan p;
  p.N = gates.size(0);
  p.G = gates.size(1);
  auto gh = gates.detach().to(at::kCPU, at::kDouble).contiguous();
  const double* g = gh.data_ptr<double>();
  p.act_start.push_back(0);
  p.off_start.push_back(0);
  for (int64_t n = 0; n < p.N; ++n) {
    for (int64_t b = 0; b < p.G; ++b) {
      double v = g[n * p.G + b];
      if (v == 0.0) {
        p.off_flat.push_back(n * p.G + b);
        p.off_g.push_back(b);
        p.all_on = false;
      } else {
        p.act_flat.push_back(n * p.G + b);
        p.act_g.push_back(b);
        if (v != 1.0) p.binary = false;
      }
    }
    p.act_start.push_back((int64_t)p.act_flat.size());
    p.off_start.push_back((int64_t)p.off_flat.size());
  }
  p.d_act_flat = to_device(p.act_flat, device);
  p.d_act_g = to_device(p.act_g, device);
  p.d_off_flat = to_device(p.off_flat, device);
  p.d_off_g = to_device(p.off_g, device);
  return p;
}

struct Geo {
  std::vector<int64_t> stride, padding, dilation;
  int64_t N, Cin, H, W, Cout, kh, kw, Ho, Wo;
};

Geo geometry(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
             at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(x.dim() == 4 && w.dim() == 4, "routed_conv2d: x and weight must be 4-D");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "routed_conv2d: stride, padding and dilation must have 2 entries");
  Geo g;
  g.stride = stride.vec();
  g.padding = padding.vec();
  g.dilation = dilation.vec();
  g.N = x.size(0); g.Cin = x.size(1); g.H = x.size(2); g.W = x.size(3);
  g.Cout = w.size(0); g.kh = w.size(2); g.kw = w.size(3);
  g.Ho = (g.H + 2 * padding[0] - dilation[0] * (g.kh - 1) - 1) / stride[0] + 1;
  g.Wo = (g.W + 2 * padding[1] - dilation[1] * (g.kw - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(g.Ho > 0 && g.Wo > 0, "routed_conv2d: output would be empty");
  return g;
}

at::Tensor conv(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                const Geo& geo, int64_t groups) {
  return at::convolution(x, w, b, geo.stride, geo.padding, geo.dilation, false, {0, 0}, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const Geo& geo,
    int64_t groups, bool need_x, bool need_w, bool need_b) {
  c10::optional<std::vector<int64_t>> bias_sizes;
  at::OptionalIntArrayRef bs = c10::nullopt;
  std::vector<int64_t> sizes{w.size(0)};
  if (need_b) bs = at::IntArrayRef(sizes);
  return at::convolution_backward(dy, x, w, bs, geo.stride, geo.padding, geo.dilation, false,
                                  {0, 0}, groups, {need_x, need_w, need_b});
}

// Per-row scale of a [rows, ...] tensor viewed as [k, rest] by gates [k].
at::Tensor scale_rows(const at::Tensor& t, const at::Tensor& g) {
  auto k = g.size(0);
  return (t.reshape({k, -1}) * g.unsqueeze(1)).view(t.sizes());
}

// Runs f(n0, n1) over the samples: split across the intra-op threads on CPU (each
// sub-problem then runs single-threaded, which suits these small batch-1 convs),
// one sequential call on CUDA.  The caller's thread-local state (grad/inference
// mode, dispatch keys) is carried into the worker threads.
// The backward runs sequentially (parallel=false): oneDNN's conv backward inside
// at::parallel_for workers hung on 2 threads (seen with 64 channels at 56x56).
template <typename F>
void for_samples(const at::Tensor& x, int64_t N, const F& f, bool parallel = true) {
  if (!parallel || !x.is_cpu() || N <= 1) {
    f(0, N);
    return;
  }
  at::ThreadLocalState tls;
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    at::ThreadLocalStateGuard guard(tls);
    f(n0, n1);
  });
}

// dst.index_add_(dim, idx, src) for indices that are unique: ATen's CPU index_add_
// goes through a slow scatter_add_, a gather + add + index_copy_ does not.
void add_unique_rows(at::Tensor& dst, int64_t dim, const at::Tensor& idx, const at::Tensor& src) {
  dst.index_copy_(dim, idx, dst.index_select(dim, idx) + src);
}

// dst [R, K] += onehot(idx)[R, P] @ src [P, K]: row sums with repeated indices as one GEMM.
void add_rows_repeated(at::Tensor& dst, const at::Tensor& idx, const at::Tensor& src) {
  at::Tensor onehot = at::zeros({dst.size(0), idx.size(0)}, src.options());
  onehot.scatter_(0, idx.unsqueeze(0), 1.0);
  dst.addmm_(onehot, src);
}

at::ScalarType acc_type(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

c10::optional<at::Tensor> contiguous_bias(const c10::optional<at::Tensor>& bias) {
  if (bias.has_value() && bias->defined()) return bias->detach().contiguous();
  return c10::nullopt;
}

}  // namespace

at::Tensor forward(const at::Tensor& x_, const at::Tensor& weight, const at::Tensor& gates,
                   const c10::optional<at::Tensor>& bias_, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                   c10::string_view gate_on, bool /*exact: used by the backward only*/) {
  const Mode mode = parse_mode(gate_on);
  check_inputs(x_, weight, gates, bias_, groups, mode);
  const at::Tensor x = x_.detach().contiguous();  // no autograd below this op
  const at::Tensor w = weight.detach().contiguous();
  const auto bias = contiguous_bias(bias_);
  const Geo geo = geometry(x, w, stride, padding, dilation);
  const int64_t N = geo.N, G = gates.size(1), Cin = geo.Cin, Cout = geo.Cout;
  const int64_t H = geo.H, W = geo.W, Ho = geo.Ho, Wo = geo.Wo, kh = geo.kh, kw = geo.kw;
  if (N == 0) return at::zeros({N, Cout, Ho, Wo}, x.options());
  {
    at::Tensor y = forward_direct(x, w, gates, bias, stride, padding, dilation, groups, mode);
    if (y.defined()) return y;
  }

  const Plan p = make_plan(gates, x.device());
  const at::Tensor gd = gates.detach().to(x.scalar_type()).contiguous();

  if (p.all_on) {  // nothing to skip: one dense conv, gates applied to the (small) side
    if (mode == Mode::In) {
      at::Tensor xin = p.binary ? x : x * gd.repeat_interleave(Cin / G, 1).view({N, Cin, 1, 1});
      return conv(xin, w, bias, geo, groups).contiguous();
    }
    at::Tensor y = conv(x, w, bias, geo, groups).contiguous();
    if (!p.binary) y.mul_(gd.repeat_interleave(Cout / G, 1).view({N, Cout, 1, 1}));
    return y;
  }

  if (mode == Mode::Group) {
    // Off blocks are zero-filled, active ones written once: no full zeros() pass.
    at::Tensor out = at::empty({N, Cout, Ho, Wo}, x.options());
    const int64_t P = (int64_t)p.act_flat.size();
    out.view({N * G, -1}).index_fill_(0, p.d_off_flat, 0);
    if (P == 0) return out;
    const int64_t Cgi = Cin / G, Cgo = Cout / G;
    at::Tensor xs = x.view({N * G, Cgi * H * W}).index_select(0, p.d_act_flat).view({1, P * Cgi, H, W});
    at::Tensor ws = w.view({G, -1}).index_select(0, p.d_act_g);
    c10::optional<at::Tensor> bs;
    if (bias) bs = bias->view({G, Cgo}).index_select(0, p.d_act_g);
    if (!p.binary) {
      at::Tensor gp = gd.view({N * G}).index_select(0, p.d_act_flat);
      ws = scale_rows(ws, gp);
      if (bs) bs = scale_rows(*bs, gp);
    }
    if (bs) bs = bs->view({P * Cgo});
    at::Tensor y = conv(xs, ws.view({P * Cgo, Cgi, kh, kw}), bs, geo, P);
    out.view({N * G, Cgo * Ho * Wo}).index_copy_(0, p.d_act_flat, y.reshape({P, Cgo * Ho * Wo}));
    return out;
  }

  if (mode == Mode::Out) {
    at::Tensor out = at::empty({N, Cout, Ho, Wo}, x.options());
    const int64_t Cb = Cout / G;
    at::Tensor wv = w.view({G, -1});
    for_samples(x, N, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t k = p.n_act(n);
      if (k < G) out[n].view({G, Cb * Ho * Wo}).index_fill_(0, p.off(n), 0);
      if (k == 0) continue;
      at::Tensor A = p.act(n);
      at::Tensor ws = k == G ? wv : wv.index_select(0, A);
      c10::optional<at::Tensor> bs;
      if (bias) bs = k == G ? bias->view({G, Cb}) : bias->view({G, Cb}).index_select(0, A);
      if (!p.binary) {
        at::Tensor gA = gd[n].index_select(0, A);
        ws = scale_rows(ws, gA);
        if (bs) bs = scale_rows(*bs, gA);
      }
      if (bs) bs = bs->reshape({k * Cb});
      at::Tensor y = conv(x.narrow(0, n, 1), ws.view({k * Cb, geo.Cin, kh, kw}), bs, geo, 1);
      out[n].view({G, Cb * Ho * Wo}).index_copy_(0, A, y.reshape({k, Cb * Ho * Wo}));
    }
    });
    return out;
  }

  // Mode::In: out[n] = conv(x[n, active input blocks], W[:, active blocks]) + bias.
  at::Tensor out = at::empty({N, Cout, Ho, Wo}, x.options());
  const int64_t Cbi = Cin / G;
  at::Tensor xv = x.view({N, G, Cbi * H * W});
  at::Tensor wv = w.view({Cout, G, Cbi * kh * kw});
  for_samples(x, N, [&](int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t k = p.n_act(n);
    if (k == 0) {
      if (bias) out[n].copy_(bias->view({Cout, 1, 1}).expand({Cout, Ho, Wo}));
      else out[n].zero_();
      continue;
    }
    at::Tensor A = p.act(n);
    at::Tensor xs = k == G ? x.narrow(0, n, 1) : xv[n].index_select(0, A).view({1, k * Cbi, H, W});
    at::Tensor ws = k == G ? wv : wv.index_select(1, A);
    if (!p.binary) ws = ws * gd[n].index_select(0, A).view({1, k, 1});
    at::Tensor y = conv(xs, ws.reshape({Cout, k * Cbi, kh, kw}), bias, geo, 1);
    out[n].copy_(y[0]);
  }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& x_, const at::Tensor& weight,
    const at::Tensor& gates, const c10::optional<at::Tensor>& bias_,
    const c10::optional<at::Tensor>& out_, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, c10::string_view gate_on,
    std::array<bool, 4> output_mask, bool exact) {
  const Mode mode = parse_mode(gate_on);
  check_inputs(x_, weight, gates, bias_, groups, mode);
  const at::Tensor x = x_.detach().contiguous();
  const at::Tensor w = weight.detach().contiguous();
  const at::Tensor dout = grad_out.detach().contiguous();
  const auto bias = contiguous_bias(bias_);
  const Geo geo = geometry(x, w, stride, padding, dilation);
  const int64_t N = geo.N, G = gates.size(1), Cin = geo.Cin, Cout = geo.Cout;
  const int64_t H = geo.H, W = geo.W, Ho = geo.Ho, Wo = geo.Wo, kh = geo.kh, kw = geo.kw;
  TORCH_CHECK(dout.dim() == 4 && dout.size(0) == N && dout.size(1) == Cout && dout.size(2) == Ho &&
                  dout.size(3) == Wo, "routed_conv2d_backward: grad_out has the wrong shape");
  const bool need_x = output_mask[0], need_w = output_mask[1];
  const bool need_b = output_mask[2] && bias.has_value(), need_g = output_mask[3];
  const auto acc = acc_type(x.scalar_type());
  const auto acc_opts = x.options().dtype(acc);

  if (need_g && mode != Mode::In && N > 0)
    TORCH_CHECK(out_.has_value() && out_->defined(),
                "routed_conv2d_backward: grad_gates needs the forward output");
  const at::Tensor out = (need_g && mode != Mode::In && N > 0) ? out_->detach().contiguous() : at::Tensor();
  // Gradients not produced below are zeros, allocated only then: the dense path
  // otherwise paid a memset of x's size it then threw away.
  at::Tensor gx, gw, gb, gg;
  auto finish = [&]() {
    if (!gx.defined()) gx = at::zeros_like(x);
    if (!gw.defined()) gw = at::zeros(w.sizes(), acc_opts);
    if (!gb.defined()) gb = at::zeros({Cout}, acc_opts);
    if (!gg.defined()) gg = at::zeros({N, G}, acc_opts);
    return std::make_tuple(gx, gw.to(w.scalar_type()), gb.to(w.scalar_type()),
                           gg.to(gates.scalar_type()));
  };
  if (N == 0) return finish();
  if (backward_direct(dout, x, w, gates, bias, out, stride, padding, dilation, groups, mode,
                      output_mask, exact, gx, gw, gb, gg))
    return finish();

  const Plan p = make_plan(gates, x.device());
  const at::Tensor gd = gates.detach().to(x.scalar_type()).contiguous();
  const at::Tensor gacc = gates.detach().to(acc).contiguous();

  if (p.all_on) {  // dense: one conv backward
    if (mode == Mode::In) {
      at::Tensor gexp = gd.repeat_interleave(Cin / G, 1).view({N, Cin, 1, 1});
      at::Tensor xg = p.binary ? x : x * gexp;
      auto r = conv_backward(dout, xg, w, geo, groups, need_x || need_g, need_w, need_b);
      const at::Tensor& dxg = std::get<0>(r);
      if (need_x) gx = p.binary ? dxg : dxg * gexp;
      if (need_g) gg = (dxg.to(acc) * x.to(acc)).view({N, G, -1}).sum(-1);
      if (need_w) gw = std::get<1>(r);
      if (need_b) gb = std::get<2>(r);
      return finish();
    }
    at::Tensor dz = p.binary ? dout : dout * gd.repeat_interleave(Cout / G, 1).view({N, Cout, 1, 1});
    if (need_x || need_w || need_b) {
      auto r = conv_backward(dz, x, w, geo, groups, need_x, need_w, need_b);
      if (need_x) gx = std::get<0>(r);
      if (need_w) gw = std::get<1>(r);
      if (need_b) gb = std::get<2>(r);
    }
    if (need_g) {
      gg = (dout.to(acc) * out.to(acc)).view({N, G, -1}).sum(-1);
      if (!p.binary) gg = gg / gacc;
    }
    return finish();
  }

  // The compacted paths below add into these.
  gx = at::zeros_like(x);
  gw = at::zeros(w.sizes(), acc_opts);
  gb = at::zeros({Cout}, acc_opts);
  gg = at::zeros({N, G}, acc_opts);
  const bool need_any = need_x || need_w || need_b;
  if (mode == Mode::Group) {
    const int64_t Cgi = Cin / G, Cgo = Cout / G;
    const int64_t P = (int64_t)p.act_flat.size(), Q = (int64_t)p.off_flat.size();
    at::Tensor xflat = x.view({N * G, Cgi * H * W});
    at::Tensor dflat = dout.view({N * G, Cgo * Ho * Wo});
    at::Tensor wflat = w.view({G, -1});
    if (P > 0 && (need_any || need_g)) {
      at::Tensor dys = dflat.index_select(0, p.d_act_flat);
      at::Tensor gp = gd.view({N * G}).index_select(0, p.d_act_flat);
      if (need_any) {
        at::Tensor xs = xflat.index_select(0, p.d_act_flat).view({1, P * Cgi, H, W});
        at::Tensor dz = (p.binary ? dys : scale_rows(dys, gp)).view({1, P * Cgo, Ho, Wo});
        at::Tensor ws = wflat.index_select(0, p.d_act_g).view({P * Cgo, Cgi, kh, kw});
        auto r = conv_backward(dz, xs, ws, geo, P, need_x, need_w, need_b);
        if (need_x) gx.view({N * G, -1}).index_copy_(0, p.d_act_flat, std::get<0>(r).reshape({P, -1}));
        if (need_w) {
          at::Tensor gwv = gw.view({G, -1});
          add_rows_repeated(gwv, p.d_act_g, std::get<1>(r).reshape({P, -1}).to(acc));
        }
        if (need_b) {
          at::Tensor gbv = gb.view({G, Cgo});
          add_rows_repeated(gbv, p.d_act_g, std::get<2>(r).reshape({P, Cgo}).to(acc));
        }
      }
      if (need_g) {
        at::Tensor ys = out.view({N * G, -1}).index_select(0, p.d_act_flat);
        at::Tensor v = (dys.to(acc) * ys.to(acc)).sum(1);
        if (!p.binary) v = v / gp.to(acc);
        gg.view({N * G}).index_copy_(0, p.d_act_flat, v);
      }
    }
    if (need_g && exact && Q > 0) {  // ungated forward of the skipped blocks, no backward
      at::Tensor xo = xflat.index_select(0, p.d_off_flat).view({1, Q * Cgi, H, W});
      at::Tensor wo = wflat.index_select(0, p.d_off_g).view({Q * Cgo, Cgi, kh, kw});
      c10::optional<at::Tensor> bo;
      if (bias) bo = bias->view({G, Cgo}).index_select(0, p.d_off_g).view({Q * Cgo});
      at::Tensor zo = conv(xo, wo, bo, geo, Q);
      at::Tensor v = (dflat.index_select(0, p.d_off_flat).to(acc) * zo.reshape({Q, -1}).to(acc)).sum(1);
      gg.view({N * G}).index_copy_(0, p.d_off_flat, v);
    }
    return finish();
  }

  if (mode == Mode::Out) {
    const int64_t Cb = Cout / G;
    at::Tensor wv = w.view({G, -1});
    std::mutex mu;
    for_samples(x, N, [&](int64_t n0, int64_t n1) {
    at::Tensor lgw = at::zeros_like(gw), lgb = at::zeros_like(gb);  // per-thread sums
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t k = p.n_act(n), ko = p.n_off(n);
      at::Tensor dyn = dout[n].view({G, Cb * Ho * Wo});
      at::Tensor xn = x.narrow(0, n, 1);
      if (k > 0 && (need_any || need_g)) {
        at::Tensor A = p.act(n);
        at::Tensor dys = dyn.index_select(0, A);
        at::Tensor gA = gd[n].index_select(0, A);
        if (need_any) {
          at::Tensor dz = (p.binary ? dys : scale_rows(dys, gA)).view({1, k * Cb, Ho, Wo});
          at::Tensor ws = wv.index_select(0, A).view({k * Cb, Cin, kh, kw});
          auto r = conv_backward(dz, xn, ws, geo, 1, need_x, need_w, need_b);
          if (need_x) gx[n].copy_(std::get<0>(r)[0]);
          if (need_w) {
            at::Tensor v = lgw.view({G, -1});
            add_unique_rows(v, 0, A, std::get<1>(r).reshape({k, -1}).to(acc));
          }
          if (need_b) {
            at::Tensor v = lgb.view({G, Cb});
            add_unique_rows(v, 0, A, std::get<2>(r).reshape({k, Cb}).to(acc));
          }
        }
        if (need_g) {
          at::Tensor ys = out[n].view({G, -1}).index_select(0, A);
          at::Tensor v = (dys.to(acc) * ys.to(acc)).sum(1);
          if (!p.binary) v = v / gA.to(acc);
          gg[n].index_copy_(0, A, v);
        }
      }
      if (need_g && exact && ko > 0) {
        at::Tensor O = p.off(n);
        at::Tensor wo = wv.index_select(0, O).view({ko * Cb, Cin, kh, kw});
        c10::optional<at::Tensor> bo;
        if (bias) bo = bias->view({G, Cb}).index_select(0, O).view({ko * Cb});
        at::Tensor zo = conv(xn, wo, bo, geo, 1);
        at::Tensor v = (dyn.index_select(0, O).to(acc) * zo.reshape({ko, -1}).to(acc)).sum(1);
        gg[n].index_copy_(0, O, v);
      }
    }
    std::lock_guard<std::mutex> lock(mu);
    if (need_w) gw.add_(lgw);
    if (need_b) gb.add_(lgb);
    }, /*parallel=*/false);
    return finish();
  }

  // Mode::In
  const int64_t Cbi = Cin / G;
  if (need_b) gb = dout.sum({0, 2, 3}, false, acc);
  at::Tensor xv = x.view({N, G, Cbi * H * W});
  at::Tensor wv = w.view({Cout, G, Cbi * kh * kw});
  std::mutex mu;
  for_samples(x, N, [&](int64_t n0, int64_t n1) {
  at::Tensor lgw = at::zeros_like(gw);  // per-thread sum
  at::Tensor gwv = lgw.view({Cout, G, Cbi * kh * kw});
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t k = p.n_act(n), ko = p.n_off(n);
    at::Tensor dyn = dout.narrow(0, n, 1);
    if (k > 0 && (need_x || need_w || need_g)) {
      at::Tensor A = p.act(n);
      at::Tensor xs = xv[n].index_select(0, A);  // [k, Cbi*H*W]
      at::Tensor ws = wv.index_select(1, A).view({Cout, k * Cbi, kh, kw});
      at::Tensor gA = gd[n].index_select(0, A);
      // Ungated sub-problem: d(input) and d(weight) are then scaled by the gates.
      auto r = conv_backward(dyn, xs.view({1, k * Cbi, H, W}), ws, geo, 1, need_x || need_g, need_w, false);
      at::Tensor dxr = std::get<0>(r);
      if (need_g) gg[n].index_copy_(0, A, (dxr.reshape({k, -1}).to(acc) * xs.to(acc)).sum(1));
      if (need_x) {
        at::Tensor dx = dxr.reshape({k, -1});
        if (!p.binary) dx = scale_rows(dx, gA);
        gx[n].view({G, -1}).index_copy_(0, A, dx);
      }
      if (need_w) {
        at::Tensor dw = std::get<1>(r).reshape({Cout, k, -1}).to(acc);
        if (!p.binary) dw = dw * gA.to(acc).view({1, k, 1});
        add_unique_rows(gwv, 1, A, dw);
      }
    }
    if (need_g && exact && ko > 0) {  // d(input) of the skipped blocks only
      at::Tensor O = p.off(n);
      at::Tensor xo = xv[n].index_select(0, O);
      at::Tensor wo = wv.index_select(1, O).view({Cout, ko * Cbi, kh, kw});
      auto r = conv_backward(dyn, xo.view({1, ko * Cbi, H, W}), wo, geo, 1, true, false, false);
      gg[n].index_copy_(0, O, (std::get<0>(r).reshape({ko, -1}).to(acc) * xo.to(acc)).sum(1));
    }
  }
  std::lock_guard<std::mutex> lock(mu);
  if (need_w) gw.add_(lgw);
  }, /*parallel=*/false);
  return finish();
}

}  // namespace routed_conv
}  // namespace fastmod
