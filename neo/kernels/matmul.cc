// Training's float32 products on CPU: c [M, N] = a [M, K] @ b [K, N], either operand possibly
// given transposed (a as [K, M], b as [N, K]), c float32. neo/model/layers.py sends a dense
// layer's product and both of its gradients here (the input's, g b^T; the weight's, a^T g).
//
// Why (docs/benchmarks.md, 2026-11-30 "evening: training products on CPU"): in the quickstart
// step XLA:CPU's products ([768, 128] x [128, 512] and the like, and their gradients) ran at
// 100-200 GFLOP/s, 143 on average, where PyTorch's reach 225 on the same two cores: a
// quarter of the step. Register tiles of 12 rows x 32 columns run at the core's peak rate on
// these shapes (one 16-float multiply-add per cycle per core).
//
// How: b is read in panels of 32 columns, [K, 32], taken in place when b is row-major and N a
// whole number of panels, else first packed (transposed, zero-padded) into scratch. A tile of
// 12 rows x one panel keeps 24 vector accumulators in registers while k runs; each a[i, k] is
// broadcast from wherever it lies. Threads take runs of tiles (a row block's panels in turn, so
// its rows stay in cache).
//
// A weight's gradient (a transposed, [K, M], K the batch's tokens: 768 in the quickstart) is
// done differently. Whole-K tiles read a and an in-place panel with a stride of M or N floats
// per k, 768 rows of them, out of L2 and across pages: in the quickstart step its
// [128, 768] x [768, 512] ran at 77-80 GFLOP/s against 119-140 for the forward products
// (docs/benchmarks.md, 2026-12-01 "evening"). So there b is always packed, k runs in blocks of
// 128 outermost, and each block of 48 rows of a is copied contiguous (runs of 12 floats, cheap
// from a transposed a) and kept in L1 while the panels pass; the partial sums go to c in block
// order. That path ran the same product at 129-136 GFLOP/s in the step.
//
// Exact and reproducible: on both paths each output is the float32 sum over k of a[i, k] *
// b[k, j] in k order within blocks of 128 values of k, the blocks then added in order (as
// decode_product.cc: a sum over K = 3072 terms then errs like XLA's own, where one running sum
// errs 4x more). One thread computes each output, so the result does not depend on the thread
// count.
//
// Built by neo/kernels/cpu.py with the host compiler for the host CPU (-march=native).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "parallel.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using neo::f32x16;
using neo::load16;
using neo::store16;

constexpr int64_t kPanel = 32;   // columns per panel: two 16-float vectors
constexpr int kTile = 12;        // rows per register tile: 24 accumulators + 2 panel vectors
constexpr int64_t kBlock = 128;  // values of k summed apart before they join the total
constexpr int64_t kGroup = 48;   // rows of a weight gradient's a packed together: 24 KiB a k-block
constexpr int64_t kUnitsPerThread = 8;  // product units per thread (not weight gradients): runs of items

struct Product {
  const float* a;
  int64_t a_row, a_k;  // a[i, k] = a[i * a_row + k * a_k]
  const float* panels;
  int64_t panel_stride, panel_row;  // panel p's row k: panels + p * panel_stride + k * panel_row
  float* c;
  int64_t M, N, K;
};

// c[i .. i + U, panel p's columns] = (or += when `add`) the sum over k in [k0, k1) of
// a[i + u, k] b[k, j], in blocks of kBlock values of k added in order; a[i + u, k] is read at
// a[u * a_row + (k - k0) * a_k] (the tile's own rows, in place or packed).
template <int U>
void tile(const Product& P, const float* a, int64_t a_row, int64_t a_k, int64_t i, int64_t p, int64_t k0, int64_t k1,
          bool add) {
  const float* b = P.panels + p * P.panel_stride;
  const int64_t j0 = p * kPanel, valid = std::min(kPanel, P.N - j0);
  f32x16 total[U][2];
  for (int64_t kb = k0; kb < k1; kb += kBlock) {
    const int64_t ke = std::min(k1, kb + kBlock);
    f32x16 acc[U][2] = {};
    const float* ak = a + (kb - k0) * a_k;
    for (int64_t k = kb; k < ke; ++k, ak += a_k) {
      const f32x16 b0 = load16(b + k * P.panel_row), b1 = load16(b + k * P.panel_row + 16);
      for (int u = 0; u < U; ++u) {
        const float x = ak[u * a_row];
        acc[u][0] += x * b0;
        acc[u][1] += x * b1;
      }
    }
    for (int u = 0; u < U; ++u) {
      total[u][0] = kb > k0 ? total[u][0] + acc[u][0] : acc[u][0];
      total[u][1] = kb > k0 ? total[u][1] + acc[u][1] : acc[u][1];
    }
  }
  if (k1 <= k0)
    for (int u = 0; u < U; ++u) total[u][0] = total[u][1] = f32x16{};
  for (int u = 0; u < U; ++u) {
    float* row = P.c + (i + u) * P.N + j0;
    if (valid == kPanel) {
      store16(row, add ? load16(row) + total[u][0] : total[u][0]);
      store16(row + 16, add ? load16(row + 16) + total[u][1] : total[u][1]);
    } else {
      float tmp[kPanel] = {};
      if (add) std::memcpy(tmp, row, sizeof(float) * valid);
      store16(tmp, add ? load16(tmp) + total[u][0] : total[u][0]);
      store16(tmp + 16, add ? load16(tmp + 16) + total[u][1] : total[u][1]);
      std::memcpy(row, tmp, sizeof(float) * valid);
    }
  }
}

