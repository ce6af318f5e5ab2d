// Spec-level emulation of the WMMA API for tests/cuda_emu: m16n16k16 (fp16/bf16)
// and m16n16k8 (tf32); operands row-major, and A also column-major (element (r, c)
// at p[c * ldm + r]); a layout the real kernels do not use fails to compile.  Every lane holds and computes the whole tile (x[] is
// the tile, row-major); only lane 0 stores.  Counts mma_sync calls so tests can see
// that the tensor-core path ran.
#pragma once
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>
inline std::atomic<long> emu_mma_calls{0};
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major };

template <typename Use, int M, int N, int K, typename T, typename L = void>
struct fragment {
  static_assert(M == 16 && N == 16 && (K == 16 || K == 8), "shape");
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  float x[num_elements];
};

template <typename Use, int M, int N, int K, typename T, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, row_major>& f, const P* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "operands only");
  using F = fragment<Use, M, N, K, T, row_major>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = static_cast<float>(p[r * ldm + c]);
}

template <int M, int N, int K, typename T, typename P>
void load_matrix_sync(fragment<matrix_a, M, N, K, T, col_major>& f, const P* p, unsigned ldm) {
  using F = fragment<matrix_a, M, N, K, T, col_major>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = static_cast<float>(p[c * ldm + r]);
}

template <int K>
void fill_fragment(fragment<accumulator, 16, 16, K, float>& f, float v) {
  for (auto& e : f.x) e = v;
}

template <int K, typename T, typename LA>
void mma_sync(fragment<accumulator, 16, 16, K, float>& d, const fragment<matrix_a, 16, 16, K, T, LA>& a,
              const fragment<matrix_b, 16, 16, K, T, row_major>& b,
              const fragment<accumulator, 16, 16, K, float>& c) {
  ++emu_mma_calls;
  float t[256];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.x[i * 16 + j];
      for (int k = 0; k < K; ++k) s += a.x[i * K + k] * b.x[k * 16 + j];
      t[i * 16 + j] = s;
    }
  for (int q = 0; q < 256; ++q) d.x[q] = t[q];
}

template <int K>
void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, K, float>& f, unsigned ldm, layout_t) {
  if (threadIdx.x % 32 != 0) return;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) p[i * ldm + j] = f.x[i * 16 + j];
}

// Round to TF32 (10 mantissa bits, nearest; finite inputs).
inline float __float_to_tf32(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u = (u + 0x1000u) & 0xffffe000u;
  std::memcpy(&v, &u, 4);
  return v;
}
}  // namespace wmma
}  // namespace nvcuda
