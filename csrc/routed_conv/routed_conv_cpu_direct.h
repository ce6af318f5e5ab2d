// Direct (implicit-GEMM) routed convolution for the CPU, fp32, AVX-512 or AVX2 + FMA.
//
// Why: the ATen path gathers the active blocks into compacted tensors, runs oneDNN
// on them and scatters the result back; for the shapes of BRN/FRN those copies cost
// about as much as the skipped work saves.  These kernels read x and the weight rows
// in place and write the output rows in place, so an off block costs nothing.
//
// Scope: "same" padding (2 * pad == dil * (k - 1)) at any stride.  At stride 1 a run
// of output pixels p, p+1, ... reads the contiguous input run p + off(tap) for every
// tap; lanes that fall into the zero padding are masked off.  Strided convs read a
// polyphase copy of x instead (see Phases), which gives them the same property.
// Other geometries, other dtypes and CPUs without AVX2 use the ATen path.  No torch
// in here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace fastmod {
namespace routed_conv {
namespace direct {

// Output rows per register tile: 12 rows x 2 pixel vectors = 24 accumulators, so
// each pair of input loads feeds 24 FMAs (8 rows measured ~10% slower on FRN shapes).
constexpr int kRows = 12;
// Output pixels per register tile (two 16-float vectors).
constexpr int kPixels = 32;

// Runtime check: the CPU has AVX-512F or AVX2 + FMA (and FASTMOD_ROUTED_CONV_DIRECT
// is not "0"; "avx2" forces the AVX2 build).
bool available();

// Per-call pixel plan for one image geometry: tap offsets and per-tile lane masks.
struct PixelPlan {
  int64_t H = 0, W = 0, L = 0;  // L = H * W output pixels per channel
  int64_t XL = 0;                // floats per channel of the input read (L at stride 1)
  int KK = 0;                    // taps per channel (kh * kw)
  uint64_t id = 0;               // unique per plan (keys per-call caches)
  int64_t max_offset = 0;        // the largest tap offset (prefetch distance)
  std::vector<int64_t> tap_offset;   // [KK]: flat input offset of tap t from pixel p
  std::vector<uint16_t> tap_mask;    // [tiles][KK][2]: lanes whose tap is inside the image
  std::vector<uint16_t> store_mask;  // [tiles][2]: lanes with p < L
  int64_t tiles() const { return (L + kPixels - 1) / kPixels; }
};

// True for "same" padding (2 * pad == dil * (k - 1) in both dims, so Ho = ceil(H /
// stride)) at any stride: the geometries these kernels handle.
bool same_size(int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t stride_h, int64_t stride_w,
               int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w);

// A strided conv as a stride-1 one.  x is copied per channel into sh * sw phase
// images of Ho x Wo pixels, phase (a, b) holding x[i * sh + a][j * sw + b] (zero past
// the image).  Tap (ky, kx) of output pixel (oh, ow) reads input row
// oh * sh + ky * dil_h - pad_h = (oh + di) * sh + a with a = (ky * dil_h - pad_h) mod sh:
// row oh + di of phase image a, a fixed offset from pixel p.  So the forward and
// grad_weight kernels run unchanged over the packed x (channel stride XL = sh * sw *
// Ho * Wo), doing no extra arithmetic; grad_x runs once per phase, over that phase's
// taps.  Stride 1 is the one-phase case (and needs no packing).
struct Phases {
  int64_t H = 0, W = 0, Ho = 0, Wo = 0, sh = 1, sw = 1;
  int KK = 0;
  std::vector<int> phase;             // [KK]: phase of tap t, a * sw + b
  std::vector<int64_t> di, dj;        // [KK]: its row / column offset in that phase image
  std::vector<int> order;             // the taps sorted by phase (stable)
  std::vector<int> phase_begin;       // [count + 1]: phase q's taps are order[begin[q] .. begin[q+1])
  int64_t count() const { return sh * sw; }
  int64_t Lo() const { return Ho * Wo; }
};

Phases make_phases(int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t pad_h,
                   int64_t pad_w, int64_t dil_h, int64_t dil_w);

// The forward (and grad_weight) plan: Lo output pixels reading the packed x.
PixelPlan make_plan(const Phases& ph);

// grad_x of phase q: a stride-1 correlation of grad_out (Ho x Wo) with phase q's taps,
// in the order of Phases::order, offsets negated; its output is phase image q of
// grad_x.  KK may be 0 (no tap lands on that phase: its grad_x is zero).
PixelPlan make_transposed_plan(const Phases& ph, int q);

// Stride 1: make_plan(make_phases(H, W, kh, kw, 1, 1, ...)).
PixelPlan make_plan(int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t pad_h, int64_t pad_w,
                    int64_t dil_h, int64_t dil_w);

// One channel: x [H][W] -> xph [count][Ho][Wo], and back (positions past the image
// are dropped on the way back).
void pack_phases(const float* x, const Phases& ph, float* xph);
void unpack_phases(const float* xph, const Phases& ph, float* x);

// A run of reduction channels [c0, c1) whose contribution is multiplied by `scale`.
struct Segment {
  int64_t c0, c1;
  float scale;
};

// Appends channels [c0, c1) to the segment list segs[first, ...), extending the last
// segment when it ends at c0 with the same scale (FRN's one-channel blocks would
// otherwise pay the segment overhead per channel).
inline void add_segment(std::vector<Segment>& segs, size_t first, int64_t c0, int64_t c1, float scale) {
  if (segs.size() > first && segs.back().c1 == c0 && segs.back().scale == scale)
    segs.back().c1 = c1;
  else
    segs.push_back({c0, c1, scale});
}

// out_row[i][p] = row_scale[i] * (bias[i] + sum_seg seg.scale * sum_{c in seg, t}
//                  w_row[i][c*w_cstride + (w_flip ? -t : t)] * x[c*L + p + tap_offset[t]])
// (padding = 0) for every pixel p and rows i < nrows.  row_scale / bias may be null
// (1 / 0).  x points at channel 0 of the segments' channel numbering, w_row[i] at the
// weights of that channel 0 (tap 0, or tap KK-1 when w_flip).  A forward reads
// weight rows (w_cstride = KK); grad_x reads the same weight tensor transposed and
// flipped in place (w_cstride = Cin_per_group * KK, w_flip), so no transposed copy.
struct RowJob {
  const float* x;
  const float* const* w_row;
  int64_t w_cstride;
  bool w_flip;
  float* const* out_row;
  const float* row_scale;
  const float* bias;
  int nrows;
  const Segment* segs;
  int nseg;
  // Tells apart contents of a reused x buffer (the strided convs' per-thread phase
  // copies): per-thread caches keyed on x also compare this.
  uint64_t x_tag = 0;
  // Rows [r0, r0 + n): the register tiles' share of the job.
  RowJob slice(int r0, int n) const {
    return {x, w_row + r0, w_cstride, w_flip, out_row + r0, row_scale ? row_scale + r0 : nullptr,
            bias ? bias + r0 : nullptr, n, segs, nseg, x_tag};
  }
};

void run_rows(const RowJob& job, const PixelPlan& plan);

// Weight gradient of one sample's rows over the channels c = k for k in [c0, c1), or
// c = chan[k] when chan is set (the scattered active channels of a gated-input conv):
//   dw_row[i][c*KK + t] += row_scale[i] * sum_p dy_row[i][p] * x[c*L + p + tap_offset[t]]
// (padding = 0).  row_scale may be null (1).  Jobs that add into the same dw rows
// and channels must not run concurrently.
struct WgradJob {
  const float* x;
  const float* const* dy_row;
  float* const* dw_row;
  const float* row_scale;
  int nrows;
  int64_t c0, c1;
  const int64_t* chan = nullptr;
  int64_t channel(int64_t k) const { return chan ? chan[k] : k; }
  WgradJob slice(int r0, int n) const {
    return {x, dy_row + r0, dw_row + r0, row_scale ? row_scale + r0 : nullptr, n, c0, c1, chan};
  }
};

// jobs[0 .. n): the same dw rows and channels, each its own sample (x, dy rows and
// row scale): summed in registers before the one reduction across lanes per
// (row, channel, tap), which on small images (7x7: 4 vectors of pixels) otherwise
// costs as much as the products.  With n > 1 the row scale multiplies dy as it is
// loaded; with n == 1 the reduced sum.
void run_wgrad(const WgradJob* jobs, int n, const PixelPlan& plan);

// Channels-last weight gradient, for many reduction channels with small images
// (FRN's 3x3 filter-gated convs), where the pixel-vector kernel above spends most
// of its time reducing across lanes.  x is packed per sample as a zero-bordered
// channels-last chunk of kChunk channels, xp[(y + pad_h) * Wp + (x + pad_w)][j], and
// lanes run over channels, so no cross-lane reduction is needed:
//   acc_row[i][t*kChunk + j] += row_scale[i] * sum_p dy_row[i][p] * xp[q(p) + tap(t)][j]
constexpr int kChunk = 32;

struct ClPlan {
  int64_t H = 0, W = 0, Hp = 0, Wp = 0, pad_h = 0, pad_w = 0;
  int KK = 0;
  std::vector<int64_t> tap_offset;  // [KK], in padded pixels
};

ClPlan make_cl_plan(int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t pad_h, int64_t pad_w,
                    int64_t dil_h, int64_t dil_w);

// xp[(y + pad_h) * Wp + x + pad_w][j] = x[j * H * W + y * W + x] for j < kChunk (the
// border of xp is left as it is: zero it once).
void pack_cl(const float* x, const ClPlan& plan, float* xp);

struct WgradClJob {
  const float* xp;
  const float* const* dy_row;
  float* const* acc_row;
  const float* row_scale;
  int nrows;
  WgradClJob slice(int r0, int n) const {
    return {xp, dy_row + r0, acc_row + r0, row_scale ? row_scale + r0 : nullptr, n};
  }
};

void run_wgrad_cl(const WgradClJob& job, const ClPlan& plan);

// 1x1 weight gradient with the lanes over the dense side, for small images: the
// pixel-vector kernel above sums over a 7x7 image in 4 vectors (the last one 1 of 16
// lanes) and then reduces across lanes, so it ran at about half oneDNN's rate
// there.  Here the pixels are the loop and each lane is an output column:
//   t_row[i][j] += row_scale[i] * sum_{p < L} a_row[i][p] * bt[p * ldb + j],  j < ncols
// a_row: the gated side's rows (the active x channels of a gated-input conv, the
// active dy rows of a gated-output one); bt: the other side transposed, pixel-major.
// row_scale may be null (1).  Jobs that add into the same t rows and columns must
// not run concurrently.
struct Wgrad1x1LanesJob {
  const float* const* a_row;
  float* const* t_row;
  const float* row_scale;
  int nrows;
  const float* bt;
  int64_t ldb, ncols, L;
};

void run_wgrad_1x1_lanes(const Wgrad1x1LanesJob& job);

// The same idea for a gate block of a grouped conv at stride 1 (any taps), summed
// over the block's active samples: lanes over the block's output rows (dy rows
// transposed per sample, times the gate), one accumulator row per (channel, tap)
// pair k, whose input is a zero-bordered copy of the block's x channels:
//   t[k][j] += sum_s sum_{y < H, x < W} xpad[s][koff[k] + y * Wp + x] * bt[s][(y * W + x) * ldb + j]
// for j < ncols; koff[k] = c * (padded pixels per channel) + the tap's offset in the
// padded image.
struct WgradTapsLanesJob {
  const float* const* xpad;
  const float* const* bt;
  int ns;
  const int64_t* koff;
  int nk;
  float* t;
  int64_t ldt, ncols, ldb;
  int64_t H, W, Wp;
};

void run_wgrad_taps_lanes(const WgradTapsLanesJob& job);

// dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols.
void transpose(const float* src, int64_t ld_src, int64_t rows, int64_t cols, float* dst, int64_t ld_dst);

// sum_j a[j] * b[j], fp32 in 64 lanes.
float dot(const float* a, const float* b, int64_t n);

}  // namespace direct
}  // namespace routed_conv
}  // namespace fastmod
