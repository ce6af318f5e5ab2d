// Per-ISA clones for plain float loops: GCC builds each FM_CLONES function for
// AVX-512 (x86-64-v4), AVX2 (x86-64-v3) and baseline and picks one at load time,
// so `#pragma omp simd` loops use the widest vectors the CPU has without the
// whole extension being compiled for one ISA.
#pragma once

#define FM_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define FM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__GNUC__)
#define FM_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FM_CLONES
#endif
