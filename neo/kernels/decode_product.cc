// A decode step's products on CPU: y [M, N] = x [M, K] @ W [K, N] for a few rows (M = the
// batch, one token each), with W packed once per sampler and parameters into column panels
// [ceil(N / P), K, P] (zero-padded columns; P = kPanel, two of the CPU's vectors: 32 columns
// with AVX-512, 16 with AVX2), float32 or bfloat16 (bfloat16 on a CPU with AVX512_BF16:
// [ceil(N / 32), ceil(K / 2), 32, 2], see below), and y float32.
//
// Why (docs/benchmarks.md, 2026-11-30 "a CPU kernel for decoding"): a decode step reads every
// weight once to multiply it by a few numbers, so it is limited by how fast the weights stream
// in. XLA:CPU's products read them at 12-17 GB/s at batch 8 (float32) and bfloat16 ones at
// 12-15 GB/s at batch 1, where this machine streams 30-45. A panel is contiguous, so each
// thread streams one array front to back, and every weight it loads is multiplied into up to
// 8 rows at once.
//
// Exact: each output is the float32 sum over k of x[m, k] * W[k, n] (bfloat16 products are
// exact in float32), in k order within blocks of 128 values of k whose sums
// are then added up (at M = 1 four interleaved partial sums per block); the panels are divided
// between threads, not the sums, so the result does not depend on the thread count.
//
// Built by neo/kernels/cpu.py with the host compiler for the host CPU (-march=native), on the
// CPU's own vectors (vec.h's kLanes): a pass over a panel keeps 2 x rows accumulators and the
// panel's two weight vectors in registers, 8 rows with AVX-512's 32 registers, 6 with AVX2's 16
// (docs/benchmarks.md, "decoding on a CPU without AVX-512").

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif
// AMX tiles for the bfloat16 pairs (panel_tiles) where the build targets them; they read the
// pairs packing, which needs AVX512_BF16.
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define NEO_TILES 1
#else
#define NEO_TILES 0
#endif
#if NEO_TILES
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int kPanel = 2 * neo::kLanes;  // columns per panel: two vectors
constexpr int kMaxRows = neo::kLanes == 16 ? 8 : 6;  // rows per pass over a panel (accumulators: 2 x rows)
constexpr int64_t kBlock = 128;  // values of k summed apart before they join the total

using neo::f32xL;
using neo::kLanes;
using neo::loadL;

inline void store(float* y, int valid, f32xL lo, f32xL hi) {  // the panel's first `valid` columns
  float tmp[kPanel];
  std::memcpy(tmp, &lo, sizeof lo);
  std::memcpy(tmp + kLanes, &hi, sizeof hi);
  std::memcpy(y, tmp, sizeof(float) * valid);
}

// One row: four interleaved partial sums along k, so four multiply-adds are in flight, added
// into the total every kBlock values of k (blocked summation: a float32 sum over K = 3072 terms
// then errs like XLA's own product, where one running sum errs 4x more).
template <typename W>
void panel_one_row(const float* x, const W* w, float* y, int64_t K, int valid) {
  f32xL lo = {}, hi = {};
  for (int64_t k0 = 0; k0 < K; k0 += kBlock) {
    int64_t k1 = std::min(K, k0 + kBlock), k = k0;
    f32xL a[8] = {};
    for (; k + 4 <= k1; k += 4) {
      for (int u = 0; u < 4; ++u) {
        const W* r = w + (k + u) * kPanel;
        a[2 * u] += x[k + u] * loadL(r);
        a[2 * u + 1] += x[k + u] * loadL(r + kLanes);
      }
    }
    for (; k < k1; ++k) {
      a[0] += x[k] * loadL(w + k * kPanel);
      a[1] += x[k] * loadL(w + k * kPanel + kLanes);
    }
    lo += (a[0] + a[2]) + (a[4] + a[6]);
    hi += (a[1] + a[3]) + (a[5] + a[7]);
  }
  store(y, valid, lo, hi);
}