// Rows a tile takes from the `left` rows still to do: kTile, then 4 at a time, then 1.
inline int tile_rows(int64_t left) { return left >= kTile ? kTile : left >= 4 ? 4 : 1; }

// Rows [i0, end) of panel p over k in [k0, k1) (the sums added to c's unless k0 is 0), in tiles
// of tile_rows: a read in place, or (Packed) from `packed`, a's rows as pack_rows laid them out.
// Packed is a template argument so the packed tiles' strides are constants in their loops.
template <bool Packed>
void rows_of_panel(const Product& P, const float* packed, int64_t i0, int64_t end, int64_t p, int64_t k0,
                   int64_t k1) {
  for (int64_t i = i0; i < end;) {
    const int U = tile_rows(end - i);
    const float* a = Packed ? packed : P.a + i * P.a_row;
    const int64_t a_row = Packed ? 1 : P.a_row, a_k = Packed ? U : P.a_k;
    if (U == kTile) tile<kTile>(P, a, a_row, a_k, i, p, k0, k1, k0 > 0);
    else if (U == 4) tile<4>(P, a, a_row, a_k, i, p, k0, k1, k0 > 0);
    else tile<1>(P, a, a_row, a_k, i, p, k0, k1, k0 > 0);
    if (Packed) packed += U * (k1 - k0);
    i += U;
  }
}

// Rows [i0, end) of a over k in [k0, k1), packed as rows_of_panel's tiles read them: for each
// tile's U rows, [k1 - k0][U] contiguous.
void pack_rows(const Product& P, float* dst, int64_t i0, int64_t end, int64_t k0, int64_t k1) {
  for (int64_t i = i0; i < end;) {
    const int U = tile_rows(end - i);
    for (int64_t k = k0; k < k1; ++k)
      for (int u = 0; u < U; ++u) *dst++ = P.a[(i + u) * P.a_row + k * P.a_k];
    i += U;
  }
}

