// CPU emulation of the parts of the CUDA execution model that fastmod's SIMT and
// WMMA kernels use (force-included before the kernel sources; see emulator.py).
// A "launch" runs the CTAs one after another on real host threads that meet at a
// barrier for __syncthreads, so intra-CTA ordering bugs can show up, while
// inter-CTA races cannot.  __shared__ becomes a function-local
// static: one copy, reused by the CTAs in turn.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <version>
#include <mutex>
#include <thread>
#include <vector>

#include <c10/core/Device.h>

struct emu_dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local emu_dim3 threadIdx, blockIdx, blockDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static
#define __restrict__
#define __align__(n) __attribute__((aligned(n)))

#if defined(__cpp_lib_barrier)
#include <barrier>
using EmuBarrier = std::barrier<>;
#else  // torch 2.11 extensions build as C++17: a plain generation-counting barrier
class EmuBarrier {
 public:
  explicit EmuBarrier(int n) : n_(n) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const long gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return gen_ != gen; });
    }
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int n_, count_ = 0;
  long gen_ = 0;
};
#endif

inline EmuBarrier* emu_bar = nullptr;
inline void __syncthreads() { emu_bar->arrive_and_wait(); }

inline std::mutex emu_atomic_mu;
template <typename T>
T atomicAdd(T* p, T v) {
  std::lock_guard<std::mutex> lock(emu_atomic_mu);
  T old = *p;
  *p = old + v;
  return old;
}

// kernel<<<grid, threads, 0, stream>>>(args...) is rewritten to this.  The threads
// of one launch walk the CTAs in step; the barrier after each CTA keeps the next
// one from touching the (static) shared memory while the last is still in use.
template <typename K, typename... Args>
void emu_launch(K kernel, int grid, int threads, Args... args) {
  if (grid <= 0) return;
  EmuBarrier bar(threads);
  emu_bar = &bar;
  std::vector<std::thread> ts;
  ts.reserve(threads);
  for (int t = 0; t < threads; ++t)
    ts.emplace_back([=, &bar] {
      threadIdx.x = t;
      blockDim.x = threads;
      for (int b = 0; b < grid; ++b) {
        blockIdx.x = b;
        kernel(args...);
        bar.arrive_and_wait();
      }
    });
  for (auto& t : ts) t.join();
}

// The host-side CUDA API the launch code touches.
typedef int cudaStream_t;
#define C10_CUDA_KERNEL_LAUNCH_CHECK() (void)0
namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace cuda
}  // namespace c10
namespace at {
namespace cuda {
struct EmuDeviceProperties {
  int major = 9;  // an H100: tensor-core paths on
};
inline EmuDeviceProperties* getCurrentDeviceProperties() {
  static EmuDeviceProperties p;
  return &p;
}
inline cudaStream_t getCurrentCUDAStream() { return 0; }
}  // namespace cuda
}  // namespace at