// Several rows make a panel's pass compute-bound for a while, and the hardware's prefetchers
// then fall behind the stream: fetch the weights `Ahead` bytes ahead of the loads. 1 KiB was
// short at four rows or more: gpt_neo_125M float32 decoding (64 tokens, in one process,
// interleaved) ran at 222 against 191 tok/s at batch 8 and 131 against 124 at batch 4 with 4 KiB
// there, and the products alone of a cold [768, 3,072] and the head at 8 rows read 18.3 and
// 19.5 GB/s against 15.0 and 16.8 (8 KiB gave the same, 16 KiB less); two rows kept 1 KiB
// (equal within noise; docs/benchmarks.md, 2026-12-02 "morning, later"). An AVX2 build's four
// to six rows take 4 KiB too (not measured there); the bfloat16 widening path keeps 1 KiB (it
// does not run on that Xeon, which reads bfloat16 on AMX tiles).
template <int Ahead = 1024, typename W>
inline void prefetch_ahead(const W* p) {
  const char* c = reinterpret_cast<const char*>(p) + Ahead;
  __builtin_prefetch(c);
  __builtin_prefetch(c + 64);
}

// M rows: each loaded weight vector is multiplied into every row; blocked as above.
template <int M, typename W>
void panel_rows(const float* x, int64_t ldx, const W* w, float* y, int64_t ldy, int64_t K, int valid) {
  if constexpr (M == 1) return panel_one_row(x, w, y, K, valid);
  f32xL lo[M] = {}, hi[M] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kBlock) {
    f32xL blo[M] = {}, bhi[M] = {};
    for (int64_t k = k0; k < std::min(K, k0 + kBlock); ++k) {
      prefetch_ahead<(M >= 4 ? 4096 : 1024)>(w + k * kPanel);  // see prefetch_ahead
      f32xL w0 = loadL(w + k * kPanel), w1 = loadL(w + k * kPanel + kLanes);
      for (int m = 0; m < M; ++m) {
        float xm = x[m * ldx + k];
        blo[m] += xm * w0;
        bhi[m] += xm * w1;
      }
    }
    for (int m = 0; m < M; ++m) lo[m] += blo[m], hi[m] += bhi[m];
  }
  for (int m = 0; m < M; ++m) store(y + m * ldy, valid, lo[m], hi[m]);
}

#if defined(__AVX512BF16__)
// bfloat16 with the CPU's bfloat16 dot-product instruction (AVX512_BF16: Cooper Lake, Sapphire
// Rapids, Zen 4 and later): the weights packed in pairs along k, [panels, K / 2, 32, 2], and x as
// pairs (x[m, 2j], x[m, 2j + 1]) in one 32-bit word. vdpbf16ps adds w[2j, c] * x[2j] +
// w[2j + 1, c] * x[2j + 1] to column c's float32 sum: both products exact, as in the widening
// path, at twice its multiply-adds per instruction (a decode step at batch 8 is limited by them)
// where the CPU issues it as fast as a float32 multiply-add (Zen 4). Where it does not, several
// rows take `panel_rows_widened` on the same packing, and a CPU with AMX `panel_tiles` (see
// NeoDecodeBF16Read).
constexpr bool kPairs = true;

inline __m512bh pairs(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }

template <int M>
void panel_rows(const uint32_t* x, int64_t ldx, const uint16_t* w, float* y, int64_t ldy, int64_t J, int valid) {
  constexpr int S = M == 1 ? 4 : 1;  // one row: four interleaved partial sums
  __m512 tlo[M], thi[M];  // totals, blocked as in panel_rows
  for (int m = 0; m < M; ++m) tlo[m] = thi[m] = _mm512_setzero_ps();
  for (int64_t j0 = 0; j0 < J; j0 += kBlock / 2) {
    int64_t j1 = std::min(J, j0 + kBlock / 2), j = j0;
    __m512 lo[M * S], hi[M * S];
    for (int i = 0; i < M * S; ++i) lo[i] = hi[i] = _mm512_setzero_ps();
    for (; j + S <= j1; j += S) {
      for (int u = 0; u < S; ++u) {
        const uint16_t* r = w + (j + u) * 2 * kPanel;
        __m512bh w0 = pairs(r), w1 = pairs(r + kPanel);
        for (int m = 0; m < M; ++m) {
          __m512bh xm = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[m * ldx + j + u]));
          lo[m * S + u] = _mm512_dpbf16_ps(lo[m * S + u], w0, xm);
          hi[m * S + u] = _mm512_dpbf16_ps(hi[m * S + u], w1, xm);
        }
      }
    }
    for (; j < j1; ++j) {  // only at M = 1
      const uint16_t* r = w + j * 2 * kPanel;
      __m512bh xm = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[j]));
      lo[0] = _mm512_dpbf16_ps(lo[0], pairs(r), xm);
      hi[0] = _mm512_dpbf16_ps(hi[0], pairs(r + kPanel), xm);
    }
    for (int m = 0; m < M; ++m) {
      __m512 a = lo[m * S], b = hi[m * S];
      for (int u = 1; u < S; ++u) a = _mm512_add_ps(a, lo[m * S + u]), b = _mm512_add_ps(b, hi[m * S + u]);
      tlo[m] = _mm512_add_ps(tlo[m], a);
      thi[m] = _mm512_add_ps(thi[m], b);
    }
  }
  for (int m = 0; m < M; ++m) {
    f32xL av, bv;
    std::memcpy(&av, &tlo[m], sizeof av);
    std::memcpy(&bv, &thi[m], sizeof bv);
    store(y + m * ldy, valid, av, bv);
  }
}

