// The CPU fp32 forward and backward on the direct kernels: builds the per-call jobs
// from the gates (which rows of which sample, which reduction channels, what scale)
// and runs them with at::parallel_for.  The kernels are in routed_conv_cpu_direct*.
#include "routed_conv/routed_conv.h"
#include "routed_conv/routed_conv_cpu_direct.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>  // SSE2 streaming stores: part of every x86-64 CPU
#define FM_STREAM_STORES 1
#endif

namespace fastmod {
namespace routed_conv {

namespace {

// One call's geometry on the direct kernels: the plan, pixels per channel of x
// (L_in) and of the output (Lo), and at stride > 1 the phases (direct::Phases).  Jobs
// always point at x itself; at stride > 1 each job reads a phase copy of its
// channels made by the thread that runs it (phase_copy below).
struct Geometry {
  direct::Phases ph;
  direct::PixelPlan plan;
  int64_t L_in = 0, Lo = 0;
  bool strided = false;

  Geometry(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
           at::IntArrayRef dilation)
      : ph(direct::make_phases(x.size(2), x.size(3), w.size(2), w.size(3), stride[0], stride[1], padding[0],
                               padding[1], dilation[0], dilation[1])),
        plan(direct::make_plan(ph)), L_in(x.size(2) * x.size(3)), Lo(ph.Lo()), strided(ph.count() > 1) {}
};

// The phase copy of channels [0, c_hi) of the x at `src` (those for which want(c)),
// in a buffer per thread, kept for the thread's next job when that reads the same
// channels (a "group" block's rows past kRows; an "out" sample's jobs).  Copied per
// job rather than for the whole call up front: a whole copy of x is a fresh
// allocation (page faults) and a round trip through memory; a job's channels stay
// in cache for the kernel (BRN's stride-2 3x3, 4 x 256 x 56 x 56, rho 0.57: 1.57 ms
// forward with a whole copy, 0.90 ms per job, 0.60 ms with the SSE stride-2 copy;
// the same work at stride 1, 4 x 256 x 28 x 28, 0.42-0.46 ms).
struct PhaseCopy {
  const float* src = nullptr;
  uint64_t plan = 0, tag = 0;
  int64_t c_hi = 0;
  const void* key = nullptr;
  std::vector<float> buf;
};

template <class Want>
const PhaseCopy& phase_copy(const Geometry& geo, const float* src, int64_t c_hi, const void* key, Want want) {
  static std::atomic<uint64_t> next_tag{1};
  thread_local PhaseCopy pc;
  if (pc.src == src && pc.plan == geo.plan.id && pc.c_hi == c_hi && pc.key == key) return pc;
  pc.src = src;
  pc.plan = geo.plan.id;
  pc.c_hi = c_hi;
  pc.key = key;
  pc.tag = next_tag.fetch_add(1, std::memory_order_relaxed);
  pc.buf.resize((size_t)(c_hi * geo.plan.XL));
  for (int64_t c = 0; c < c_hi; ++c)
    if (want(c)) direct::pack_phases(src + c * geo.L_in, geo.ph, pc.buf.data() + c * geo.plan.XL);
  return pc;
}

// The jobs of one call.  Each job covers up to direct::kRows output rows of one
// sample; its pointers index the flat arrays below.
struct Jobs {
  int64_t w_cstride = 0;  // see direct::RowJob
  bool w_flip = false;
  std::vector<const float*> x, w_row;
  std::vector<float*> out_row;
  std::vector<float> row_scale, bias;
  std::vector<direct::Segment> segs;
  struct Job {
    int64_t x_idx, row0, seg0;
    int nrows, nseg;
    bool scaled, biased;
  };
  std::vector<Job> list;

  void row(const float* w, float* out, float scale, float b) {
    w_row.push_back(w);
    out_row.push_back(out);
    row_scale.push_back(scale);
    bias.push_back(b);
  }
  int64_t rows() const { return (int64_t)w_row.size(); }

  void seg(int64_t seg0, int64_t c0, int64_t c1, float scale) {
    direct::add_segment(segs, (size_t)seg0, c0, c1, scale);
  }

  // Rows [r0, r1) of the flat row arrays become jobs of at most kRows rows.
  void add(const float* xp, int64_t r0, int64_t r1, int64_t seg0, int nseg, bool scaled, bool biased) {
    x.push_back(xp);
    for (int64_t r = r0; r < r1; r += direct::kRows) {
      const int n = (int)std::min<int64_t>(direct::kRows, r1 - r);
      list.push_back({(int64_t)x.size() - 1, r, seg0, n, nseg, scaled, biased});
    }
  }

  direct::RowJob row_job(const Job& jb) const {
    return {x[jb.x_idx], w_row.data() + jb.row0, w_cstride, w_flip, out_row.data() + jb.row0,
            jb.scaled ? row_scale.data() + jb.row0 : nullptr, jb.biased ? bias.data() + jb.row0 : nullptr,
            jb.nrows, segs.data() + jb.seg0, jb.nseg};
  }

  // Forward-shaped jobs (x read through geo's plan; at stride > 1 a phase copy).
  void run(const Geometry& geo) const {
    at::parallel_for(0, (int64_t)list.size(), 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        direct::RowJob rj = row_job(list[j]);
        if (geo.strided) {
          int64_t c_hi = 0;
          for (int s = 0; s < rj.nseg; ++s) c_hi = std::max(c_hi, rj.segs[s].c1);
          const direct::Segment* sg = rj.segs;
          const int ns = rj.nseg;
          const PhaseCopy& pc = phase_copy(geo, rj.x, c_hi, sg, [&](int64_t c) {
            for (int s = 0; s < ns; ++s)
              if (c >= sg[s].c0 && c < sg[s].c1) return true;
            return false;
          });
          rj.x = pc.buf.data();
          rj.x_tag = pc.tag;
        }
        direct::run_rows(rj, geo.plan);
      }
    });
  }

