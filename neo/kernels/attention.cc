// Self-attention for training on CPU, forward and backward: softmax(q k^T * scale + bias + mask) v
// over one sequence, never holding more of the T x T scores than a block of query rows.
//
//   q, k, v [B, T, H, D] float32 or bfloat16 (neo's activation order; k and v already repeated to
//   H heads; bfloat16 is widened to float32 as it is read, and each result rounded once);
//   slopes [H] float32: ALiBi's slopes (the bias -slope_h * |i - j|; all zeros adds nothing);
//   attributes scale (the scores' factor), causal (keys after the query hidden), window (0: none;
//   else keys `window` or more slots away hidden, on both sides when not causal).
//   forward:  -> out [B, T, H, D] (q's dtype)
//   backward: + d_out [B, T, H, D] -> dq, dk, dv [B, T, H, D] (q's dtype)
//
// Why (docs/benchmarks.md, 2026-11-30 "afternoon: training attention on CPU"): in the quickstart
// step XLA:CPU spends about a quarter of the wall time on attention. It writes [B, H, T, T]
// scores, probabilities and their gradients out between a dozen kernels, copies q, k and v into
// heads-first order and back, and zero-fills per-layer stacks for them; PyTorch's fused kernel
// does the same sums in a fifth of the time.
//
// A block's scores are held transposed, one vector per key holding its 16 query rows
// (docs/benchmarks.md, 2026-11-30 "evening"): the softmax's max and sums over keys are then
// sums of whole vectors, masks are lane compares, and only the block's 16 queries need a
// transposed copy (the row-major first version transposed all of k and v and reduced across
// lanes for every row; this one is 1.3-2.2x faster at 64-2048 tokens).
//
// The same sums as neo/model/attention_op.py's dense path (`attend`): float32 scores q . k,
// times scale, plus the ALiBi bias; softmax in float32 (exp(x - max) / sum) over the visible
// keys (the dense path adds -1e10 to the others, whose exp is exactly 0); out = sum p v. The
// backward recomputes each row's probabilities exactly as the forward did, then softmax's
// gradient as jax.nn.softmax's: ds = p * (dp - sum_j p dp), dp = d_out . v. Only the order of
// the additions differs. Each (sequence, head) pair is computed whole by one thread, in a fixed
// order: results do not depend on the thread count or on how a layout splits batch and heads.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "parallel.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using neo::exp16;
using neo::f32x16;
using neo::i32x16;
using neo::load16;
using neo::narrow;
using neo::store16;
using neo::widen;

constexpr int64_t kRows = 16;  // query rows per block: one vector lane each

struct Shape {
  int64_t B, T, H, D;
  float scale;
  bool causal;
  int64_t window;  // 0: none
  int64_t Dp;  // D rounded up to whole vectors (the rows' padding in the scratch buffers)

  // The keys query row i may see: [first(i), last(i)).
  int64_t first(int64_t i) const { return window ? std::max<int64_t>(0, i - window + 1) : 0; }
  int64_t last(int64_t i) const {
    if (causal) return i + 1;
    return window ? std::min<int64_t>(T, i + window) : T;
  }
};

// A block's scores, probabilities and their gradients are held transposed, St[j, r] for key j
// and query row i0 + r: one vector holds one key's 16 rows, so the softmax's max and sums over
// keys are sums of whole vectors (no reduction across lanes) and each mask is a lane compare.

// St[j, r] = sum_d X[j, d] Yt[d, r] for keys j in [j0, j1). X [T, Dp] (keys or values, one row
// each), Yt [D, 16] (the block's queries or output gradients, transposed), St [T, 16]. The sum
// over d runs in order, one product at a time, as the dense path's einsum would on one thread.
void x_yt(const float* X, const float* Yt, float* St, int64_t j0, int64_t j1, const Shape& n) {
  const int64_t D = n.D, Dp = n.Dp;
  int64_t j = j0;
  for (; j + 8 <= j1; j += 8) {
    f32x16 c[8] = {};
    for (int64_t d = 0; d < D; ++d) {
      const f32x16 y = load16(Yt + d * 16);
      for (int u = 0; u < 8; ++u) c[u] += X[(j + u) * Dp + d] * y;
    }
    for (int u = 0; u < 8; ++u) store16(St + (j + u) * 16, c[u]);
  }
  for (; j < j1; ++j) {
    f32x16 c = {};
    for (int64_t d = 0; d < D; ++d) c += X[j * Dp + d] * load16(Yt + d * 16);
    store16(St + j * 16, c);
  }
}