// The pairs packing read without vdpbf16ps, for M >= 2 rows on a CPU that issues it less than
// half as often as a float32 multiply-add (the 2-vCPU Xeon of docs/benchmarks.md, 2026-12-01:
// 0.9-1.1 against 2.9-4.8 instructions per ns, so half to two thirds of float32's
// multiply-adds): each 32-bit word of a pair holds w[2j, c] in its low half and w[2j + 1, c] in
// its high half, so a shift and a mask widen the two to float32 exactly, and float32
// multiply-adds take them into each row's sums (x widened once, [M, 2J]). Products exact; sums
// float32 in k order, blocked as above.
template <int M>
void panel_rows_widened(const float* x, int64_t ldx, const uint16_t* w, float* y, int64_t ldy, int64_t J,
                        int valid) {
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  __m512 tlo[M], thi[M];
  for (int m = 0; m < M; ++m) tlo[m] = thi[m] = _mm512_setzero_ps();
  for (int64_t j0 = 0; j0 < J; j0 += kBlock / 2) {
    const int64_t j1 = std::min(J, j0 + kBlock / 2);
    __m512 lo[M], hi[M];
    for (int m = 0; m < M; ++m) lo[m] = hi[m] = _mm512_setzero_ps();
    for (int64_t j = j0; j < j1; ++j) {
      const uint16_t* r = w + j * 2 * kPanel;
      prefetch_ahead(r);  // 1 KiB: see prefetch_ahead
      const __m512i p0 = _mm512_loadu_si512(r), p1 = _mm512_loadu_si512(r + kPanel);
      const __m512 e0 = _mm512_castsi512_ps(_mm512_slli_epi32(p0, 16)), o0 = _mm512_castsi512_ps(_mm512_and_si512(p0, high));
      const __m512 e1 = _mm512_castsi512_ps(_mm512_slli_epi32(p1, 16)), o1 = _mm512_castsi512_ps(_mm512_and_si512(p1, high));
      for (int m = 0; m < M; ++m) {
        const __m512 xe = _mm512_set1_ps(x[m * ldx + 2 * j]), xo = _mm512_set1_ps(x[m * ldx + 2 * j + 1]);
        lo[m] = _mm512_fmadd_ps(xo, o0, _mm512_fmadd_ps(xe, e0, lo[m]));
        hi[m] = _mm512_fmadd_ps(xo, o1, _mm512_fmadd_ps(xe, e1, hi[m]));
      }
    }
    for (int m = 0; m < M; ++m) tlo[m] = _mm512_add_ps(tlo[m], lo[m]), thi[m] = _mm512_add_ps(thi[m], hi[m]);
  }
  for (int m = 0; m < M; ++m) {
    f32xL av, bv;
    std::memcpy(&av, &tlo[m], sizeof av);
    std::memcpy(&bv, &thi[m], sizeof bv);
    store(y + m * ldy, valid, av, bv);
  }
}

#if NEO_TILES
// The pairs packing read with AMX (Sapphire Rapids and later): a tile multiply takes 16 pairs of
// k at once, C[M, 16] += A[M, 16 pairs] B[16 pairs, 16 columns], for up to 16 rows. A panel's
// pairs [J, 32, 2] are exactly two B tiles side by side (columns 0-15 and 16-31, rows 128 bytes
// apart), x in pairs [M, J] is the A tile. The multiplies cost next to nothing at decode row
// counts, so the pass runs at the speed the weights stream in, where vdpbf16ps or the widening
// path spend 16-18 vector instructions on every 64 bytes at 8 rows (docs/benchmarks.md,
// 2026-12-01 "AMX"), at one row too. Float32 sums of the exact products, from zero in every
// block of kBlock values of k, the blocks' sums joining the totals in order, as in the vector
// paths; but within a tile multiply AMX adds in an order of its own (about two thirds of the
// outputs differ from `panel_rows_widened`'s in their last bits, and no order tried matched),
// and it treats subnormal inputs and outputs as zero.
constexpr int kTileRows = 16;  // pairs of k per tile multiply; also the rows of x a tile holds

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux gives a process the tiles' 8 KiB of register state only when asked (arch_prctl
// ARCH_REQ_XCOMP_PERM for XTILEDATA); without it the first tile instruction is fatal. Asked
// once; false where the kernel refuses (or the CPU lacks AMX: a build for this CPU has it).
bool tiles_allowed() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}