  // Stride-1 grad_x-shaped jobs: x is grad_out, read as it is.
  void run(const direct::PixelPlan& plan) const {
    at::parallel_for(0, (int64_t)list.size(), 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) direct::run_rows(row_job(list[j]), plan);
    });
  }

  // Strided grad_x-shaped jobs, built with the weights of phase 0 (taps order[0 ...]
  // of a phase-sorted weight) and the final output rows: each job runs every phase
  // (its weights moved to that phase's taps) into a per-thread [rows][phases][Lo]
  // buffer, then scatters it into its output rows.
  void run_phased(const Geometry& geo, const std::vector<direct::PixelPlan>& plans) const {
    const direct::Phases& ph = geo.ph;
    const int64_t Lo = geo.Lo, XL = geo.plan.XL;
    at::parallel_for(0, (int64_t)list.size(), 1, [&](int64_t j0, int64_t j1) {
      thread_local std::vector<float> buf;
      buf.resize((size_t)(direct::kRows * XL));
      const float* wr[direct::kRows];
      float* orow[direct::kRows];
      for (int64_t j = j0; j < j1; ++j) {
        direct::RowJob rj = row_job(list[j]);
        float* const* final_rows = rj.out_row;
        for (int64_t q = 0; q < ph.count(); ++q) {
          const int shift = ph.phase_begin[q] - ph.phase_begin[0];
          for (int i = 0; i < rj.nrows; ++i) {
            wr[i] = rj.w_row[i] + shift;
            orow[i] = buf.data() + i * XL + q * Lo;
          }
          if (plans[q].KK == 0) {  // no tap reads this phase of x: its gradient is zero
            for (int i = 0; i < rj.nrows; ++i) std::memset(orow[i], 0, sizeof(float) * Lo);
            continue;
          }
          direct::RowJob pj = rj;
          pj.w_row = wr;
          pj.out_row = orow;
          direct::run_rows(pj, plans[q]);
        }
        for (int i = 0; i < rj.nrows; ++i) direct::unpack_phases(buf.data() + i * XL, ph, final_rows[i]);
      }
    });
  }
};

// "Small" images (output pixels), where per-sample fixed costs are not amortised:
// a 1x1 conv's weight gradient runs with its lanes over channels (wgrad_1x1_lanes;
// at 28x28 and up its per-sample transposes cost more than the pixel-vector kernel
// loses), a "group" conv's over its rows (wgrad_group_lanes, see below), other
// convs' sum a gate block's samples in registers (direct::run_wgrad
// with several jobs; a 7x7 image is 4 vectors of pixels per reduction across lanes,
// a 16x16 one 16), and an "in" conv with every gate on takes the dense backward.
constexpr int64_t kSmallImagePixels = 256;
// A "group" conv's weight gradient on small images runs with its lanes over the
// block's output rows when there are at least this many (paired, N = 8, 3x3, 7x7 to
// 16x16: 0.54-0.91x the pixel-vector kernel's time with 16 or 32 rows, 1.07-1.47x
// with 8, whose vector is half empty on AVX-512).
constexpr int64_t kGroupLanesMinRows = 16;
// Output rows per weight-gradient bucket of an "in" conv.
constexpr int64_t kInRowsPerBucket = 16;

// Weight-gradient jobs in buckets: jobs of one bucket touch dw entries no other
// bucket touches, so buckets run in parallel and each bucket's jobs in order.
// Consecutive jobs of one group (the same dw rows and channels, one sample each) run
// as one direct::run_wgrad call that sums the samples before reducing.
struct WgradJobs {
  std::vector<const float*> x, dy_row;
  std::vector<float*> dw_row;
  std::vector<float> scale;
  std::vector<int64_t> chans;  // channel lists (direct::WgradJob::chan), by offset
  struct Job {
    int64_t x_idx, row0, c0, c1;
    int nrows;
    int64_t chan0;  // offset of the job's channel list in chans, or -1 (channels c0 ... c1)
    int64_t group;  // -1: alone
  };
  std::vector<std::vector<Job>> buckets;
  int64_t groups = 0;

  // Rows [r0, r1) of the flat arrays, channels [c0, c1) (or chans[chan0 + c0 ...
  // chan0 + c1) when chan0 >= 0), into the last bucket; in group `group` (from
  // new_group()) or alone.
  void add(const float* xp, int64_t r0, int64_t r1, int64_t c0, int64_t c1, int64_t chan0 = -1,
           int64_t group = -1) {
    x.push_back(xp);
    buckets.back().push_back({(int64_t)x.size() - 1, r0, c0, c1, (int)(r1 - r0), chan0, group});
  }
  int64_t new_group() { return groups++; }

  // One job per sample n whose gate block b is on (gate gv), into the last bucket:
  // add_rows(n, gv) adds its rows, and it reads x_of(n) over channels [c0, c1).
  // grouped: those jobs form one group.
  template <class AddRows, class XOf>
  void block_jobs(const float* gp, int64_t N, int64_t G, int64_t b, bool grouped, int64_t c0, int64_t c1,
                  AddRows add_rows, XOf x_of) {
    const int64_t grp = grouped ? new_group() : -1;
    for (int64_t n = 0; n < N; ++n) {
      const float gv = gp[n * G + b];
      if (gv == 0.0f) continue;
      const int64_t r0 = rows();
      add_rows(n, gv);
      add(x_of(n), r0, rows(), c0, c1, -1, grp);
    }
  }
  void row(const float* dy, float* dw, float s) {
    dy_row.push_back(dy);
    dw_row.push_back(dw);
    scale.push_back(s);
  }
  int64_t rows() const { return (int64_t)dy_row.size(); }