// Y[r, :] = sum_j Pt[j, r] X[j, :] for rows r < R, over the keys rows r .. r + U - 1 see
// together (Pt is zero where a row does not see a key; the ranges only skip work). Pt [T, 16],
// X [T, Dp], Y [R, Dp]. Blocks of U rows x C = Dp / 16 vectors in registers.
template <int C>
void pt_x(const float* Pt, const float* X, float* Y, int64_t R, const int64_t* lo, const int64_t* hi) {
  constexpr int64_t Dp = 16 * C;
  constexpr int U = C <= 2 ? 8 : C <= 4 ? 6 : C <= 6 ? 4 : 3;  // rows at a time: U * C accumulators
  int64_t r = 0;
  for (; r + U <= R; r += U) {
    f32x16 y[U][C] = {};
    int64_t j0 = lo[r], j1 = hi[r];
    for (int u = 1; u < U; ++u) j0 = std::min(j0, lo[r + u]), j1 = std::max(j1, hi[r + u]);
    for (int64_t j = j0; j < j1; ++j) {
      f32x16 x[C];
      for (int c = 0; c < C; ++c) x[c] = load16(X + j * Dp + 16 * c);
      for (int u = 0; u < U; ++u) {
        const float w = Pt[j * 16 + r + u];
        for (int c = 0; c < C; ++c) y[u][c] += w * x[c];
      }
    }
    for (int u = 0; u < U; ++u)
      for (int c = 0; c < C; ++c) store16(Y + (r + u) * Dp + 16 * c, y[u][c]);
  }
  for (; r < R; ++r) {
    f32x16 y[C] = {};
    for (int64_t j = lo[r]; j < hi[r]; ++j) {
      const float w = Pt[j * 16 + r];
      for (int c = 0; c < C; ++c) y[c] += w * load16(X + j * Dp + 16 * c);
    }
    for (int c = 0; c < C; ++c) store16(Y + r * Dp + 16 * c, y[c]);
  }
}

// Y[j, :] += sum_r At[j, r] X[r, :] for keys j in [j0, j1), rows r < R. At [T, 16],
// X [R, Dp], Y [T, Dp]. Blocks of U keys x C vectors; At is zero where row r does not see key j.
template <int C>
void at_x(const float* At, const float* X, float* Y, int64_t R, int64_t j0, int64_t j1) {
  constexpr int64_t Dp = 16 * C;
  constexpr int U = C <= 2 ? 8 : C <= 4 ? 6 : C <= 6 ? 4 : 3;  // keys at a time: U * C accumulators
  int64_t j = j0;
  for (; j + U <= j1; j += U) {
    f32x16 y[U][C] = {};
    for (int64_t r = 0; r < R; ++r) {
      f32x16 x[C];
      for (int c = 0; c < C; ++c) x[c] = load16(X + r * Dp + 16 * c);
      for (int u = 0; u < U; ++u) {
        const float a = At[(j + u) * 16 + r];
        for (int c = 0; c < C; ++c) y[u][c] += a * x[c];
      }
    }
    for (int u = 0; u < U; ++u)
      for (int c = 0; c < C; ++c) store16(Y + (j + u) * Dp + 16 * c, load16(Y + (j + u) * Dp + 16 * c) + y[u][c]);
  }
  for (; j < j1; ++j) {
    f32x16 y[C] = {};
    for (int64_t r = 0; r < R; ++r) {
      const float a = At[j * 16 + r];
      for (int c = 0; c < C; ++c) y[c] += a * load16(X + r * Dp + 16 * c);
    }
    for (int c = 0; c < C; ++c) store16(Y + j * Dp + 16 * c, load16(Y + j * Dp + 16 * c) + y[c]);
  }
}

