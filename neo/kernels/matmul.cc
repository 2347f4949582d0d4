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
// broadcast from wherever it lies, so a transposed a costs nothing. Threads take tiles (a row
// block's panels in turn, so its rows stay in cache).
//
// Exact and reproducible: each output is the float32 sum over k of a[i, k] * b[k, j] in k
// order within blocks of 128 values of k, the blocks then added in order (as decode_product.cc:
// a sum over K = 3072 terms then errs like XLA's own, where one running sum errs 4x more). One
// thread computes each output, so the result does not depend on the thread count.
//
// Built by neo/kernels/cpu.py with the host compiler for the host CPU (-march=native).

#include <algorithm>
#include <cstdint>
#include <cstring>
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

struct Product {
  const float* a;
  int64_t a_row, a_k;  // a[i, k] = a[i * a_row + k * a_k]
  const float* panels;
  int64_t panel_stride, panel_row;  // panel p's row k: panels + p * panel_stride + k * panel_row
  float* c;
  int64_t M, N, K;
};

// c[i .. i + U, panel p's columns] over all k, in blocks of kBlock added in order.
template <int U>
void tile(const Product& P, int64_t i, int64_t p) {
  const float* b = P.panels + p * P.panel_stride;
  const int64_t j0 = p * kPanel, valid = std::min(kPanel, P.N - j0);
  f32x16 total[U][2];
  for (int64_t k0 = 0; k0 < P.K; k0 += kBlock) {
    const int64_t k1 = std::min(P.K, k0 + kBlock);
    f32x16 acc[U][2] = {};
    const float* ak = P.a + i * P.a_row;
    for (int64_t k = k0; k < k1; ++k) {
      const f32x16 b0 = load16(b + k * P.panel_row), b1 = load16(b + k * P.panel_row + 16);
      for (int u = 0; u < U; ++u) {
        const float x = ak[u * P.a_row + k * P.a_k];
        acc[u][0] += x * b0;
        acc[u][1] += x * b1;
      }
    }
    for (int u = 0; u < U; ++u) {
      total[u][0] = k0 ? total[u][0] + acc[u][0] : acc[u][0];
      total[u][1] = k0 ? total[u][1] + acc[u][1] : acc[u][1];
    }
  }
  if (P.K == 0)
    for (int u = 0; u < U; ++u) total[u][0] = total[u][1] = f32x16{};
  for (int u = 0; u < U; ++u) {
    float* row = P.c + (i + u) * P.N + j0;
    if (valid == kPanel) {
      store16(row, total[u][0]);
      store16(row + 16, total[u][1]);
    } else {
      float tmp[kPanel];
      store16(tmp, total[u][0]);
      store16(tmp + 16, total[u][1]);
      std::memcpy(row, tmp, sizeof(float) * valid);
    }
  }
}

// Rows [i, i + rows) of panel p: whole tiles, then the rest 4 and 1 rows at a time.
void rows_of_panel(const Product& P, int64_t i, int64_t rows, int64_t p) {
  int64_t end = i + rows;
  for (; i + kTile <= end; i += kTile) tile<kTile>(P, i, p);
  for (; i + 4 <= end; i += 4) tile<4>(P, i, p);
  for (; i < end; ++i) tile<1>(P, i, p);
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
  if (b_transposed || N % kPanel) {
    scratch.resize(panels * K * kPanel);
    float* dst = scratch.data();
    const float* src = b.typed_data();
    const bool bt = b_transposed != 0;
    neo::parallel_chunks(pool, panels, 1, threads,
                         [=](int64_t first, int64_t last) {
                           for (int64_t p = first; p < last; ++p) pack(src, bt, dst + p * K * kPanel, p, K, N);
                         });
    P.panels = dst;
    P.panel_stride = K * kPanel;
    P.panel_row = kPanel;
  }
  // Units: (block of rows, panel), a row block's panels consecutive; blocks of kTile rows, or
  // fewer rows per block when there are too few blocks to keep every thread busy.
  int64_t block = kTile;
  while (block > 4 && ((M + block - 1) / block) * panels < 2 * threads) block -= 4;
  const int64_t blocks = (M + block - 1) / block;
  neo::parallel_chunks(pool, blocks * panels, 1, threads, [P, block, panels](int64_t first, int64_t last) {
    for (int64_t u = first; u < last; ++u) {
      const int64_t i = (u / panels) * block;
      rows_of_panel(P, i, std::min(block, P.M - i), u % panels);
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
