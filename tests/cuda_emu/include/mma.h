// Spec-level emulation of the WMMA m16n16k16 API for tests/cuda_emu: row-major
// operands only (a layout the real kernels do not use fails to compile).  Every lane
// computes the whole tile; only lane 0 stores.  Counts mma_sync calls so tests can
// see that the tensor-core path ran.
#pragma once
#include <atomic>
inline std::atomic<long> emu_mma_calls{0};
namespace nvcuda { namespace wmma {
struct matrix_a {}; struct matrix_b {}; struct accumulator {}; struct row_major {};
enum layout_t { mem_row_major };
template <typename Use, int M, int N, int K, typename T, typename L = void>
struct fragment { static_assert(M == 16 && N == 16 && K == 16, "shape"); float v[16][16]; };
template <typename T>
void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, row_major>& f, const T* p, unsigned ldm) {
  for (int i = 0; i < 16; ++i) for (int k = 0; k < 16; ++k) f.v[i][k] = static_cast<float>(p[i * ldm + k]);
}
template <typename T>
void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, row_major>& f, const T* p, unsigned ldm) {
  for (int k = 0; k < 16; ++k) for (int j = 0; j < 16; ++j) f.v[k][j] = static_cast<float>(p[k * ldm + j]);
}
inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float x) {
  for (auto& r : f.v) for (auto& e : r) e = x;
}
template <typename T>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, row_major>& a,
              const fragment<matrix_b, 16, 16, 16, T, row_major>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  ++emu_mma_calls;
  float t[16][16];
  for (int i = 0; i < 16; ++i) for (int j = 0; j < 16; ++j) {
    float s = c.v[i][j];
    for (int k = 0; k < 16; ++k) s += a.v[i][k] * b.v[k][j];
    t[i][j] = s;
  }
  for (int i = 0; i < 16; ++i) for (int j = 0; j < 16; ++j) d.v[i][j] = t[i][j];
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t) {
  if (threadIdx.x % 32 != 0) return;
  for (int i = 0; i < 16; ++i) for (int j = 0; j < 16; ++j) p[i * ldm + j] = f.v[i][j];
}
} }