// The scores St[j, r] (keys j in [j0, j1), rows i0 + r) -> probabilities, in place: S * scale -
// slope |i - j|, softmax over the keys row i sees (the others -inf before the exp, so exactly
// 0 after it). Lanes r >= R are no row; they see every key, so they stay finite, and are never
// read.
void softmax_block(float* St, int64_t i0, int64_t R, int64_t j0, int64_t j1, float slope, const Shape& n) {
  const float inf = std::numeric_limits<float>::infinity();
  const i32x16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const i32x16 row = lane + static_cast<int32_t>(i0);
  const i32x16 pad = lane >= static_cast<int32_t>(R);
  const int32_t window = static_cast<int32_t>(n.window);
  const f32x16 none = f32x16{} - inf;
  f32x16 top = none;
  for (int64_t j = j0; j < j1; ++j) {
    const int32_t key = static_cast<int32_t>(j);
    f32x16 x = load16(St + j * 16);
    if (n.scale != 1.0f) x = x * n.scale;
    if (slope != 0.0f) {
      const f32x16 dist = __builtin_convertvector(row - key, f32x16);  // exact below 2^24
      x += -slope * (dist < 0 ? -dist : dist);
    }
    i32x16 hide = i32x16{};
    if (n.causal) hide |= row < key;                     // key after the query
    if (window) hide |= row >= key + window;             // key `window` or more slots before it
    if (window && !n.causal) hide |= row <= key - window;  // ... or after it
    x = (hide & ~pad) != 0 ? none : x;
    store16(St + j * 16, x);
    top = x > top ? x : top;
  }
  f32x16 total = {};
  for (int64_t j = j0; j < j1; ++j) {
    const f32x16 e = exp16(load16(St + j * 16) - top);  // -inf - top -> below the cut-off -> exactly 0
    store16(St + j * 16, e);
    total += e;
  }
  for (int64_t j = j0; j < j1; ++j) store16(St + j * 16, load16(St + j * 16) / total);
}

// One (sequence, head)'s q, k, v (and d_out) copied out of [B, T, H, D] into [T, Dp] rows,
// zero-padded; a block's queries (and output gradients) also transposed into [D, 16].
struct Scratch {
  neo::aligned_vector<float> q, k, v, g, qt, gt, s, dp, o, dq, dk, dv;  // 16-float rows on cache lines
};

template <typename T>
void gather(const T* x, float* rows, int64_t b, int64_t h, const Shape& n) {
  for (int64_t t = 0; t < n.T; ++t) {
    const T* src = x + ((b * n.T + t) * n.H + h) * n.D;
    float* row = rows + t * n.Dp;
    if constexpr (std::is_same_v<T, float>) {
      std::memcpy(row, src, n.D * sizeof(float));
    } else {
      for (int64_t d = 0; d < n.D; ++d) row[d] = widen(src[d]);
    }
    std::fill(row + n.D, row + n.Dp, 0.0f);
  }
}

// cols[d, r] = rows[r, d] for r < R (the lanes r >= R zero).
void transpose_block(const float* rows, float* cols, int64_t R, const Shape& n) {
  std::fill(cols, cols + n.D * 16, 0.0f);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t d = 0; d < n.D; ++d) cols[d * 16 + r] = rows[r * n.Dp + d];
}

template <typename T>
void scatter(const float* rows, T* x, int64_t b, int64_t h, const Shape& n) {
  for (int64_t t = 0; t < n.T; ++t) {
    T* dst = x + ((b * n.T + t) * n.H + h) * n.D;
    if constexpr (std::is_same_v<T, float>) {
      std::memcpy(dst, rows + t * n.Dp, n.D * sizeof(float));
    } else {
      for (int64_t d = 0; d < n.D; ++d) dst[d] = narrow<T>(rows[t * n.Dp + d]);
    }
  }
}

