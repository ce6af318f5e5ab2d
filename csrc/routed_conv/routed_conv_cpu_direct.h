// Direct (implicit-GEMM) routed convolution for the CPU, fp32, AVX-512 or AVX2 + FMA.
//
// Why: the ATen path gathers the active blocks into compacted tensors, runs oneDNN
// on them and scatters the result back; for the shapes of BRN/FRN those copies cost
// about as much as the skipped work saves.  These kernels read x and the weight rows
// in place and write the output rows in place, so an off block costs nothing.
//
// Scope: stride 1 and "same" spatial size (Ho == H, Wo == W), which makes a run of
// output pixels p, p+1, ... read the contiguous input run p + off(tap) for every
// tap; lanes that fall into the zero padding are masked off.  Other geometries,
// other dtypes and CPUs without AVX2 use the ATen path.  No torch in here.
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
  int64_t H = 0, W = 0, L = 0;  // L = H * W output (= input) pixels per channel
  int KK = 0;                    // taps per channel (kh * kw)
  uint64_t id = 0;               // unique per make_plan() call (keys per-call caches)
  std::vector<int64_t> tap_offset;   // [KK]: flat input offset of tap t from pixel p
  std::vector<uint16_t> tap_mask;    // [tiles][KK][2]: lanes whose tap is inside the image
  std::vector<uint16_t> store_mask;  // [tiles][2]: lanes with p < L
  int64_t tiles() const { return (L + kPixels - 1) / kPixels; }
};

// True when stride 1, dilation d and padding give Ho == H, Wo == W (the only case
// these kernels handle).
bool same_size(int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t stride_h, int64_t stride_w,
               int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w);

PixelPlan make_plan(int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t pad_h, int64_t pad_w,
                    int64_t dil_h, int64_t dil_w);

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
  // Rows [r0, r0 + n): the register tiles' share of the job.
  RowJob slice(int r0, int n) const {
    return {x, w_row + r0, w_cstride, w_flip, out_row + r0, row_scale ? row_scale + r0 : nullptr,
            bias ? bias + r0 : nullptr, n, segs, nseg};
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

void run_wgrad(const WgradJob& job, const PixelPlan& plan);

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

// sum_j a[j] * b[j], fp32 in 64 lanes.
float dot(const float* a, const float* b, int64_t n);

}  // namespace direct
}  // namespace routed_conv
}  // namespace fastmod