  direct::WgradJob wgrad_job(const Job& jb, bool scaled) const {
    return {x[jb.x_idx], dy_row.data() + jb.row0, dw_row.data() + jb.row0, scaled ? scale.data() + jb.row0 : nullptr,
            jb.nrows, jb.c0, jb.c1, jb.chan0 >= 0 ? chans.data() + jb.chan0 : nullptr};
  }

  // At stride > 1 each job reads a phase copy of its channels (for "in" convs, whose
  // buckets are row ranges, a sample's channels are copied once per bucket); a
  // group's jobs each their own copy.
  void run(const Geometry& geo, bool scaled) const {
    at::parallel_for(0, (int64_t)buckets.size(), 1, [&](int64_t b0, int64_t b1) {
      std::vector<direct::WgradJob> batch;
      thread_local std::vector<std::vector<float>> copies;
      for (int64_t b = b0; b < b1; ++b) {
        const std::vector<Job>& list = buckets[b];
        for (size_t i = 0; i < list.size();) {
          size_t e = i + 1;
          while (list[i].group >= 0 && e < list.size() && list[e].group == list[i].group) ++e;
          batch.clear();
          for (size_t k = i; k < e; ++k) batch.push_back(wgrad_job(list[k], scaled));
          if (geo.strided) {
            if (copies.size() < batch.size()) copies.resize(batch.size());
            for (size_t k = 0; k < batch.size(); ++k) batch[k].x = strided_copy(geo, batch[k], copies[k]);
          }
          direct::run_wgrad(batch.data(), (int)batch.size(), geo.plan);
          i = e;
        }
      }
    });
  }

  // The phase copy of the channels job reads, in buf (only those channels are filled).
  static const float* strided_copy(const Geometry& geo, const direct::WgradJob& wj, std::vector<float>& buf) {
    int64_t c_hi = 0;
    for (int64_t k = wj.c0; k < wj.c1; ++k) c_hi = std::max(c_hi, wj.channel(k) + 1);
    buf.resize((size_t)(c_hi * geo.plan.XL));
    for (int64_t k = wj.c0; k < wj.c1; ++k) {
      const int64_t c = wj.channel(k);
      direct::pack_phases(wj.x + c * geo.L_in, geo.ph, buf.data() + c * geo.plan.XL);
    }
    return buf.data();
  }
};

// grad_weight of a "out" conv by the channels-last kernel: one bucket per chunk of
// kChunk input channels (it owns those columns of gw), each sample's active rows.
void wgrad_out_cl(const float* xp, const float* dyp, const float* gp, int64_t N, int64_t Cin,
                  int64_t Cout, int64_t G, int64_t L, int64_t kh, int64_t kw,
                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t H, int64_t W,
                  bool binary, float* gwp) {
  constexpr int64_t C = direct::kChunk;
  const int64_t KK = kh * kw, Cbo = Cout / G;
  std::vector<std::vector<int64_t>> rows(N);
  std::vector<std::vector<float>> scales(N);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t b = 0; b < G; ++b)
      if (gp[n * G + b] != 0.0f)
        for (int64_t r = b * Cbo; r < (b + 1) * Cbo; ++r) {
          rows[n].push_back(r);
          scales[n].push_back(gp[n * G + b]);
        }
  const direct::ClPlan cp = direct::make_cl_plan(H, W, kh, kw, padding[0], padding[1],
                                                 dilation[0], dilation[1]);
  // Buckets: (chunk of C input channels) x (range of output rows), each owning its
  // part of gw; rows are split only when there are fewer chunks than threads.
  const int64_t chunks = Cin / C;
  const int64_t parts = std::min<int64_t>(
      std::max<int64_t>(1, (2 * at::get_num_threads() + chunks - 1) / chunks), std::max<int64_t>(1, Cout / 8));
  at::parallel_for(0, chunks * parts, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> xpk(cp.Hp * cp.Wp * C, 0.0f), buf;
    std::vector<const float*> dy;
    std::vector<float*> acc;
    std::vector<char> touched;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t k = i / parts, part = i % parts;
      const int64_t ra = Cout * part / parts, rb = Cout * (part + 1) / parts;
      buf.assign((rb - ra) * KK * C, 0.0f);
      touched.assign(rb - ra, 0);
      for (int64_t n = 0; n < N; ++n) {
        dy.clear();
        acc.clear();
        std::vector<float> sc;
        for (size_t j = 0; j < rows[n].size(); ++j) {
          const int64_t r = rows[n][j];
          if (r < ra || r >= rb) continue;
          dy.push_back(dyp + (n * Cout + r) * L);
          acc.push_back(buf.data() + (r - ra) * KK * C);
          sc.push_back(scales[n][j]);
          touched[r - ra] = 1;
        }
        if (dy.empty()) continue;
        direct::pack_cl(xp + (n * Cin + k * C) * L, cp, xpk.data());
        direct::run_wgrad_cl({xpk.data(), dy.data(), acc.data(), binary ? nullptr : sc.data(),
                              (int)dy.size()}, cp);
      }
      for (int64_t r = ra; r < rb; ++r)
        if (touched[r - ra])
          for (int64_t j = 0; j < C; ++j)
            for (int64_t t = 0; t < KK; ++t)
              gwp[(r * Cin + k * C + j) * KK + t] += buf[((r - ra) * KK + t) * C + j];
    }
  });
}

