// CPU backend of fastmod::mixed_node_fwd / mixed_node_bwd (schemas and
// semantics in mixed_node.cpp).  This file validates the canonical 4-D inputs,
// plans how the work is split over threads, and dispatches to the kernels in
// mixed_node_cpu_kernels.h (built for the baseline ISA and, on x86-64, for
// AVX2+FMA, chosen at run time; FASTMOD_CPU_BASELINE=1 forces the baseline).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

namespace fastmod_mixed_node {

// Longest s-range a kernel handles at once (bounds the per-thread buffers).
constexpr int64_t kMaxSub = 1024;
// Shortest s-block worth a task of its own.
constexpr int64_t kMinSBlock = 64;
// Elements of work below which a task range is not split over threads.
constexpr int64_t kGrainElems = 32768;

struct Geometry {
  int64_t K, B, C, S;
  int64_t st1[4], st2[4];  // element strides of x1, x2; 0 on size-1 dims
  bool bc1[4], bc2[4];     // dims where x1, x2 are broadcast
};

struct FwdPlan {
  int64_t K, B, C, S;
  int64_t st1[4], st2[4];
  int64_t nsb, sblk;  // s split into nsb blocks of sblk (<= kMaxSub)
  bool normalize;
};

// Backward split.  A dim (K, B or S) is "owned" when no needed dx is broadcast
// over it: tasks then partition it.  K and B dims that are not owned are walked
// serially inside a task (SK x SB "serial" combos), so every dx element that
// sums over them is written by one task; when that leaves too few tasks the
// serial combos are cut into `nchunks` chunks and each chunk accumulates into
// its own replica of the broadcast dx (nrep > 1), summed at the end.
struct BwdPlan {
  enum Mode { DIRECT = 0, ACC_S = 1, ACC_SUM = 2 };
  int64_t K, B, C, S;
  int64_t st1[4], st2[4], stg[4];
  int64_t ost[2][4];  // strides of dx1/dx2 (contiguous in x's shape, 0 on size-1 dims)
  int mode[2];        // DIRECT: no broadcast, row written as is; ACC_S: += over s;
                      // ACC_SUM: x has no s, row summed over s then +=
  int64_t numel[2], nrep[2];
  int64_t PK, PB, SK, SB;       // owned and serial extents of K and B
  int64_t nsb, sblk, sub;       // s-blocks per task and sub-blocks inside one
  int64_t nchunks, chunk;       // serial combos split into chunks of `chunk`
  bool normalize;
};

// ---- the kernels, once per instruction set ---------------------------------
#define FM_NS generic
#define FM_TARGET
#define FM_INLINE inline __attribute__((always_inline))
#include "mixed_node_cpu_kernels.h"
#undef FM_NS
#undef FM_TARGET
#undef FM_INLINE

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FM_HAVE_AVX2 1
#define FM_NS avx2
#define FM_TARGET __attribute__((target("avx2,fma")))
#define FM_INLINE inline __attribute__((always_inline)) FM_TARGET
#include "mixed_node_cpu_kernels.h"
#undef FM_NS
#undef FM_TARGET
#undef FM_INLINE
#endif

namespace {

bool use_avx2() {
#ifdef FM_HAVE_AVX2
  static const bool yes = [] {
    const char* force = std::getenv("FASTMOD_CPU_BASELINE");
    if (force != nullptr && force[0] == '1') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
#else
  return false;
#endif
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_input(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, op, ": ", name, " must be 4-D [K|1, B|1, C|1, S|1], got ", x.dim(),
              "-D of shape ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", x.device());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
              ": ", name, " must be float16, bfloat16, float32 or float64, got ", t);
}

Geometry make_geometry(const char* op, const at::Tensor& x1, const at::Tensor& x2,
                       const at::Tensor& w) {
  check_input(op, "x1", x1);
  check_input(op, "x2", x2);
  TORCH_CHECK(x1.scalar_type() == x2.scalar_type(), op, ": x1 and x2 must have one dtype, got ",
              x1.scalar_type(), " and ", x2.scalar_type());
  const auto wtype = x1.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(w.dim() == 2 && w.size(1) == 6, op, ": w must be [K, 6], got shape ", w.sizes());
  TORCH_CHECK(w.scalar_type() == wtype, op, ": w must be ", wtype, " for ", x1.scalar_type(),
              " inputs, got ", w.scalar_type());
  TORCH_CHECK(w.device().is_cpu(), op, ": w must be a CPU tensor, got ", w.device());
  Geometry g;
  int64_t full[4];
  for (int d = 0; d < 4; ++d) {
    const int64_t a = x1.size(d), b = x2.size(d);
    TORCH_CHECK(a == b || a == 1 || b == 1, op, ": x1 of shape ", x1.sizes(), " and x2 of shape ",
                x2.sizes(), " are not broadcastable (dim ", d, ")");
    full[d] = a == 1 ? b : a;
  }
  TORCH_CHECK(full[0] == 1 || full[0] == w.size(0), op, ": w has ", w.size(0),
              " nodes but x1/x2 have ", full[0], " (dim 0)");
  full[0] = w.size(0);
  for (int d = 0; d < 4; ++d) {
    g.st1[d] = x1.size(d) == 1 ? 0 : x1.stride(d);
    g.st2[d] = x2.size(d) == 1 ? 0 : x2.stride(d);
    g.bc1[d] = x1.size(d) != full[d];
    g.bc2[d] = x2.size(d) != full[d];
  }
  g.K = full[0], g.B = full[1], g.C = full[2], g.S = full[3];
  return g;
}

int64_t grain_for(int64_t work_per_task) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, work_per_task));
}

