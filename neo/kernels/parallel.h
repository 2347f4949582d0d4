// Work shared between the calling thread and helpers on XLA's intra-op thread pool (the FFI's
// ThreadPool), for neo's CPU kernels (decode_product.cc, decode_attention.cc): no thread pool
// or runtime of neo's own.

#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace neo {

// Calls fn(first, last) over [0, n) in chunks of `chunk` units, claimed atomically by the
// calling thread and by up to `threads - 1` helpers; returns when every chunk is done. The
// shared state outlives the call: a helper that starts after the work is done finds nothing
// left to claim and only drops its reference (it never calls fn). The claim counter, the
// completion counter and the rest sit on cache lines of their own, and each thread adds its
// completed chunks once, when it finds nothing left: claims are then the only write the threads
// share while they work.
template <typename F>
void parallel_chunks(xla::ffi::ThreadPool& pool, int64_t n, int64_t chunk, int64_t threads, F fn) {
  struct Work {
    alignas(64) std::atomic<int64_t> next{0};
    alignas(64) std::atomic<int64_t> done{0};
    alignas(64) int64_t chunks = 0, chunk = 1, n = 0;
    F fn;
    explicit Work(F f) : fn(std::move(f)) {}
  };
  auto work = std::make_shared<Work>(std::move(fn));
  work->n = n;
  work->chunk = std::max<int64_t>(1, chunk);
  work->chunks = (n + work->chunk - 1) / work->chunk;
  auto run = [](Work& s) {
    int64_t mine = 0;
    for (int64_t c; (c = s.next.fetch_add(1, std::memory_order_relaxed)) < s.chunks; ++mine)
      s.fn(c * s.chunk, std::min(s.n, (c + 1) * s.chunk));
    if (mine) s.done.fetch_add(mine, std::memory_order_release);
  };
  for (int64_t t = 1; t < std::min(threads, work->chunks); ++t) pool.Schedule([work, run] { run(*work); });
  run(*work);
  while (work->done.load(std::memory_order_acquire) < work->chunks) std::this_thread::yield();
}

}  // namespace neo
