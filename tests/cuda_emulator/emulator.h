// Just enough of CUDA to run gradclip's kernels on the CPU, for the tests.
//
// A launch runs its blocks one after another; each block runs GC_THREADS
// std::threads that meet at __syncthreads() on a std::barrier, so the
// kernels' shared-memory reductions, their block-wide loops and the
// last-block ticket run as written. __shared__ variables become statics,
// which all threads of the running block share.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <functional>
#include <thread>
#include <vector>

struct gc_dim3 {
    unsigned x = 0, y = 0, z = 0;
};
inline thread_local gc_dim3 threadIdx, blockIdx;
inline gc_dim3 gridDim, blockDim;
inline std::barrier<>* gc_block_barrier = nullptr;

#define __global__
#define __device__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __align__(n) alignas(n)
#define __shared__ static
#define __syncthreads() gc_block_barrier->arrive_and_wait()

using std::exp2;
using std::fabs;
using std::floor;
using std::hypot;
using std::ilogb;
using std::ldexp;
using std::log2;
using std::pow;
using std::sqrt;



inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline unsigned atomicAdd(unsigned* p, unsigned v) {
    return std::atomic_ref<unsigned>(*p).fetch_add(v);
}
inline float __uint_as_float(unsigned b) {
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned b;
    std::memcpy(&b, &f, 4);
    return b;
}
inline double __longlong_as_double(long long b) {
    double d;
    std::memcpy(&d, &b, 8);
    return d;
}

// Run `kernel` over `grid` blocks of `threads` threads.
inline void gc_launch(unsigned grid, unsigned threads, const std::function<void()>& kernel) {
    gridDim.x = grid;
    blockDim.x = threads;
    std::barrier<> bar(threads);
    gc_block_barrier = &bar;
    for (unsigned b = 0; b < grid; ++b) {
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; ++t) {
            pool.emplace_back([&, b, t] {
                blockIdx.x = b;
                threadIdx.x = t;
                kernel();
            });
        }
        for (auto& th : pool) th.join();
    }
    gc_block_barrier = nullptr;
}