// grad_weight of a 1x1 stride-1 "in" or "out" conv on small images by the
// lanes-over-columns kernel (direct::run_wgrad_1x1_lanes).  Its rows are the gated
// side's active channels of each sample (x channels for "in", dy rows for "out"),
// its columns the other side's channels, transposed pixel-major per sample.  The
// result T[gated][dense] is gw itself for "out" and gw transposed for "in".  Each
// thread owns a range of columns of T, so samples add into it without races.
void wgrad_1x1_lanes(const float* xp, const float* dyp, const float* gp, int64_t N, int64_t Cin,
                     int64_t Cout, int64_t G, int64_t L, bool in, bool binary, float* gwp) {
  const int64_t S = in ? Cin : Cout, D = in ? Cout : Cin;  // gated side rows, dense side columns
  const int64_t Sb = S / G;
  at::Tensor tbuf;  // "in": T = gw^T, transposed into gw at the end
  float* tp = gwp;
  if (in) {
    tbuf = at::zeros({S, D}, at::kFloat);
    tp = tbuf.data_ptr<float>();
  }
  // Column ranges in whole 64-column tiles, about two per thread.
  constexpr int64_t kTile = 64;
  const int64_t tiles = (D + kTile - 1) / kTile;
  const int64_t parts = std::min<int64_t>(tiles, 2 * at::get_num_threads());
  at::parallel_for(0, parts, 1, [&](int64_t q0, int64_t q1) {
    const int64_t d0 = std::min(D, tiles * q0 / parts * kTile), d1 = std::min(D, tiles * q1 / parts * kTile);
    if (d1 <= d0) return;
    std::vector<float> bt((size_t)(L * (d1 - d0)));
    std::vector<const float*> a;
    std::vector<float*> t;
    std::vector<float> sc;
    for (int64_t n = 0; n < N; ++n) {
      a.clear();
      t.clear();
      sc.clear();
      for (int64_t b = 0; b < G; ++b) {
        const float gv = gp[n * G + b];
        if (gv == 0.0f) continue;
        for (int64_t s = b * Sb; s < (b + 1) * Sb; ++s) {
          a.push_back(in ? xp + (n * Cin + s) * L : dyp + (n * Cout + s) * L);
          t.push_back(tp + s * D + d0);
          sc.push_back(gv);
        }
      }
      if (a.empty()) continue;
      const float* dense = in ? dyp + n * Cout * L : xp + n * Cin * L;
      direct::transpose(dense + d0 * L, L, d1 - d0, L, bt.data(), d1 - d0);
      direct::run_wgrad_1x1_lanes({a.data(), t.data(), binary ? nullptr : sc.data(), (int)a.size(), bt.data(),
                                   d1 - d0, d1 - d0, L});
    }
  });
  if (in)  // gw[r][c] = T[c][r], by ranges of r
    at::parallel_for(0, Cout, 64, [&](int64_t r0, int64_t r1) {
      direct::transpose(tp + r0, Cout, Cin, r1 - r0, gwp + r0 * Cin, Cin);
    });
}

// grad_weight of a stride-1 "group" conv on small images by the lanes-over-rows
// kernel (direct::run_wgrad_taps_lanes): per gate block, the samples where it is on,
// each as dy's block rows transposed (times the gate) and a zero-bordered copy of the
// block's x channels.  T[c * KK + t][r] is transposed into the block's rows of gw.
void wgrad_group_lanes(const Geometry& geo, const float* xp, const float* dyp, const float* gp, int64_t N,
                       int64_t Cin, int64_t Cout, int64_t G, at::IntArrayRef padding, bool binary, float* gwp) {
  const direct::Phases& ph = geo.ph;
  const int64_t H = ph.H, W = ph.W, L = geo.Lo, KK = ph.KK;
  const int64_t Hp = H + 2 * padding[0], Wp = W + 2 * padding[1], Lp = Hp * Wp;
  const int64_t Cbi = Cin / G, Cbo = Cout / G, nk = Cbi * KK;
  std::vector<int64_t> koff((size_t)nk);
  for (int64_t c = 0; c < Cbi; ++c)
    for (int64_t t = 0; t < KK; ++t)
      koff[c * KK + t] = c * Lp + (ph.di[t] + padding[0]) * Wp + ph.dj[t] + padding[1];
  at::parallel_for(0, G, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> xbuf, dybuf, tbuf((size_t)(nk * Cbo));
    std::vector<const float*> xs, bts;
    for (int64_t b = b0; b < b1; ++b) {
      int64_t ns = 0;
      for (int64_t n = 0; n < N; ++n) ns += gp[n * G + b] != 0.0f;
      if (ns == 0) continue;
      xbuf.assign((size_t)(ns * Cbi * Lp), 0.0f);  // the borders stay zero
      dybuf.resize((size_t)(ns * L * Cbo));
      xs.clear();
      bts.clear();
      for (int64_t n = 0; n < N; ++n) {
        const float gv = gp[n * G + b];
        if (gv == 0.0f) continue;
        float* xd = xbuf.data() + (int64_t)xs.size() * Cbi * Lp;
        const float* xsrc = xp + (n * Cin + b * Cbi) * geo.L_in;
        for (int64_t c = 0; c < Cbi; ++c)
          for (int64_t y = 0; y < H; ++y)
            std::memcpy(xd + c * Lp + (y + padding[0]) * Wp + padding[1], xsrc + (c * H + y) * W, W * sizeof(float));
        float* dd = dybuf.data() + (int64_t)bts.size() * L * Cbo;
        direct::transpose(dyp + (n * Cout + b * Cbo) * L, L, Cbo, L, dd, Cbo);
        if (!binary)
          for (int64_t i = 0; i < L * Cbo; ++i) dd[i] *= gv;
        xs.push_back(xd);
        bts.push_back(dd);
      }
      std::fill(tbuf.begin(), tbuf.end(), 0.0f);
      direct::run_wgrad_taps_lanes({xs.data(), bts.data(), (int)ns, koff.data(), (int)nk, tbuf.data(), Cbo, Cbo,
                                    Cbo, H, W, Wp});
      direct::transpose(tbuf.data(), Cbo, nk, Cbo, gwp + b * Cbo * nk, nk);
    }
  });
}