// Tiles 0, 1: C for the panel's two halves (M rows of 16 float32); 2: A (M rows of 16 pairs);
// 3, 4: B (16 pairs of 16 columns each).
void configure_tiles(int M) {
  TileConfig c;
  for (int t = 0; t < 3; ++t) c.rows[t] = static_cast<uint8_t>(M), c.colsb[t] = 64;
  for (int t = 3; t < 5; ++t) c.rows[t] = kTileRows, c.colsb[t] = 64;
  // GCC 12 does not count ldtilecfg as a read of `c` and drops the stores above as dead (then
  // the first tile instruction faults): make them visible first.
  asm volatile("" : : "r"(&c) : "memory");
  _tile_loadconfig(&c);
}

// Panel of y for M <= 16 rows (the tiles configured for M); J a multiple of 16.
void panel_tiles(const uint32_t* xp, int64_t M, int64_t J, const uint16_t* w, float* y, int64_t ldy, int valid) {
  alignas(64) float block[2][kTileRows][kLanes];
  alignas(64) float total[kTileRows][kPanel] = {};
  for (int64_t j0 = 0; j0 < J; j0 += kBlock / 2) {
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t j = j0; j < std::min(J, j0 + kBlock / 2); j += kTileRows) {
      const uint16_t* r = w + j * 2 * kPanel;
      _tile_loadd(2, xp + j, J * 4);
      _tile_loadd(3, r, 2 * kPanel * 2);
      _tile_loadd(4, r + kPanel, 2 * kPanel * 2);
      _tile_dpbf16ps(0, 2, 3);
      _tile_dpbf16ps(1, 2, 4);
    }
    _tile_stored(0, block[0], 64);
    _tile_stored(1, block[1], 64);
    for (int64_t m = 0; m < M; ++m) {
      _mm512_store_ps(total[m], _mm512_add_ps(_mm512_load_ps(total[m]), _mm512_load_ps(block[0][m])));
      _mm512_store_ps(total[m] + kLanes,
                      _mm512_add_ps(_mm512_load_ps(total[m] + kLanes), _mm512_load_ps(block[1][m])));
    }
  }
  for (int64_t m = 0; m < M; ++m) std::memcpy(y + m * ldy, total[m], sizeof(float) * valid);
}
#endif

// Whether vdpbf16ps pays here: 1 where this CPU issues it at least half as often as a float32
// multiply-add (each does 32 multiply-adds against 16), measured once per process: 16
// independent chains of each, 20,000 rounds, the best of three alternated timings (about 2 ms).
int measure_dot() {
  using clock = std::chrono::steady_clock;
  __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80);
  __m512 f = _mm512_set1_ps(1.0f), sink = _mm512_setzero_ps();
  // The best of three timings of 20,000 rounds of `step` on 16 independent accumulators: the
  // rate the instruction issues at, not its latency.
  auto best = [&](auto step) {
    double t = 1e30;
    for (int round = 0; round < 3; ++round) {
      auto t0 = clock::now();
      __m512 acc[16];  // distinct starting values, so the compiler cannot merge the chains into one
      for (int i = 0; i < 16; ++i) acc[i] = _mm512_set1_ps(static_cast<float>(i));
      for (int r = 0; r < 20000; ++r) {
#pragma GCC unroll 16
        for (auto& v : acc) v = step(v);
        asm volatile("" : "+v"(a), "+v"(f));  // the operands stay in registers, the loop stays a loop
      }
      for (auto& v : acc) sink = _mm512_add_ps(sink, v);
      t = std::min(t, std::chrono::duration<double>(clock::now() - t0).count());
    }
    return t;
  };
  const double t_dot = best([&](__m512 v) { return _mm512_dpbf16_ps(v, a, a); });
  const double t_fma = best([&](__m512 v) { return _mm512_fmadd_ps(v, f, f); });
  volatile float keep = _mm512_reduce_add_ps(sink);
  (void)keep;
  return t_dot <= 2 * t_fma ? 1 : 0;
}

