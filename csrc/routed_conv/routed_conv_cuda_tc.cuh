// Tensor-core (WMMA) variants of the routed conv kernel (conv_kernel_tc: forward
// and grad_x) and of grad_weight (wgrad_kernel_tc): fp16/bf16 (m16n16k16) and, when
// torch allows TF32 for convolutions, fp32 as TF32 (m16n16k8); fp32 accumulation.
// Same tiles, operand loaders and epilogues as the SIMT kernels (ConvTile and
// WgradTile in routed_conv_cuda_kernels.cuh); only the multiply differs:
//   64 x 64 tile, 4 warps in a 2 x 2 grid, each warp 2 x 2 fragments (32 x 32);
//   operands staged in shared memory in the input type, K in chunks of 32: B [k][n]
//   row-major; A [k][m] (column-major) in the conv kernel, whose threads stage
//   neighbouring pixels, and [m][k] in the weight-gradient kernel, whose threads
//   stage neighbouring k; either way consecutive threads write consecutive words
//   (rows padded by 8 elements);
//   the accumulators go through shared memory (fp32) to the element-wise epilogue.
// Needs sm_80+ (bf16 and tf32 fragments); the host launches it only there.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "routed_conv/routed_conv_cuda_kernels.cuh"

namespace fastmod {
namespace routed_conv {
namespace kern {

constexpr int TC_BM = 64, TC_BN = 64, TC_BK = 32, TC_THREADS = 128;
constexpr int TC_LDA = TC_BK + 8;  // elements; a multiple of 8 (16-bit) / 4 (fp32) as WMMA asks
constexpr int TC_LDA_T = TC_BM + 8;  // column-major A [k][m]
static_assert(TC_BK % 8 == 0, "the conv kernel stages B in runs of 8 k");
constexpr int TC_LDB = TC_BN + 8;
constexpr int TC_LDC = TC_BN + 4;  // fp32 elements; a multiple of 4

// Per input type: the WMMA fragment element type, the type the fragments load from
// shared memory (same bits as the c10 type), the k of one mma and whether loaded
// fragments must be rounded to TF32.
template <typename scalar_t>
struct TcTraits;
template <>
struct TcTraits<c10::Half> {
  using frag_t = __half;
  using load_t = __half;
  static constexpr int KS = 16;
  static constexpr bool kTf32 = false;
};
template <>
struct TcTraits<c10::BFloat16> {
  using frag_t = __nv_bfloat16;
  using load_t = __nv_bfloat16;
  static constexpr int KS = 16;
  static constexpr bool kTf32 = false;
};
template <>
struct TcTraits<float> {
  using frag_t = nvcuda::wmma::precision::tf32;
  using load_t = float;
  static constexpr int KS = 8;
  static constexpr bool kTf32 = true;
};

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
// acc[2][2] (this warp's 32 x 32 corner wm, wn of the tile) += As x Bs over one
// staged TC_BK chunk.  A_COL: As is [k][m] (ld TC_LDA_T), else [m][k] (ld TC_LDA).
template <typename scalar_t, bool A_COL>
__device__ __forceinline__ void tc_chunk_mma(
    const scalar_t* As, const scalar_t* Bs,
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, TcTraits<scalar_t>::KS, float> (&acc)[2][2],
    int wm, int wn) {
  using namespace nvcuda;
  using Tr = TcTraits<scalar_t>;
  using ft = typename Tr::frag_t;
  using lt = typename Tr::load_t;
  using a_layout = std::conditional_t<A_COL, wmma::col_major, wmma::row_major>;
  constexpr int KS = Tr::KS;
  static_assert(sizeof(lt) == sizeof(scalar_t), "fragments load the staged bits as is");
#pragma unroll
  for (int ks = 0; ks < TC_BK; ks += KS) {
    wmma::fragment<wmma::matrix_a, 16, 16, KS, ft, a_layout> fa[2];
    wmma::fragment<wmma::matrix_b, 16, 16, KS, ft, wmma::row_major> fb[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int m = wm * 32 + i * 16;
      if constexpr (A_COL)
        wmma::load_matrix_sync(fa[i], reinterpret_cast<const lt*>(As + ks * TC_LDA_T + m), TC_LDA_T);
      else
        wmma::load_matrix_sync(fa[i], reinterpret_cast<const lt*>(As + m * TC_LDA + ks), TC_LDA);
      if constexpr (Tr::kTf32) {
        for (int q = 0; q < fa[i].num_elements; ++q) fa[i].x[q] = wmma::__float_to_tf32(fa[i].x[q]);
      }
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::load_matrix_sync(fb[j], reinterpret_cast<const lt*>(Bs + ks * TC_LDB + wn * 32 + j * 16), TC_LDB);
      if constexpr (Tr::kTf32) {
        for (int q = 0; q < fb[j].num_elements; ++q) fb[j].x[q] = wmma::__float_to_tf32(fb[j].x[q]);
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
  }
}

// acc -> Cs [TC_BM][TC_LDC] (fp32, row-major), for the element-wise epilogues.
template <int KS>
__device__ __forceinline__ void tc_store(
    float* Cs, const nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, KS, float> (&acc)[2][2],
    int wm, int wn) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      nvcuda::wmma::store_matrix_sync(Cs + (wm * 32 + i * 16) * TC_LDC + wn * 32 + j * 16, acc[i][j], TC_LDC,
                                      nvcuda::wmma::mem_row_major);
}
#endif

template <typename scalar_t, int KIND, bool DX>
__global__ void __launch_bounds__(TC_THREADS) conv_kernel_tc(const ConvArgs<scalar_t, float> a) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  constexpr int KS = TcTraits<scalar_t>::KS;
  // WMMA loads/stores need 256-bit aligned pointers: every fragment origin below is
  // a multiple of 16 rows and of 16 columns (or of KS = 8 fp32 = 32 bytes) away from
  // these aligned bases.
  __shared__ __align__(32) scalar_t As[TC_BK * TC_LDA_T];  // [k][m]
  __shared__ __align__(32) scalar_t Bs[TC_BK * TC_LDB];
  __shared__ __align__(32) float Cs[TC_BM * TC_LDC];
  __shared__ int col_ch[TC_BN];
  __shared__ int col_blk[TC_BN];
  __shared__ int col_w[TC_BN];
  __shared__ RowBase rows[TC_BM];
  __shared__ KDecode<float> kdec[2][TC_BK];  // this chunk's and the next one's

  const int tid = threadIdx.x;
  ConvTile<scalar_t, float, KIND, DX> t;
  if (!t.init(a, TC_BM, TC_BN)) return;
  for (int c = tid; c < TC_BN; c += TC_THREADS) {
    t.column(a, c, col_ch[c], col_blk[c]);
    col_w[c] = t.col_wpart(a, col_ch[c]);
  }
  for (int m = tid; m < TC_BM; m += TC_THREADS) rows[m] = t.row_base(a, m);
  __syncthreads();

  const int warp = tid / 32, wm = warp / 2, wn = warp % 2;
  wmma::fragment<wmma::accumulator, 16, 16, KS, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  // Software pipelining: chunk k0 + TC_BK is read from global memory into registers
  // while the tensor cores work on chunk k0 in shared memory; the reduction
  // indices are decoded one chunk ahead into the other half of kdec.
  //   A: consecutive threads, consecutive pixels (coalesced reads of src, and
  //      consecutive shared-memory words in the [k][m] layout).
  //   B: a warp takes 8 consecutive k of 4 columns.  A weight row is contiguous in
  //      k, so that is 4 runs of 8 elements instead of 32 scattered ones (columns
  //      fastest), and the shared-memory stores meet each bank at most twice.
  constexpr int A_PER = TC_BK * TC_BM / TC_THREADS, B_PER = TC_BK * TC_BN / TC_THREADS;
  static_assert(A_PER * TC_THREADS == TC_BK * TC_BM && B_PER * TC_THREADS == TC_BK * TC_BN, "even split");
  scalar_t ra[A_PER], rb[B_PER];
  auto a_slot = [&](int i, int& m, int& kk) {
    const int e = tid + i * TC_THREADS;
    m = e % TC_BM;
    kk = e / TC_BM;
  };
  auto b_slot = [&](int i, int& kk, int& c) {
    const unsigned e = tid + i * TC_THREADS;
    kk = (int)((e & 7u) | ((e / (8u * TC_BN)) << 3));
    c = (int)((e >> 3) % TC_BN);
  };
  auto load_chunk = [&](const KDecode<float>* kd) {
#pragma unroll
    for (int i = 0; i < A_PER; ++i) {
      int m, kk;
      a_slot(i, m, kk);
      ra[i] = static_cast<scalar_t>(t.load_a(a, rows[m], kd[kk]));
    }
#pragma unroll
    for (int i = 0; i < B_PER; ++i) {
      int kk, c;
      b_slot(i, kk, c);
      rb[i] = static_cast<scalar_t>(t.load_b(a, kd[kk], col_ch[c], col_w[c]));
    }
  };
  for (int kk = tid; kk < TC_BK; kk += TC_THREADS) kdec[0][kk] = t.k_decode(a, kk);
  __syncthreads();
  load_chunk(kdec[0]);
  for (int k0 = 0, buf = 0; k0 < t.K; k0 += TC_BK, buf ^= 1) {
#pragma unroll
    for (int i = 0; i < A_PER; ++i) {
      int m, kk;
      a_slot(i, m, kk);
      As[kk * TC_LDA_T + m] = ra[i];
    }
#pragma unroll
    for (int i = 0; i < B_PER; ++i) {
      int kk, c;
      b_slot(i, kk, c);
      Bs[kk * TC_LDB + c] = rb[i];
    }
    const bool more = k0 + TC_BK < t.K;
    // kdec[buf ^ 1] last fed the loads of chunk k0 - TC_BK, finished before the
    // previous iteration's barriers.
    if (more)
      for (int kk = tid; kk < TC_BK; kk += TC_THREADS) kdec[buf ^ 1][kk] = t.k_decode(a, k0 + TC_BK + kk);
    __syncthreads();
    if (more) load_chunk(kdec[buf ^ 1]);
    tc_chunk_mma<scalar_t, true>(As, Bs, acc, wm, wn);
    __syncthreads();
  }
  tc_store<KS>(Cs, acc, wm, wn);
  __syncthreads();

  if (a.write) {  // rows fastest: neighbouring threads store neighbouring pixels
    float unused = 0.f;
    for (int e = tid; e < TC_BM * TC_BN; e += TC_THREADS) {
      const int m = e % TC_BM, c = e / TC_BM;
      t.epilogue(a, m, col_ch[c], col_blk[c], Cs[m * TC_LDC + c], true, false, unused);
    }
  }
  if (a.dot) {  // one thread per column sums its rows, then one atomic per column
    for (int c = tid; c < TC_BN; c += TC_THREADS) {
      float dsum = 0.f;
      for (int m = 0; m < TC_BM; ++m)
        t.epilogue(a, m, col_ch[c], col_blk[c], Cs[m * TC_LDC + c], false, true, dsum);
      t.flush_dot(a, col_ch[c], col_blk[c], dsum);
    }
  }
#endif
}

// grad_weight on tensor cores: WgradTile's rows (output channels) x columns
// (input channel, tap) over the sample's pixels, then one atomic per element into
// the fp32 workspace (columns fastest: neighbouring threads, neighbouring weights).
template <typename scalar_t, int MODE>
__global__ void __launch_bounds__(TC_THREADS) wgrad_kernel_tc(const WgradArgs<scalar_t, float> a) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  constexpr int KS = TcTraits<scalar_t>::KS;
  __shared__ __align__(32) scalar_t As[TC_BM * TC_LDA];  // [row][pixel]
  __shared__ __align__(32) scalar_t Bs[TC_BK * TC_LDB];  // [pixel][column]
  __shared__ __align__(32) float Cs[TC_BM * TC_LDC];
  __shared__ int row_co[TC_BM];
  __shared__ float row_scale[TC_BM];
  __shared__ int col_ci[TC_BN];
  __shared__ int col_rs[TC_BN];
  __shared__ KDecode<float> col_dec[TC_BN];
  __shared__ RowBase pix[TC_BK];