// n zero floats at p, with streaming stores where 16-byte aligned.
void zero_stream(float* p, int64_t n) {
#ifdef FM_STREAM_STORES
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(p + i) & 15u); ++i) p[i] = 0.0f;
  const __m128 z = _mm_setzero_ps();
  for (; i + 4 <= n; i += 4) _mm_stream_ps(p + i, z);
  for (; i < n; ++i) p[i] = 0.0f;
#else
  std::memset(p, 0, sizeof(float) * n);
#endif
}

// Zeroes blocks b (contiguous runs of `len` floats at base + b * len).  ATen's
// index_fill_ took 10x a memset of the same bytes here.  Above 1 MiB in all the
// stores bypass the caches: the zeros are not read back soon (routed consumers
// skip off blocks) and a cached store first reads each line in.  Paired A/B in
// one process, 25 shuffled rounds, N = 8: 0.88-0.99x the memset version's time
// at rho = 0.1 and 0.95-1.0x at 0.57 over five BRN/FRN cases, fwd and train.
void zero_blocks(float* base, const std::vector<int64_t>& blocks, int64_t len) {
  const bool stream = (int64_t)blocks.size() * len * (int64_t)sizeof(float) > (1 << 20);
  at::parallel_for(0, (int64_t)blocks.size(), std::max<int64_t>(1, 65536 / std::max<int64_t>(len, 1)),
                   [&](int64_t b0, int64_t b1) {
                     for (int64_t b = b0; b < b1; ++b) {
                       if (stream) zero_stream(base + blocks[b] * len, len);
                       else std::memset(base + blocks[b] * len, 0, sizeof(float) * len);
                     }
#ifdef FM_STREAM_STORES
                     if (stream) _mm_sfence();  // order the streaming stores before the join
#endif
                   });
}

// Whether the direct kernels handle this call (same rule for forward and backward).
bool direct_applies(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                    at::IntArrayRef padding, at::IntArrayRef dilation) {
  return x.is_cpu() && x.scalar_type() == at::kFloat && direct::available() &&
         direct::same_size(x.size(2), x.size(3), w.size(2), w.size(3), stride[0], stride[1],
                           padding[0], padding[1], dilation[0], dilation[1]);
}



// grad_x-shaped work: a "same" correlation of grad_out with the channel-transposed
// weight W'[groups * Cw rows, (Cout / groups) * KK].  add_rows(jobs, wt_row) adds
// the rows; wt_row(ci) gives input channel ci's weights.
//   Stride 1: the weight read flipped in place (taps backwards), one pass.
//   Strided: a phase-sorted copy of the weight, one pass per phase (Jobs::run_phased).
template <class AddRows>
void transposed(const Geometry& geo, const float* wp, int64_t Cout, int64_t Cw, int64_t groups,
                AddRows add_rows) {
  const int64_t KK = geo.ph.KK, Co_g = Cout / groups;
  // Row ci (input channel ci_l of group g) reads W[g*Co_g + r][ci_l][tap] for the
  // reduction channel r: base below, stride Cw*KK per r.
  auto base = [&](int64_t ci) {
    const int64_t g = ci / Cw;
    return (g * Co_g * Cw + (ci - g * Cw)) * KK;
  };
  Jobs jobs;
  jobs.w_cstride = Cw * KK;
  if (!geo.strided) {
    jobs.w_flip = true;
    add_rows(jobs, [&](int64_t ci) { return wp + base(ci) + (KK - 1); });
    jobs.run(geo.plan);
    return;
  }
  const direct::Phases& ph = geo.ph;
  std::vector<float> wperm((size_t)(Cout * Cw * KK));
  for (int64_t r = 0; r < Cout * Cw; ++r)
    for (int k = 0; k < KK; ++k) wperm[r * KK + k] = wp[r * KK + ph.order[k]];
  std::vector<direct::PixelPlan> plans;
  for (int q = 0; q < ph.count(); ++q) plans.push_back(direct::make_transposed_plan(ph, q));
  add_rows(jobs, [&](int64_t ci) { return (const float*)wperm.data() + base(ci) + ph.phase_begin[0]; });
  jobs.run_phased(geo, plans);
}

}  // namespace