// The query rows [i0, i0 + R): their key ranges [lo, hi) and the keys any of them sees, [j0, j1).
std::pair<int64_t, int64_t> key_ranges(int64_t i0, int64_t R, int64_t* lo, int64_t* hi, const Shape& n) {
  int64_t j0 = n.T, j1 = 0;
  for (int64_t r = 0; r < R; ++r) {
    lo[r] = n.first(i0 + r);
    hi[r] = n.last(i0 + r);
    j0 = std::min(j0, lo[r]);
    j1 = std::max(j1, hi[r]);
  }
  return {j0, j1};
}

// The block's probabilities, transposed, into w.s [T, 16] over the keys [j0, j1).
void probabilities(Scratch& w, int64_t i0, int64_t R, int64_t j0, int64_t j1, float slope, const Shape& n) {
  transpose_block(w.q.data() + i0 * n.Dp, w.qt.data(), R, n);
  x_yt(w.k.data(), w.qt.data(), w.s.data(), j0, j1, n);
  softmax_block(w.s.data(), i0, R, j0, j1, slope, n);
}

template <int C, typename T>
void forward_pair(const T* q, const T* k, const T* v, const float* slopes, T* out, int64_t b,
                  int64_t h, const Shape& n, Scratch& w) {
  w.q.resize(n.T * n.Dp), w.v.resize(n.T * n.Dp), w.k.resize(n.T * n.Dp), w.qt.resize(n.Dp * 16);
  w.s.resize(n.T * 16), w.o.resize(n.T * n.Dp);
  gather(q, w.q.data(), b, h, n);
  gather(k, w.k.data(), b, h, n);
  gather(v, w.v.data(), b, h, n);
  int64_t lo[kRows], hi[kRows];
  for (int64_t i0 = 0; i0 < n.T; i0 += kRows) {
    const int64_t R = std::min(kRows, n.T - i0);
    const auto [j0, j1] = key_ranges(i0, R, lo, hi, n);
    probabilities(w, i0, R, j0, j1, slopes[h], n);
    pt_x<C>(w.s.data(), w.v.data(), w.o.data() + i0 * n.Dp, R, lo, hi);
  }
  scatter(w.o.data(), out, b, h, n);
}

template <int C, typename T>
void backward_pair(const T* q, const T* k, const T* v, const float* slopes, const T* g, T* dq, T* dk, T* dv,
                   int64_t b, int64_t h, const Shape& n, Scratch& w) {
  const int64_t rows = n.T * n.Dp;
  w.q.resize(rows), w.k.resize(rows), w.v.resize(rows), w.g.resize(rows), w.qt.resize(n.Dp * 16),
      w.gt.resize(n.Dp * 16), w.s.resize(n.T * 16), w.dp.resize(n.T * 16), w.dq.resize(rows), w.dk.resize(rows),
      w.dv.resize(rows);
  gather(q, w.q.data(), b, h, n);
  gather(k, w.k.data(), b, h, n);
  gather(v, w.v.data(), b, h, n);
  gather(g, w.g.data(), b, h, n);
  std::fill(w.dk.begin(), w.dk.end(), 0.0f);
  std::fill(w.dv.begin(), w.dv.end(), 0.0f);
  int64_t lo[kRows], hi[kRows];
  float* s = w.s.data();
  float* ds = w.dp.data();
  for (int64_t i0 = 0; i0 < n.T; i0 += kRows) {
    const int64_t R = std::min(kRows, n.T - i0);
    const auto [j0, j1] = key_ranges(i0, R, lo, hi, n);
    probabilities(w, i0, R, j0, j1, slopes[h], n);
    transpose_block(w.g.data() + i0 * n.Dp, w.gt.data(), R, n);
    x_yt(w.v.data(), w.gt.data(), ds, j0, j1, n);  // dp = d_out . v
    // ds = p (dp - sum_j p dp) * scale, in place (p is exactly 0 where a row does not see a key).
    f32x16 dot = {};
    for (int64_t j = j0; j < j1; ++j) dot += load16(s + j * 16) * load16(ds + j * 16);
    for (int64_t j = j0; j < j1; ++j) store16(ds + j * 16, load16(s + j * 16) * (load16(ds + j * 16) - dot) * n.scale);
    pt_x<C>(ds, w.k.data(), w.dq.data() + i0 * n.Dp, R, lo, hi);          // dq = ds k
    at_x<C>(ds, w.q.data() + i0 * n.Dp, w.dk.data(), R, j0, j1);          // dk += ds^T q
    at_x<C>(s, w.g.data() + i0 * n.Dp, w.dv.data(), R, j0, j1);           // dv += p^T d_out
  }
  scatter(w.dq.data(), dq, b, h, n);
  scatter(w.dk.data(), dk, b, h, n);
  scatter(w.dv.data(), dv, b, h, n);
}

