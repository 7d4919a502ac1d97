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

// Runs fn(0) .. fn(n - 1) on the pool's threads and the calling one. Tasks claim chunks from a shared
// counter, so a busy pool (other devices' calls under shard_map) leaves the work to the caller; the caller
// returns once every chunk has completed; a task that starts late finds no chunk left and touches nothing.
// The pool is asked for one helper fewer than its threads: the caller is one of them when XLA runs the
// program on its pool (a program with a cond), or PjRt's own thread otherwise, and a helper for every
// pool thread then made one worker more than there are cores.
template <class F>
static void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, const F& fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  const int64_t total = n;
  auto work = [total](State& s, const F& fn) {
    int64_t finished = 0;
    for (int64_t i; (i = s.next.fetch_add(1)) < total; finished++) fn(i);
    if (finished) s.done.fetch_add(finished, std::memory_order_release);
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, n - 1);
  for (int64_t h = 0; h < helpers; h++) pool.Schedule([state, &fn, work] { work(*state, fn); });
  work(*state, fn);
  // the last chunks are in other threads' hands, a few microseconds from done: wait awake (sleeping on a
  // condition variable and waking again cost more than a small matrix takes)
  for (int spins = 0; state->done.load(std::memory_order_acquire) < total;) {
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

}  // namespace mixtral_cpu