at::Tensor forward_direct(const at::Tensor& x, const at::Tensor& w, const at::Tensor& gates,
                          const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                          Mode mode) {
  if (!direct_applies(x, w, stride, padding, dilation)) return at::Tensor();
  const int64_t N = x.size(0), Cin = x.size(1);
  const int64_t Cout = w.size(0), kh = w.size(2), kw = w.size(3), G = gates.size(1);
  const at::Tensor g = gates.detach().to(at::kCPU, at::kFloat).contiguous();
  const float* gp = g.data_ptr<float>();
  // With every gate on, "out" convs (FRN 3x3) run faster as one dense oneDNN conv;
  // "group" and "in" ones do not (benchmarks/results/routed_conv_cpu.md, Run 4 notes).
  if (mode == Mode::Out && std::find(gp, gp + N * G, 0.0f) == gp + N * G) return at::Tensor();
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const Geometry geo(xc, wc, stride, padding, dilation);
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  const float* bp = (bias.has_value() && bias->defined()) ? bias->data_ptr<float>() : nullptr;
  const int64_t Lx = geo.L_in, L = geo.Lo, KK = kh * kw;  // per channel: x, output
  at::Tensor out = at::empty({N, Cout, geo.ph.Ho, geo.ph.Wo}, x.options());
  float* op = out.data_ptr<float>();
  Jobs jobs;
  jobs.w_cstride = KK;
  std::vector<int64_t> off_blocks;  // n * G + g of the blocks to zero ("group"/"out")

  if (mode == Mode::Group || mode == Mode::Out) {
    // Rows of an active block read all their reduction channels; the gate scales the
    // result (bias included), so one segment of scale 1 per job.
    const int64_t Cbo = Cout / G, Cw = w.size(1);  // Cw: reduction channels per row
    const int64_t Cbi = mode == Mode::Group ? Cin / G : 0;
    jobs.segs.push_back({0, Cw, 1.0f});
    bool binary = true;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t sample_r0 = jobs.rows();
      for (int64_t b = 0; b < G; ++b) {
        const float gv = gp[n * G + b];
        if (gv == 0.0f) { off_blocks.push_back(n * G + b); continue; }
        if (gv != 1.0f) binary = false;
        const int64_t r0 = jobs.rows();
        for (int64_t c = b * Cbo; c < (b + 1) * Cbo; ++c)
          jobs.row(wp + c * Cw * KK, op + (n * Cout + c) * L, gv, bp ? bp[c] : 0.0f);
        // "group": each active block is one job over its own input channels.
        if (mode == Mode::Group)
          jobs.add(xp + (n * Cin + b * Cbi) * Lx, r0, jobs.rows(), 0, 1, true, bp != nullptr);
      }
      // "out": the sample's active rows, whatever their blocks, fill whole kRows jobs.
      if (mode == Mode::Out && jobs.rows() > sample_r0)
        jobs.add(xp + n * Cin * Lx, sample_r0, jobs.rows(), 0, 1, true, bp != nullptr);
    }
    if (binary)
      for (auto& jb : jobs.list) jb.scaled = false;
  } else {  // In: every output row, reduction over the active input blocks, gate per segment
    const int64_t Cbi = Cin / G;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t seg0 = (int64_t)jobs.segs.size();
      for (int64_t b = 0; b < G; ++b) {
        const float gv = gp[n * G + b];
        if (gv != 0.0f) jobs.seg(seg0, b * Cbi, (b + 1) * Cbi, gv);
      }
      const int nseg = (int)(jobs.segs.size() - seg0);
      if (nseg == 0) {  // no active block: the output is the bias
        at::Tensor on = out[n];
        if (bp) on.copy_(bias->view({Cout, 1, 1}).expand({Cout, geo.ph.Ho, geo.ph.Wo}));
        else on.zero_();
        continue;
      }
      const int64_t r0 = jobs.rows();
      for (int64_t c = 0; c < Cout; ++c)
        jobs.row(wp + c * Cin * KK, op + (n * Cout + c) * L, 1.0f, bp ? bp[c] : 0.0f);
      jobs.add(xp + n * Cin * Lx, r0, r0 + Cout, seg0, nseg, false, bp != nullptr);
    }
  }
  zero_blocks(op, off_blocks, Cout / G * L);
  jobs.run(geo);
  return out;
}