  const int tid = threadIdx.x;
  WgradTile<scalar_t, float, MODE> t;
  if (!t.init(a, TC_BM, TC_BN)) return;
  for (int m = tid; m < TC_BM; m += TC_THREADS) t.row(a, m, row_co[m], row_scale[m]);
  for (int c = tid; c < TC_BN; c += TC_THREADS) {
    float sc;
    t.col(a, c, col_ci[c], col_rs[c], sc);
    col_dec[c] = t.col_decode(a, col_ci[c], col_rs[c], sc);
  }
  __syncthreads();

  const int warp = tid / 32, wm = warp / 2, wn = warp % 2;
  wmma::fragment<wmma::accumulator, 16, 16, KS, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  bool any = false;
  for (int s = t.n0; s < t.n1; ++s) {
    if (!t.set_sample(a, s)) continue;  // the same answer for the whole CTA
    any = true;
    const float gs = t.sample_scale();
    for (int k0 = t.kb; k0 < t.ke; k0 += TC_BK) {
      for (int kk = tid; kk < TC_BK; kk += TC_THREADS) pix[kk] = t.pixel_base(a, k0 + kk);
      __syncthreads();
      for (int e = tid; e < TC_BK * TC_BM; e += TC_THREADS) {  // pixels fastest: coalesced dout
        const int kk = e % TC_BK, m = e / TC_BK;
        As[m * TC_LDA + kk] = static_cast<scalar_t>(t.load_a(row_co[m], row_scale[m] * gs, k0 + kk));
      }
      for (int e = tid; e < TC_BK * TC_BN; e += TC_THREADS) {
        const int kk = e % TC_BK, c = e / TC_BK;
        Bs[kk * TC_LDB + c] = static_cast<scalar_t>(t.load_b(a, col_dec[c], pix[kk]));
      }
      __syncthreads();
      tc_chunk_mma<scalar_t, false>(As, Bs, acc, wm, wn);
      __syncthreads();
    }
  }
  if (!any) return;
  tc_store<KS>(Cs, acc, wm, wn);
  __syncthreads();
  for (int e = tid; e < TC_BM * TC_BN; e += TC_THREADS) {
    const int c = e % TC_BN, m = e / TC_BN;
    t.flush(a, row_co[m], col_ci[c], col_rs[c], Cs[m * TC_LDC + c]);
  }
#endif
}

}  // namespace kern
}  // namespace routed_conv
}  // namespace fastmod