template <typename F>
void for_each_pair(ffi::ThreadPool& pool, const Shape& n, F fn) {
  const int64_t units = n.B * n.H;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  neo::parallel_chunks(pool, units, 1, threads, [=](int64_t first, int64_t last) {
    thread_local Scratch w;
    for (int64_t i = first; i < last; ++i) fn(i / n.H, i % n.H, w);
  });
}

// The pair's work, instantiated for Dp = 16 C (C = 1 .. 8: head sizes up to 128; larger ones
// are refused by `check`, and before tracing by neo/model/attention_op.py cpu_blocker).
#define NEO_DISPATCH(C_EXPR, CALL)        \
  switch (C_EXPR) {                       \
    case 1: { constexpr int C = 1; CALL; } break; \
    case 2: { constexpr int C = 2; CALL; } break; \
    case 3: { constexpr int C = 3; CALL; } break; \
    case 4: { constexpr int C = 4; CALL; } break; \
    case 5: { constexpr int C = 5; CALL; } break; \
    case 6: { constexpr int C = 6; CALL; } break; \
    case 7: { constexpr int C = 7; CALL; } break; \
    case 8: { constexpr int C = 8; CALL; } break; \
  }

template <typename T, ffi::DataType DT>
const T* data(const ffi::Buffer<DT>& x) {
  return reinterpret_cast<const T*>(x.untyped_data());
}

template <ffi::DataType DT>
ffi::Error check(const ffi::Buffer<DT>& q, const ffi::Buffer<DT>& k, const ffi::Buffer<DT>& v,
                 const ffi::Buffer<ffi::F32>& slopes, float scale, int32_t causal, int64_t window, Shape& n) {
  auto qd = q.dimensions();
  if (qd.size() != 4) return ffi::Error::InvalidArgument("training attention: expected q, k, v [B, T, H, D]");
  n = Shape{qd[0], qd[1], qd[2], qd[3], scale, causal != 0, window, (qd[3] + 15) / 16 * 16};
  auto same = [&](const ffi::Buffer<DT>& x) {
    auto d = x.dimensions();
    return d.size() == 4 && d[0] == n.B && d[1] == n.T && d[2] == n.H && d[3] == n.D;
  };
  if (!same(k) || !same(v) || slopes.element_count() != n.H || n.D == 0 || n.D > 128 || n.T == 0 || window < 0)
    return ffi::Error::InvalidArgument("training attention: q, k, v must all be [B, T, H, D] with D <= 128, "
                                       "slopes [H], window >= 0");
  return ffi::Error::Success();
}

// T: the tensors' element type in memory (float, or uint16_t holding bfloat16 bits); DT: XLA's.
template <typename T, ffi::DataType DT>
ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<DT> q, ffi::Buffer<DT> k, ffi::Buffer<DT> v,
                   ffi::Buffer<ffi::F32> slopes, float scale, int32_t causal, int64_t window,
                   ffi::ResultBuffer<DT> out) {
  Shape n;
  if (auto e = check(q, k, v, slopes, scale, causal, window, n); e.failure()) return e;
  const T *qp = data<T>(q), *kp = data<T>(k), *vp = data<T>(v);
  const float* sp = slopes.typed_data();
  T* o = reinterpret_cast<T*>(out->untyped_data());
  for_each_pair(pool, n, [=](int64_t b, int64_t h, Scratch& w) {
    NEO_DISPATCH(n.Dp / 16, (forward_pair<C, T>(qp, kp, vp, sp, o, b, h, n, w)));
  });
  return ffi::Error::Success();
}