bool backward_direct(const at::Tensor& dout_, const at::Tensor& x_, const at::Tensor& w_,
                     const at::Tensor& gates, const c10::optional<at::Tensor>& bias,
                     const at::Tensor& out_, at::IntArrayRef stride, at::IntArrayRef padding,
                     at::IntArrayRef dilation, int64_t groups, Mode mode,
                     std::array<bool, 4> output_mask, bool exact, at::Tensor& gx, at::Tensor& gw,
                     at::Tensor& gb, at::Tensor& gg) {
  if (!direct_applies(x_, w_, stride, padding, dilation)) return false;
  const at::Tensor x = x_.contiguous(), w = w_.contiguous(), dout = dout_.contiguous();
  const int64_t N = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Cout = w.size(0), Cw = w.size(1), kh = w.size(2), kw = w.size(3), G = gates.size(1);
  const int64_t KK = kh * kw;
  const bool need_x = output_mask[0], need_w = output_mask[1];
  const bool need_b = output_mask[2] && bias.has_value() && bias->defined(), need_g = output_mask[3];
  const at::Tensor gf = gates.detach().to(at::kCPU, at::kFloat).contiguous();
  const float* gp = gf.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* dyp = dout.data_ptr<float>();
  const float* bp = need_g && bias.has_value() && bias->defined() ? bias->data_ptr<float>() : nullptr;
  bool binary = true;
  std::vector<int64_t> off_blocks;
  for (int64_t j = 0; j < N * G; ++j) {
    if (gp[j] == 0.0f) off_blocks.push_back(j);
    else if (gp[j] != 1.0f) binary = false;
  }
  // All on: the dense vendor backward is faster for "out" convs (see forward()), and
  // for "in" convs on small images.
  const Geometry geo(x, w, stride, padding, dilation);
  if (off_blocks.empty() && (mode == Mode::Out || (mode == Mode::In && geo.Lo <= kSmallImagePixels)))
    return false;
  // Pixels per channel: of x (and grad_x), of grad_out.
  const int64_t L_in = geo.L_in, L = geo.Lo;
  // Output channels per gate block ("group"/"out") and input channels per block
  // ("group"/"in"); rows of x per sample that one block's reduction reads.
  const int64_t Cbo = Cout / G, Cbi = Cin / G;
  gg = at::zeros({N, G}, x.options());
  float* ggp = gg.data_ptr<float>();

  // grad_x: the transposed convolution, run by transposed() below.
  const bool want_dx = need_x || (need_g && mode == Mode::In);
  if (want_dx) {
    gx = at::empty_like(x);
    float* gxp = gx.data_ptr<float>();
    transposed(geo, wp, Cout, Cw, groups, [&](Jobs& jobs, auto wt_row) {
      if (mode == Mode::Out) {  // every input channel; reduction over the active blocks' rows
        for (int64_t n = 0; n < N; ++n) {
          const int64_t seg0 = (int64_t)jobs.segs.size();
          for (int64_t b = 0; b < G; ++b)
            if (gp[n * G + b] != 0.0f) jobs.seg(seg0, b * Cbo, (b + 1) * Cbo, gp[n * G + b]);
          const int nseg = (int)(jobs.segs.size() - seg0);
          if (nseg == 0) { gx[n].zero_(); continue; }
          const int64_t r0 = jobs.rows();
          for (int64_t c = 0; c < Cin; ++c) jobs.row(wt_row(c), gxp + (n * Cin + c) * L_in, 1.0f, 0.0f);
          jobs.add(dyp + n * Cout * L, r0, r0 + Cin, seg0, nseg, false, false);
        }
      } else {  // "group"/"in": the input channels of active blocks, gate as row scale
        const bool grp = mode == Mode::Group;
        jobs.segs.push_back({0, grp ? Cbo : Cout, 1.0f});
        for (int64_t n = 0; n < N; ++n) {
          const int64_t sample_r0 = jobs.rows();
          for (int64_t b = 0; b < G; ++b) {
            const float gv = gp[n * G + b];
            if (gv == 0.0f) continue;
            const int64_t r0 = jobs.rows();
            for (int64_t c = b * Cbi; c < (b + 1) * Cbi; ++c) jobs.row(wt_row(c), gxp + (n * Cin + c) * L_in, gv, 0.0f);
            // "group": a block reads its own grad_out channels, one job per block.
            if (grp) jobs.add(dyp + (n * Cout + b * Cbo) * L, r0, jobs.rows(), 0, 1, !binary, false);
          }
          // "in": every block reads all of grad_out, so the sample's active rows fill whole
          // kRows jobs (ResNeXt's 4-channel blocks alone would run 4-row tiles).
          if (!grp && jobs.rows() > sample_r0)
            jobs.add(dyp + n * Cout * L, sample_r0, jobs.rows(), 0, 1, !binary, false);
        }
      }
    });
    if (mode != Mode::Out) zero_blocks(gxp, off_blocks, Cbi * L_in);

    if (need_g && exact && !off_blocks.empty() && mode == Mode::In) {
      // Skipped input blocks: their ungated d(input), dotted with x.
      const int64_t Q = (int64_t)off_blocks.size();
      at::Tensor scratch = at::empty({Q * Cbi, L_in}, x.options());
      float* sp = scratch.data_ptr<float>();
      transposed(geo, wp, Cout, Cw, groups, [&](Jobs& oj, auto wt_row) {
        oj.segs.push_back({0, Cout, 1.0f});
        for (int64_t q = 0; q < Q; ++q) {
          const int64_t n = off_blocks[q] / G, b = off_blocks[q] % G, r0 = oj.rows();
          for (int64_t c = 0; c < Cbi; ++c) oj.row(wt_row(b * Cbi + c), sp + (q * Cbi + c) * L_in, 1.0f, 0.0f);
          oj.add(dyp + n * Cout * L, r0, oj.rows(), 0, 1, false, false);
        }
      });
      at::parallel_for(0, Q, 1, [&](int64_t q0, int64_t q1) {
        for (int64_t q = q0; q < q1; ++q)
          ggp[off_blocks[q]] = direct::dot(sp + q * Cbi * L_in, xp + off_blocks[q] * Cbi * L_in, Cbi * L_in);
      });
    }
  }

  if (need_g) {
    // Active blocks: <grad_out, ungated conv> = <grad_out, out> / gate ("group"/"out"),
    // <ungated d(input), x> = <grad_x, x> / gate ("in").
    const float* a = mode == Mode::In ? gx.data_ptr<float>() : dyp;
    const float* b = mode == Mode::In ? xp : out_.data_ptr<float>();
    const int64_t blk = mode == Mode::In ? Cbi * L_in : Cbo * L;
    at::parallel_for(0, N * G, 16, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j)
        if (gp[j] != 0.0f) ggp[j] = direct::dot(a + j * blk, b + j * blk, blk) / gp[j];
    });
    if (exact && !off_blocks.empty() && mode != Mode::In) {
      // Skipped output blocks: their ungated forward (bias included), dotted with grad_out.
      const int64_t Q = (int64_t)off_blocks.size();
      at::Tensor scratch = at::empty({Q * Cbo, L}, x.options());
      float* sp = scratch.data_ptr<float>();
      Jobs oj;
      oj.w_cstride = KK;
      oj.segs.push_back({0, Cw, 1.0f});
      int64_t sample_r0 = 0;  // "out": a sample's off rows (n-major) share full-size jobs
      for (int64_t q = 0; q < Q; ++q) {
        const int64_t n = off_blocks[q] / G, bk = off_blocks[q] % G, r0 = oj.rows();
        if (q == 0 || off_blocks[q - 1] / G != n) sample_r0 = r0;
        for (int64_t c = bk * Cbo; c < (bk + 1) * Cbo; ++c)
          oj.row(wp + c * Cw * KK, sp + (q * Cbo + c - bk * Cbo) * L, 1.0f, bp ? bp[c] : 0.0f);
        if (mode == Mode::Group)
          oj.add(xp + (n * Cin + bk * Cbi) * L_in, r0, oj.rows(), 0, 1, false, bp != nullptr);
        else if (q + 1 == Q || off_blocks[q + 1] / G != n)
          oj.add(xp + n * Cin * L_in, sample_r0, oj.rows(), 0, 1, false, bp != nullptr);
      }
      oj.run(geo);
      at::parallel_for(0, Q, 1, [&](int64_t q0, int64_t q1) {
        for (int64_t q = q0; q < q1; ++q)
          ggp[off_blocks[q]] = direct::dot(sp + q * Cbo * L, dyp + off_blocks[q] * Cbo * L, Cbo * L);
      });
    }
  }
  if (!need_x) gx = at::Tensor();  // computed for grad_gates only

  if (need_b) {
    if (mode == Mode::In) gb = dout.sum({0, 2, 3});
    else gb = (dout.sum({2, 3}) * gf.repeat_interleave(Cbo, 1)).sum(0);
  }

  if (need_w) {
    gw = at::zeros({Cout, Cw, kh, kw}, x.options());
    float* gwp = gw.data_ptr<float>();
    WgradJobs wj;
    // Small images: the samples of one gate block share a job group (summed before
    // the reduction across lanes; see direct::run_wgrad).  Large ones keep a job per
    // sample, which reads that sample's data once for all its rows.
    const bool by_block = L <= kSmallImagePixels;
    if (KK == 1 && mode != Mode::Group && !geo.strided && by_block) {
      wgrad_1x1_lanes(xp, dyp, gp, N, Cin, Cout, G, L, mode == Mode::In, binary, gwp);
    } else if (mode == Mode::Group && !geo.strided && by_block && Cbo >= kGroupLanesMinRows) {
      wgrad_group_lanes(geo, xp, dyp, gp, N, Cin, Cout, G, padding, binary, gwp);
    } else if (mode == Mode::Out && KK > 1 && Cin % direct::kChunk == 0 && !geo.strided) {
      wgrad_out_cl(xp, dyp, gp, N, Cin, Cout, G, L, kh, kw, padding, dilation, H, W, binary, gwp);
    } else if (mode == Mode::Out) {  // buckets: chunks of input channels (multiples of 8 for the 1x1 tile)
      const int64_t chunk = std::max<int64_t>(8, (Cin / 8 + 7) / 8 * 8);
      for (int64_t c0 = 0; c0 < Cin; c0 += chunk) {
        wj.buckets.emplace_back();
        const int64_t c1 = std::min(Cin, c0 + chunk);
        if (by_block) {  // per output block, the samples where it is on
          for (int64_t b = 0; b < G; ++b)
            wj.block_jobs(gp, N, G, b, true, c0, c1, [&](int64_t n, float gv) {
              for (int64_t r = b * Cbo; r < (b + 1) * Cbo; ++r) wj.row(dyp + (n * Cout + r) * L, gwp + r * Cin * KK, gv);
            }, [&](int64_t n) { return xp + n * Cin * L_in; });
          continue;
        }
        for (int64_t n = 0; n < N; ++n) {
          const int64_t r0 = wj.rows();
          for (int64_t b = 0; b < G; ++b) {
            const float gv = gp[n * G + b];
            if (gv == 0.0f) continue;
            for (int64_t r = b * Cbo; r < (b + 1) * Cbo; ++r)
              wj.row(dyp + (n * Cout + r) * L, gwp + r * Cin * KK, gv);
          }
          if (wj.rows() > r0) wj.add(xp + n * Cin * L_in, r0, wj.rows(), c0, c1);
        }
      }
    } else if (mode == Mode::In && by_block) {
      // Buckets: ranges of output rows (each owns those rows of gw); in each, per input
      // block, the samples where it is on.
      for (int64_t ra = 0; ra < Cout; ra += kInRowsPerBucket) {
        const int64_t rb = std::min(Cout, ra + kInRowsPerBucket);
        wj.buckets.emplace_back();
        for (int64_t b = 0; b < G; ++b)
          wj.block_jobs(gp, N, G, b, true, b * Cbi, (b + 1) * Cbi, [&](int64_t n, float gv) {
            for (int64_t r = ra; r < rb; ++r) wj.row(dyp + (n * Cout + r) * L, gwp + r * Cw * KK, gv);
          }, [&](int64_t n) { return xp + n * Cin * L_in; });
      }
    } else if (mode == Mode::In) {
      // Buckets: ranges of output rows (each owns those rows of gw).  A job covers a
      // sample's active input channels as one list, whatever their blocks (a block
      // alone is as narrow as 4 channels in ResNeXt), split only where the gate value
      // changes, since it scales the job's rows.
      for (int64_t n = 0; n < N; ++n)
        for (int64_t b = 0; b < G; ++b)
          if (gp[n * G + b] != 0.0f)
            for (int64_t c = b * Cbi; c < (b + 1) * Cbi; ++c) wj.chans.push_back(c);
      for (int64_t ra = 0; ra < Cout; ra += kInRowsPerBucket) {
        const int64_t rb = std::min(Cout, ra + kInRowsPerBucket);
        wj.buckets.emplace_back();
        int64_t k = 0;  // position in chans
        for (int64_t n = 0; n < N; ++n) {
          const int64_t n_k0 = k;
          for (int64_t b = 0; b < G;) {
            const float gv = gp[n * G + b];
            if (gv == 0.0f) { ++b; continue; }
            int64_t e = b + 1;  // extend over active blocks of the same gate value
            while (e < G && (gp[n * G + e] == gv || gp[n * G + e] == 0.0f)) ++e;
            int64_t nch = 0;
            for (int64_t q = b; q < e; ++q) nch += gp[n * G + q] != 0.0f ? Cbi : 0;
            const int64_t r0 = wj.rows();
            for (int64_t r = ra; r < rb; ++r) wj.row(dyp + (n * Cout + r) * L, gwp + r * Cw * KK, gv);
            wj.add(xp + n * Cin * L_in, r0, wj.rows(), k - n_k0, k - n_k0 + nch, n_k0);
            k += nch;
            b = e;
          }
        }
      }
    } else {  // "group": buckets are gate blocks (each owns its rows and channels of gw)
      for (int64_t b = 0; b < G; ++b) {
        wj.buckets.emplace_back();
        wj.block_jobs(gp, N, G, b, by_block, 0, Cbi, [&](int64_t n, float gv) {
          for (int64_t r = b * Cbo; r < (b + 1) * Cbo; ++r) wj.row(dyp + (n * Cout + r) * L, gwp + r * Cw * KK, gv);
        }, [&](int64_t n) { return xp + (n * Cin + b * Cbi) * L_in; });
      }
    }
    wj.run(geo, !binary);
  }
  return true;
}

}  // namespace routed_conv
}  // namespace fastmod