// Panel p of b ([K, N], or [N, K] when transposed) into dst [K, 32], zero-padded columns.
void pack(const float* b, bool b_transposed, float* dst, int64_t p, int64_t K, int64_t N) {
  const int64_t j0 = p * kPanel, valid = std::min(kPanel, N - j0);
  if (!b_transposed) {
    for (int64_t k = 0; k < K; ++k) {
      std::memcpy(dst + k * kPanel, b + k * N + j0, sizeof(float) * valid);
      std::fill(dst + k * kPanel + valid, dst + (k + 1) * kPanel, 0.0f);
    }
    return;
  }
  if (valid < kPanel) std::fill(dst, dst + K * kPanel, 0.0f);
  for (int64_t j = 0; j < valid; ++j) {
    const float* src = b + (j0 + j) * K;
    for (int64_t k = 0; k < K; ++k) dst[k * kPanel + j] = src[k];
  }
}

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, int32_t a_transposed,
                  int32_t b_transposed, ffi::ResultBuffer<ffi::F32> c) {
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  if (ad.size() != 2 || bd.size() != 2 || cd.size() != 2)
    return ffi::Error::InvalidArgument("training product: a, b and c must be matrices");
  const int64_t M = a_transposed ? ad[1] : ad[0], K = a_transposed ? ad[0] : ad[1];
  const int64_t N = b_transposed ? bd[0] : bd[1], Kb = b_transposed ? bd[1] : bd[0];
  if (Kb != K || cd[0] != M || cd[1] != N)
    return ffi::Error::InvalidArgument("training product: a [M, K] (or [K, M]), b [K, N] (or [N, K]), c [M, N]");
  if (M == 0 || N == 0) return ffi::Error::Success();

  const int64_t panels = (N + kPanel - 1) / kPanel;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  Product P{a.typed_data(), a_transposed ? 1 : K, a_transposed ? M : 1, b.typed_data(), kPanel, N,
            c->typed_data(), M, N, K};
  thread_local neo::aligned_vector<float> scratch;  // the calling thread's; helpers only use it during the call
  const bool blocked = a_transposed && K > 0;  // a weight's gradient: k blocked outermost (below)
  // b's panels, where they are packed, are packed in the same pass over XLA's pool as the
  // products: units [0, packs) pack a panel each and mark it ready, the product units after
  // them wait for their panels' marks. Units are claimed in order, so every packing unit is
  // under way before the first product unit starts and a wait lasts one panel's packing at
  // most. (Packing in a pass of its own cost a second hand-off to the pool per product,
  // 70-80 us on this VM: in the quickstart step the products of a transposed b ran at 83-97
  // GFLOP/s against 119-140 for the others; docs/benchmarks.md, 2026-12-01 "evening".)
  const int64_t packs = blocked || b_transposed || N % kPanel ? panels : 0;
  std::vector<std::atomic<uint8_t>> ready(packs);  // zeroed: no panel packed yet
  if (packs) {
    scratch.resize(panels * K * kPanel);
    P.panels = scratch.data();
    P.panel_stride = K * kPanel;
    P.panel_row = kPanel;
  }
  auto pack_panel = [&ready, src = b.typed_data(), dst = scratch.data(), bt = b_transposed != 0, K, N](int64_t p) {
    pack(src, bt, dst + p * K * kPanel, p, K, N);
    ready[p].store(1, std::memory_order_release);
  };
  auto wait_panels = [&ready](int64_t p0, int64_t p1) {
    if (ready.empty()) return;
    for (int64_t p = p0; p < p1; ++p)
      while (!ready[p].load(std::memory_order_acquire)) std::this_thread::yield();
  };
  if (blocked) {
    // Units: (group of kGroup rows, run of panels), runs shortened until every thread has two
    // units. Each unit packs its rows' k-block of a once for all its panels.
    const int64_t groups = (M + kGroup - 1) / kGroup;
    int64_t run = panels;
    while (run > 1 && groups * ((panels + run - 1) / run) < 2 * threads) run = (run + 1) / 2;
    const int64_t runs = (panels + run - 1) / run;
    neo::parallel_chunks(pool, packs + groups * runs, 1, threads, [&](int64_t first, int64_t last) {
      thread_local neo::aligned_vector<float> rows;  // this thread's packed rows
      rows.resize(kGroup * kBlock);
      for (int64_t u = first; u < last; ++u) {
        if (u < packs) {
          pack_panel(u);
          continue;
        }
        const int64_t i0 = ((u - packs) / runs) * kGroup, end = std::min(P.M, i0 + kGroup);
        const int64_t p0 = ((u - packs) % runs) * run, p1 = std::min(panels, p0 + run);
        wait_panels(p0, p1);
        for (int64_t k0 = 0; k0 < P.K; k0 += kBlock) {
          const int64_t k1 = std::min(P.K, k0 + kBlock);
          pack_rows(P, rows.data(), i0, end, k0, k1);
          for (int64_t p = p0; p < p1; ++p) rows_of_panel<true>(P, rows.data(), i0, end, p, k0, k1);
        }
      }
    });
    return ffi::Error::Success();
  }
  // Items: (block of rows, panel), a row block's panels consecutive; blocks of kTile rows, or
  // fewer rows per block when there are too few blocks to keep every thread busy. A product
  // unit is a run of consecutive items, a kUnitsPerThread-th of one thread's share. (With one
  // item a unit, about 1 us of work, both threads claimed from one counter every microsecond
  // and took turns at a row block's panels: on two cores the quickstart's forward and
  // input-gradient products ran at 95-158 GFLOP/s, with runs at 119-210, a sixth less time
  // over 13 shapes; docs/benchmarks.md, 2026-12-02.)
  int64_t block = kTile;
  while (block > 4 && ((M + block - 1) / block) * panels < 2 * threads) block -= 4;
  const int64_t blocks = (M + block - 1) / block, items = blocks * panels;
  const int64_t per_unit = std::max<int64_t>(1, items / (kUnitsPerThread * threads));
  neo::parallel_chunks(pool, packs + (items + per_unit - 1) / per_unit, 1, threads, [&](int64_t first, int64_t last) {
    for (int64_t u = first; u < last; ++u) {
      if (u < packs) {
        pack_panel(u);
        continue;
      }
      for (int64_t t = (u - packs) * per_unit; t < std::min(items, (u - packs + 1) * per_unit); ++t) {
        const int64_t i = (t / panels) * block, p = t % panels;
        wait_panels(p, p + 1);
        rows_of_panel<false>(P, nullptr, i, std::min(P.M, i + block), p, 0, P.K);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

// a, b; a_transposed, b_transposed -> c.
XLA_FFI_DEFINE_HANDLER_SYMBOL(NeoMatmulF32, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("a_transposed")
                                  .Attr<int32_t>("b_transposed")
                                  .Ret<ffi::Buffer<ffi::F32>>());