int dot_pays() {
  static const int pays = measure_dot();
  return pays;
}

#else
constexpr bool kPairs = false;
#endif

// Calls f(std::integral_constant<int, rows>()) for rows in 1 .. kMaxRows: the row count as a
// compile-time constant, so that each count gets its own registers of accumulators.
template <int R = 1, typename F>
void with_rows(int64_t rows, F f) {
  if constexpr (R == kMaxRows) {
    return f(std::integral_constant<int, R>());
  } else {
    if (rows == R) return f(std::integral_constant<int, R>());
    return with_rows<R + 1>(rows, f);
  }
}

// Panel p of y for every row of x, kMaxRows rows per pass over the panel. K: the values in a
// row of x (32-bit pairs of bfloat16 in the pairs path); panel_size: the weights in a panel.
template <typename X, typename W>
void panel(const X* x, int64_t M, int64_t K, const W* w, int64_t panel_size, float* y, int64_t N, int64_t p) {
  const W* wp = w + p * panel_size;
  int valid = static_cast<int>(std::min<int64_t>(kPanel, N - p * kPanel));
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    with_rows(std::min<int64_t>(kMaxRows, M - m0), [&](auto rows) {
      constexpr int R = decltype(rows)::value;
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<X, float> && std::is_same_v<W, uint16_t>) {  // pairs widened: K = 2J
        panel_rows_widened<R>(x + m0 * K, K, wp, y + m0 * N + p * kPanel, N, K / 2, valid);
        return;
      }
#endif
      panel_rows<R>(x + m0 * K, K, wp, y + m0 * N + p * kPanel, N, K, valid);
    });
  }
}

// The panels, in chunks of at least 4 (K x 128 values), enough of them to balance the threads.
template <typename X, typename W>
ffi::Error Product(ffi::ThreadPool pool, const X* x, int64_t M, int64_t K, const W* w, int64_t panels,
                   int64_t panel_size, float* y, int64_t N) {
  if (panels * kPanel < N) return ffi::Error::InvalidArgument("packed weights have fewer columns than the output");
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t panels_needed = (N + kPanel - 1) / kPanel;
  neo::parallel_chunks(pool, panels_needed, std::max<int64_t>(4, panels / (4 * threads)), threads,
                       [=](int64_t first, int64_t last) {
                         for (int64_t p = first; p < last; ++p) panel(x, M, K, w, panel_size, y, N, p);
                       });
  return ffi::Error::Success();
}

#if NEO_TILES
// `Product` for the pairs packing on tiles (panel_tiles), any number of rows: blocks of 16 rows
// over a chunk of panels, so past 16 rows (a sampler's prompt pass) the chunk's weights are
// read from memory once and from L2 for the other blocks (4 panels: 192 KiB at K = 768, 768 KiB
// at K = 3,072). Each chunk configures the calling thread's tiles and releases them after.
ffi::Error TileProduct(ffi::ThreadPool pool, const uint32_t* xp, int64_t M, int64_t J, const uint16_t* w,
                       int64_t panels, float* y, int64_t N) {
  if (panels * kPanel < N) return ffi::Error::InvalidArgument("packed weights have fewer columns than the output");
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t panels_needed = (N + kPanel - 1) / kPanel;
  int64_t chunk = M > kTileRows ? 4 : std::max<int64_t>(4, panels / (4 * threads));
  neo::parallel_chunks(pool, panels_needed, chunk, threads, [=](int64_t first, int64_t last) {
    for (int64_t m0 = 0; m0 < M; m0 += kTileRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kTileRows, M - m0));
      if (m0 == 0 || rows < kTileRows) configure_tiles(rows);
      for (int64_t p = first; p < last; ++p)
        panel_tiles(xp + m0 * J, rows, J, w + p * J * 2 * kPanel, y + m0 * N + p * kPanel, N,
                    static_cast<int>(std::min<int64_t>(kPanel, N - p * kPanel)));
    }
    _tile_release();
  });
  return ffi::Error::Success();
}
#endif

const std::string kShapes =
    "expected x [M, K], packed w [panels, K, " + std::to_string(kPanel) + "], y [M, N]";

ffi::Error ProductF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[1] != xd[1] || wd[2] != kPanel || yd[0] != xd[0])
    return ffi::Error::InvalidArgument(kShapes);
  return Product(pool, x.typed_data(), xd[0], xd[1], w.typed_data(), wd[0], wd[1] * kPanel, y->typed_data(),
                 yd[1]);
}