// ---- forward ---------------------------------------------------------------
template <typename scalar_t, typename T>
using FwdFn = void (*)(const FwdPlan&, const scalar_t*, const scalar_t*, const T*, scalar_t*,
                       int64_t, int64_t, T*);

#define FM_FWD_TABLE(NS)                                                            \
  {                                                                                 \
    &NS::fwd_tasks<scalar_t, T, false, false>, &NS::fwd_tasks<scalar_t, T, false, true>, \
        &NS::fwd_tasks<scalar_t, T, true, false>, &NS::fwd_tasks<scalar_t, T, true, true> \
  }

template <typename scalar_t, typename T>
FwdFn<scalar_t, T> pick_fwd(bool a1, bool b1) {
  const int i = (a1 ? 2 : 0) + (b1 ? 1 : 0);
#ifdef FM_HAVE_AVX2
  static const FwdFn<scalar_t, T> fast[4] = FM_FWD_TABLE(avx2);
  if (use_avx2()) return fast[i];
#endif
  static const FwdFn<scalar_t, T> base[4] = FM_FWD_TABLE(generic);
  return base[i];
}

at::Tensor fwd_cpu(const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& w,
                   bool normalize) {
  const Geometry g = make_geometry("mixed_node_fwd", x1, x2, w);
  at::Tensor out = at::empty({g.K, g.B, g.C, g.S}, x1.options());
  if (out.numel() == 0) return out;
  const at::Tensor wc = w.contiguous();

  FwdPlan p;
  p.K = g.K, p.B = g.B, p.C = g.C, p.S = g.S, p.normalize = normalize;
  std::copy(g.st1, g.st1 + 4, p.st1);
  std::copy(g.st2, g.st2 + 4, p.st2);
  const int64_t rows = g.K * g.B, want = 4 * at::get_num_threads();
  int64_t nsb = rows >= want ? 1 : std::min(ceil_div(want, rows), ceil_div(g.S, kMinSBlock));
  nsb = std::max(nsb, ceil_div(g.S, kMaxSub));
  p.sblk = ceil_div(g.S, nsb);
  p.nsb = ceil_div(g.S, p.sblk);
  const int64_t ntasks = rows * p.nsb;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x1.scalar_type(), "mixed_node_fwd", [&] {
    using T = at::opmath_type<scalar_t>;
    const FwdFn<scalar_t, T> fn = pick_fwd<scalar_t, T>(p.st1[3] != 0, p.st2[3] != 0);
    const scalar_t* a = x1.const_data_ptr<scalar_t>();
    const scalar_t* b = x2.const_data_ptr<scalar_t>();
    const T* wp = wc.const_data_ptr<T>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, ntasks, grain_for(g.C * p.sblk), [&](int64_t t0, int64_t t1) {
      std::vector<T> scratch(5 * p.sblk);
      fn(p, a, b, wp, o, t0, t1, scratch.data());
    });
  });
  return out;
}

// ---- backward --------------------------------------------------------------
template <typename scalar_t, typename T>
using BwdFn = void (*)(const BwdPlan&, const scalar_t*, const scalar_t*, const scalar_t*,
                       const T*, scalar_t* const*, T* const*, T*, int64_t, int64_t, T*);