template <typename T, ffi::DataType DT>
ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<DT> q, ffi::Buffer<DT> k, ffi::Buffer<DT> v,
                    ffi::Buffer<ffi::F32> slopes, ffi::Buffer<DT> g, float scale, int32_t causal, int64_t window,
                    ffi::ResultBuffer<DT> dq, ffi::ResultBuffer<DT> dk, ffi::ResultBuffer<DT> dv) {
  Shape n;
  if (auto e = check(q, k, v, slopes, scale, causal, window, n); e.failure()) return e;
  if (g.element_count() != q.element_count())
    return ffi::Error::InvalidArgument("training attention: d_out must be [B, T, H, D] as q");
  const T *qp = data<T>(q), *kp = data<T>(k), *vp = data<T>(v), *gp = data<T>(g);
  const float* sp = slopes.typed_data();
  T *dqp = reinterpret_cast<T*>(dq->untyped_data()), *dkp = reinterpret_cast<T*>(dk->untyped_data()),
    *dvp = reinterpret_cast<T*>(dv->untyped_data());
  for_each_pair(pool, n, [=](int64_t b, int64_t h, Scratch& w) {
    NEO_DISPATCH(n.Dp / 16, (backward_pair<C, T>(qp, kp, vp, sp, gp, dqp, dkp, dvp, b, h, n, w)));
  });
  return ffi::Error::Success();
}

// q, k, v, slopes; scale, causal, window -> out.
#define NEO_FORWARD_BINDING(DT)                    \
  ffi::Ffi::Bind()                                 \
      .Ctx<ffi::ThreadPool>()                      \
      .Arg<ffi::Buffer<DT>>()                      \
      .Arg<ffi::Buffer<DT>>()                      \
      .Arg<ffi::Buffer<DT>>()                      \
      .Arg<ffi::Buffer<ffi::F32>>()                \
      .Attr<float>("scale")                        \
      .Attr<int32_t>("causal")                     \
      .Attr<int64_t>("window")                     \
      .Ret<ffi::Buffer<DT>>()

// q, k, v, slopes, d_out; scale, causal, window -> dq, dk, dv.
#define NEO_BACKWARD_BINDING(DT)                   \
  ffi::Ffi::Bind()                                 \
      .Ctx<ffi::ThreadPool>()                      \
      .Arg<ffi::Buffer<DT>>()                      \
      .Arg<ffi::Buffer<DT>>()                      \
      .Arg<ffi::Buffer<DT>>()                      \
      .Arg<ffi::Buffer<ffi::F32>>()                \
      .Arg<ffi::Buffer<DT>>()                      \
      .Attr<float>("scale")                        \
      .Attr<int32_t>("causal")                     \
      .Attr<int64_t>("window")                     \
      .Ret<ffi::Buffer<DT>>()                      \
      .Ret<ffi::Buffer<DT>>()                      \
      .Ret<ffi::Buffer<DT>>()

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NeoAttentionForwardF32, (Forward<float, ffi::F32>), NEO_FORWARD_BINDING(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(NeoAttentionForwardBF16, (Forward<uint16_t, ffi::BF16>),
                              NEO_FORWARD_BINDING(ffi::BF16));
XLA_FFI_DEFINE_HANDLER_SYMBOL(NeoAttentionBackwardF32, (Backward<float, ffi::F32>), NEO_BACKWARD_BINDING(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(NeoAttentionBackwardBF16, (Backward<uint16_t, ffi::BF16>),
                              NEO_BACKWARD_BINDING(ffi::BF16));