// read: how several rows read the pairs: 0 widened to float32, 1 with vdpbf16ps, 2 on AMX tiles
// (any number of rows where K is a multiple of 32; otherwise the better of the other two); one
// row takes vdpbf16ps unless it takes the tiles.
// NeoDecodeBF16Read says which pays here; neo/kernels/cpu.py passes it.
ffi::Error ProductBF16(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w, int32_t read,
                       ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(x.untyped_data());
#if defined(__AVX512BF16__)
  {
    int64_t M = xd.size() == 2 ? xd[0] : 0, K = xd.size() == 2 ? xd[1] : 0, J = (K + 1) / 2;
    if (xd.size() != 2 || wd.size() != 4 || yd.size() != 2 || wd[1] != J || wd[2] != kPanel || wd[3] != 2 ||
        yd[0] != M)
      return ffi::Error::InvalidArgument("expected x [M, K], packed w [panels, ceil(K / 2), 32, 2], y [M, N]");
    const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.untyped_data());
#if NEO_TILES
    const bool tiles = read == 2 && J % kTileRows == 0 && tiles_allowed();
#else
    const bool tiles = false;
#endif
    if (read == 2 && !tiles) read = dot_pays();  // the tiles do not take this shape: the better vector read
    if (read == 0 && M > 1) {  // x widened to float32 once, [M, 2J], the padding k zero
      std::vector<float> xf(M * 2 * J, 0.0f);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < K; ++k) {
          uint32_t bits = static_cast<uint32_t>(xb[m * K + k]) << 16;
          std::memcpy(&xf[m * 2 * J + k], &bits, sizeof bits);
        }
      return Product(pool, xf.data(), M, 2 * J, wp, wd[0], J * 2 * kPanel, y->typed_data(), yd[1]);
    }
#if NEO_TILES
    // An even K: x's rows already are its pairs (little-endian, x[2j] in the low half).
    if (tiles) return TileProduct(pool, reinterpret_cast<const uint32_t*>(xb), M, J, wp, wd[0], y->typed_data(), yd[1]);
#endif
    std::vector<uint32_t> xp(M * J);  // x in pairs along k, the last one padded with zero
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) xp[m * J + k / 2] |= static_cast<uint32_t>(xb[m * K + k]) << (16 * (k % 2));
    return Product(pool, xp.data(), M, J, wp, wd[0], J * 2 * kPanel, y->typed_data(), yd[1]);
  }
#endif
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[1] != xd[1] || wd[2] != kPanel || yd[0] != xd[0])
    return ffi::Error::InvalidArgument(kShapes);
  // The few rows of x widened to float32 once (exact), so the inner loop broadcasts floats.
  int64_t n = xd[0] * xd[1];
  std::vector<float> xf(n);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits = static_cast<uint32_t>(xb[i]) << 16;
    std::memcpy(&xf[i], &bits, sizeof bits);
  }
  return Product(pool, xf.data(), xd[0], xd[1], reinterpret_cast<const uint16_t*>(w.untyped_data()), wd[0],
                 wd[1] * kPanel, y->typed_data(), yd[1]);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NeoDecodeProductF32, ProductF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(NeoDecodeProductBF16, ProductBF16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Attr<int32_t>("read")
                                  .Ret<ffi::Buffer<ffi::F32>>());

// Which bfloat16 packing this build reads (neo/kernels/cpu.py packs accordingly): 1 for pairs
// along k ([panels, ceil(K / 2), 32, 2]), 0 for [panels, K, 32].
extern "C" int NeoDecodeBF16Pairs() { return kPairs ? 1 : 0; }

// How two rows or more best read the pairs on this CPU: 2 on AMX tiles where the CPU has them
// and Linux lets this process use them, else 1 with vdpbf16ps where it pays (dot_pays, measured
// once), else 0 widened; 0 without AVX512_BF16.
extern "C" int NeoDecodeBF16Read() {
#if NEO_TILES
  if (tiles_allowed()) return 2;
#endif
#if defined(__AVX512BF16__)
  return dot_pays();
#else
  return 0;
#endif
}

// The columns of a panel this build reads (neo/kernels/cpu.py packs accordingly): 32 with
// AVX-512, 16 on a CPU with 8-float vectors.
extern "C" int NeoDecodePanel() { return kPanel; }