#define FM_BWD_TABLE(NS)                                                                     \
  {                                                                                          \
    &NS::bwd_tasks<scalar_t, T, false, false, false>,                                        \
        &NS::bwd_tasks<scalar_t, T, false, false, true>,                                     \
        &NS::bwd_tasks<scalar_t, T, false, true, false>,                                     \
        &NS::bwd_tasks<scalar_t, T, false, true, true>,                                      \
        &NS::bwd_tasks<scalar_t, T, true, false, false>,                                     \
        &NS::bwd_tasks<scalar_t, T, true, false, true>,                                      \
        &NS::bwd_tasks<scalar_t, T, true, true, false>, &NS::bwd_tasks<scalar_t, T, true, true, true> \
  }

template <typename scalar_t, typename T>
BwdFn<scalar_t, T> pick_bwd(bool a1, bool b1, bool norm) {
  const int i = (a1 ? 4 : 0) + (b1 ? 2 : 0) + (norm ? 1 : 0);
#ifdef FM_HAVE_AVX2
  static const BwdFn<scalar_t, T> fast[8] = FM_BWD_TABLE(avx2);
  if (use_avx2()) return fast[i];
#endif
  static const BwdFn<scalar_t, T> base[8] = FM_BWD_TABLE(generic);
  return base[i];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cpu(const at::Tensor& grad,
                                                       const at::Tensor& x1,
                                                       const at::Tensor& x2,
                                                       const at::Tensor& w, bool normalize,
                                                       bool need_dx1, bool need_dx2) {
  const char* op = "mixed_node_bwd";
  const Geometry g = make_geometry(op, x1, x2, w);
  check_input(op, "grad", grad);
  TORCH_CHECK(grad.scalar_type() == x1.scalar_type(), op, ": grad must be ", x1.scalar_type(),
              ", got ", grad.scalar_type());
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({g.K, g.B, g.C, g.S}), op,
              ": grad must have the output's shape [", g.K, ", ", g.B, ", ", g.C, ", ", g.S,
              "], got ", grad.sizes());
  const at::Tensor* xs[2] = {&x1, &x2};
  const bool need[2] = {need_dx1, need_dx2};
  const bool* bcs[2] = {g.bc1, g.bc2};
  at::Tensor dx[2];
  for (int o = 0; o < 2; ++o)
    dx[o] = need[o] ? at::empty(xs[o]->sizes(), xs[o]->options()) : at::empty({0}, xs[o]->options());
  at::Tensor dw = at::zeros({g.K, 6}, w.options());
  const int64_t total = g.K * g.B * g.C * g.S;
  if (total == 0) {
    for (int o = 0; o < 2; ++o)
      if (need[o]) dx[o].zero_();
    return {dx[0], dx[1], dw};
  }
  const at::Tensor wc = w.contiguous();

  BwdPlan p;
  p.K = g.K, p.B = g.B, p.C = g.C, p.S = g.S, p.normalize = normalize;
  std::copy(g.st1, g.st1 + 4, p.st1);
  std::copy(g.st2, g.st2 + 4, p.st2);
  for (int d = 0; d < 4; ++d) p.stg[d] = grad.size(d) == 1 ? 0 : grad.stride(d);
  bool own[4];
  for (int d = 0; d < 4; ++d) own[d] = !((need[0] && g.bc1[d]) || (need[1] && g.bc2[d]));
  for (int o = 0; o < 2; ++o) {
    const bool* bc = bcs[o];
    const auto cs = dx[o].numel() ? dx[o].strides() : at::IntArrayRef();
    for (int d = 0; d < 4; ++d) p.ost[o][d] = (!need[o] || xs[o]->size(d) == 1) ? 0 : cs[d];
    p.mode[o] = !(bc[0] || bc[1] || bc[2] || bc[3]) ? BwdPlan::DIRECT
                : bc[3]                             ? BwdPlan::ACC_SUM
                                                    : BwdPlan::ACC_S;
    p.numel[o] = xs[o]->numel();
  }
  p.PK = own[0] ? g.K : 1, p.SK = own[0] ? 1 : g.K;
  p.PB = own[1] ? g.B : 1, p.SB = own[1] ? 1 : g.B;
  const int64_t want = 4 * at::get_num_threads(), base = p.PK * p.PB;
  int64_t nsb = 1;
  if (own[3]) {
    nsb = base >= want ? 1 : std::min(ceil_div(want, base), ceil_div(g.S, kMinSBlock));
    nsb = std::max(nsb, ceil_div(g.S, kMaxSub));
  }
  p.sblk = ceil_div(g.S, nsb);
  p.nsb = ceil_div(g.S, p.sblk);
  p.sub = std::min(p.sblk, kMaxSub);
  // Chunk the serial combos when the owned dims leave threads idle, as far as
  // the replicas of the broadcast dx (one per chunk) stay small.
  const int64_t nserial = p.SK * p.SB;
  int64_t repl = 0;
  for (int o = 0; o < 2; ++o)
    if (need[o] && (bcs[o][0] || bcs[o][1])) repl += p.numel[o];
  int64_t nchunks = 1;
  if (base * p.nsb < want && nserial > 1) {
    nchunks = std::min(nserial, ceil_div(want, base * p.nsb));
    const int64_t budget = std::max<int64_t>(total / 2, 1 << 16);
    nchunks = std::max<int64_t>(1, std::min(nchunks, budget / std::max<int64_t>(repl, 1)));
  }
  p.chunk = ceil_div(nserial, nchunks);
  p.nchunks = ceil_div(nserial, p.chunk);
  const int64_t ntasks = base * p.nsb * p.nchunks;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x1.scalar_type(), "mixed_node_bwd", [&] {
    using T = at::opmath_type<scalar_t>;
    constexpr bool same = std::is_same<scalar_t, T>::value;
    // Where each dx goes: DIRECT rows straight into dx; accumulated ones into dx
    // itself when it has the accumulation type and one replica, else into a
    // zeroed T buffer of nrep replicas summed into dx at the end.
    at::Tensor accbuf[2];
    scalar_t* dxp[2] = {nullptr, nullptr};
    T* accp[2] = {nullptr, nullptr};
    for (int o = 0; o < 2; ++o) {
      p.nrep[o] = (bcs[o][0] || bcs[o][1]) ? p.nchunks : 1;
      if (!need[o]) continue;
      dxp[o] = dx[o].mutable_data_ptr<scalar_t>();
      if (p.mode[o] == BwdPlan::DIRECT) continue;
      if (same && p.nrep[o] == 1) {
        dx[o].zero_();
        accp[o] = reinterpret_cast<T*>(dxp[o]);
      } else {
        accbuf[o] = at::zeros({p.nrep[o] * p.numel[o]}, wc.options());
        accp[o] = accbuf[o].mutable_data_ptr<T>();
      }
    }
    at::Tensor dwpart = at::zeros({ntasks * p.SK * 6}, wc.options());
    T* dwp = dwpart.mutable_data_ptr<T>();
    const BwdFn<scalar_t, T> fn = pick_bwd<scalar_t, T>(p.st1[3] != 0, p.st2[3] != 0, normalize);
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* a = x1.const_data_ptr<scalar_t>();
    const scalar_t* b = x2.const_data_ptr<scalar_t>();
    const T* wp = wc.const_data_ptr<T>();
    const int64_t work = g.C * p.sblk * p.chunk;
    at::parallel_for(0, ntasks, grain_for(work), [&](int64_t t0, int64_t t1) {
      std::vector<T> scratch(9 * p.sub);
      fn(p, gp, a, b, wp, dxp, accp, dwp, t0, t1, scratch.data());
    });

    // dw[k] = sum of the task partials, in task order (deterministic).
    T* dwo = dw.mutable_data_ptr<T>();
    for (int64_t t = 0; t < ntasks; ++t) {
      const int64_t pk = t / (p.nchunks * p.nsb * p.PB);
      for (int64_t kk = 0; kk < p.SK; ++kk) {
        T* dst = dwo + 6 * (p.SK > 1 ? kk : pk);
        for (int i = 0; i < 6; ++i) dst[i] += dwp[(t * p.SK + kk) * 6 + i];
      }
    }
    for (int o = 0; o < 2; ++o) {
      if (!accbuf[o].defined()) continue;
      const T* src = accp[o];
      scalar_t* dst = dxp[o];
      const int64_t m = p.numel[o], nr = p.nrep[o];
      at::parallel_for(0, m, kGrainElems, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          T v = src[i];
          for (int64_t r = 1; r < nr; ++r) v += src[r * m + i];
          dst[i] = static_cast<scalar_t>(v);
        }
      });
    }
  });
  return {dx[0], dx[1], dw};
}

}  // namespace
}  // namespace fastmod_mixed_node

TORCH_LIBRARY_IMPL(fastmod, CPU, m) {
  m.impl("mixed_node_fwd", &fastmod_mixed_node::fwd_cpu);
  m.impl("mixed_node_bwd", &fastmod_mixed_node::bwd_cpu);
}
