// What the FFI handlers (matmul.cc, attention.cc) share: running chunks of a call on XLA's intra-op
// thread pool, and the attribute that compiles a plain loop once per vector instruction set.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

// Loops the compiler vectorizes, compiled for AVX-512, AVX2 and the baseline, the best chosen at load
// (GCC only: elsewhere they are compiled for the baseline).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTORIZED __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTORIZED
#endif

namespace mixtral_cpu {

// Waits awake until `counter` reaches `target`: the work left is in other threads' hands, a few
// microseconds from done (sleeping on a condition variable and waking again cost more than a small matrix
// takes).
static inline void wait_for(const std::atomic<int64_t>& counter, int64_t target) {
  for (int spins = 0; counter.load(std::memory_order_acquire) < target;) {
    if (spins < 4096) {
      spins++;
#if defined(__x86_64__)
      _mm_pause();
#endif
    } else {
      std::this_thread::yield();
    }
  }
}

// Which parts of a call's work are claimed and completed (counts of tasks, or of outputs).
struct Claims {
  std::atomic<int64_t> next{0}, done{0};
};

// Runs `work(claims)` on up to `helpers` of the pool's threads and on the calling one; returns once
// claims.done reaches `total`. The work claims its parts from `claims`, so a busy pool (other devices'
// calls under shard_map) leaves it to the caller, and a helper that starts late finds nothing left and
// touches nothing (its copy of `work` holds only references it then does not use). The pool is asked for
// one helper fewer than its threads: the caller is one of them when XLA runs the program on its pool (a
// program with a cond), or PjRt's own thread otherwise, and a helper for every pool thread then made one
// worker more than there are cores.
template <class Work>
static void run_on_pool(xla::ffi::ThreadPool& pool, int64_t helpers, int64_t total, const Work& work) {
  auto claims = std::make_shared<Claims>();
  helpers = std::min<int64_t>(pool.num_threads() - 1, helpers);
  for (int64_t h = 0; h < helpers; h++) pool.Schedule([claims, work] { work(*claims); });
  work(*claims);
  wait_for(claims->done, total);
}

// fn(0) .. fn(n - 1), each task claimed in turn by the pool's threads and the calling one.
template <class F>
static void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, const F& fn) {
  run_on_pool(pool, n - 1, n, [n, &fn](Claims& s) {
    int64_t finished = 0;
    for (int64_t i; (i = s.next.fetch_add(1)) < n; finished++) fn(i);
    if (finished) s.done.fetch_add(finished, std::memory_order_release);
  });
}

// fn(begin, end) over ranges that cover [0, n), claimed in turn by the pool's threads and the calling one:
// each a share of what is left (1 / the threads), rounded up to a multiple of `grain`. Long ranges first,
// short ones last. For the gemvs, whose ranges are rows of weights: a thread reads each range as one
// stream, and each new one costs a DRAM latency and the prefetchers' ramp; the short last ones keep the
// threads finishing together. Against fixed chunks of ~n / 12 (int4, `python -m bench.kernels_ab`): the
// attention's q, k, v and o projections (calls of 1-3 MB) 4-7% less time, a MoE layer's experts 5-13%
// (fixed chunks of n / 3: the projections 5-6% less time, the experts 6% more).
template <class F>
static void parallel_ranges(xla::ffi::ThreadPool& pool, int64_t n, int64_t grain, const F& fn) {
  const int64_t threads = pool.num_threads();
  run_on_pool(pool, (n + grain - 1) / grain - 1, n, [n, grain, threads, &fn](Claims& s) {
    int64_t finished = 0;
    for (int64_t begin = s.next.load(std::memory_order_relaxed); begin < n;) {
      const int64_t share = std::max<int64_t>(1, ((n - begin) / threads + grain - 1) / grain) * grain;
      const int64_t end = std::min(n, begin + share);
      if (!s.next.compare_exchange_weak(begin, end, std::memory_order_relaxed)) continue;  // (begin: reread)
      fn(begin, end);
      finished += end - begin;
      begin = s.next.load(std::memory_order_relaxed);
    }
    if (finished) s.done.fetch_add(finished, std::memory_order_release);
  });
}

}  // namespace mixtral_cpu
