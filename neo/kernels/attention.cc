// Self-attention for training on CPU, forward and backward: softmax(q k^T * scale + bias + mask) v
// over one sequence, never holding more of the T x T scores than a block of query rows.
//
//   q, k, v [B, T, H, D] float32 (neo's activation order; k and v already repeated to H heads);
//   slopes [H] float32: ALiBi's slopes (the bias -slope_h * |i - j|; all zeros adds nothing);
//   attributes scale (the scores' factor), causal (keys after the query hidden), window (0: none;
//   else keys `window` or more slots away hidden, on both sides when not causal).
//   forward:  -> out [B, T, H, D]
//   backward: + d_out [B, T, H, D] -> dq, dk, dv [B, T, H, D]
//
// Why (docs/benchmarks.md, 2026-11-30 "afternoon: training attention on CPU"): in the quickstart
// step XLA:CPU spends about a quarter of the wall time on attention. It writes [B, H, T, T]
// scores, probabilities and their gradients out between a dozen kernels, copies q, k and v into
// heads-first order and back, and zero-fills per-layer stacks for them; PyTorch's fused kernel
// does the same sums in a fifth of the time.
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
#include <utility>
#include <vector>

#include "parallel.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using neo::exp16;
using neo::f32x16;
using neo::load16;
using neo::store16;
using neo::sum16;

constexpr int64_t kRows = 16;  // query rows per block: scores held [kRows, T]

struct Shape {
  int64_t B, T, H, D;
  float scale;
  bool causal;
  int64_t window;  // 0: none
  int64_t Dp, Tp;  // D and T rounded up to whole vectors (the scratch buffers' padding)

  // The keys query row i may see: [first(i), last(i)).
  int64_t first(int64_t i) const { return window ? std::max<int64_t>(0, i - window + 1) : 0; }
  int64_t last(int64_t i) const {
    if (causal) return i + 1;
    return window ? std::min<int64_t>(T, i + window) : T;
  }
};

// C[r, j] = sum_d A[r, d] Bt[d, j] for rows r < R and columns j in [j0, j1) (whole vectors:
// j0 and the width rounded to 16, the padding of Bt makes that safe). A [R, Dp], Bt [Dp, Tp],
// C [R, Tp]. Blocks of 4 rows x 2 vectors in registers.
void a_bt(const float* A, const float* Bt, float* C, int64_t R, int64_t j0, int64_t j1, const Shape& n) {
  j0 = j0 / 16 * 16;
  j1 = (j1 + 15) / 16 * 16;
  const int64_t Dp = n.Dp, Tp = n.Tp;
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) {
    int64_t j = j0;
    for (; j + 32 <= j1; j += 32) {
      f32x16 c[4][2] = {};
      for (int64_t d = 0; d < Dp; ++d) {
        f32x16 b0 = load16(Bt + d * Tp + j), b1 = load16(Bt + d * Tp + j + 16);
        for (int u = 0; u < 4; ++u) {
          float a = A[(r + u) * Dp + d];
          c[u][0] += a * b0;
          c[u][1] += a * b1;
        }
      }
      for (int u = 0; u < 4; ++u) {
        store16(C + (r + u) * Tp + j, c[u][0]);
        store16(C + (r + u) * Tp + j + 16, c[u][1]);
      }
    }
    for (; j < j1; j += 16) {
      f32x16 c[4] = {};
      for (int64_t d = 0; d < Dp; ++d) {
        f32x16 b0 = load16(Bt + d * Tp + j);
        for (int u = 0; u < 4; ++u) c[u] += A[(r + u) * Dp + d] * b0;
      }
      for (int u = 0; u < 4; ++u) store16(C + (r + u) * Tp + j, c[u]);
    }
  }
  for (; r < R; ++r)
    for (int64_t j = j0; j < j1; j += 16) {
      f32x16 c = {};
      for (int64_t d = 0; d < Dp; ++d) c += A[r * Dp + d] * load16(Bt + d * Tp + j);
      store16(C + r * Tp + j, c);
    }
}

// Y[r, :] = sum_j P[r, j] X[j, :] for rows r < R, over the keys rows r .. r + 3 see together
// (P is zero where a row does not see a key; the ranges only skip work). P [R, Tp], X [T, Dp],
// Y [R, Dp]. Blocks of 4 rows x C = Dp / 16 vectors in registers.
template <int C>
void p_x(const float* P, const float* X, float* Y, int64_t R, const int64_t* lo, const int64_t* hi, int64_t Tp) {
  constexpr int64_t Dp = 16 * C;
  constexpr int U = C <= 4 ? 4 : 2;  // rows at a time: U * C accumulators
  int64_t r = 0;
  for (; r + U <= R; r += U) {
    f32x16 y[U][C] = {};
    int64_t j0 = lo[r], j1 = hi[r];
    for (int u = 1; u < U; ++u) j0 = std::min(j0, lo[r + u]), j1 = std::max(j1, hi[r + u]);
    for (int64_t j = j0; j < j1; ++j) {
      f32x16 x[C];
      for (int c = 0; c < C; ++c) x[c] = load16(X + j * Dp + 16 * c);
      for (int u = 0; u < U; ++u) {
        const float w = P[(r + u) * Tp + j];
        for (int c = 0; c < C; ++c) y[u][c] += w * x[c];
      }
    }
    for (int u = 0; u < U; ++u)
      for (int c = 0; c < C; ++c) store16(Y + (r + u) * Dp + 16 * c, y[u][c]);
  }
  for (; r < R; ++r) {
    f32x16 y[C] = {};
    for (int64_t j = lo[r]; j < hi[r]; ++j) {
      const float w = P[r * Tp + j];
      for (int c = 0; c < C; ++c) y[c] += w * load16(X + j * Dp + 16 * c);
    }
    for (int c = 0; c < C; ++c) store16(Y + r * Dp + 16 * c, y[c]);
  }
}

// Y[j, :] += sum_r A[r, j] X[r, :] for keys j in [j0, j1), rows r < R. A [R, Tp], X [R, Dp],
// Y [T, Dp]. Blocks of 4 keys; A is zero where row r does not see key j.
template <int C>
void at_x(const float* A, const float* X, float* Y, int64_t R, int64_t j0, int64_t j1, int64_t Tp) {
  constexpr int64_t Dp = 16 * C;
  int64_t j = j0;
  for (; j + 4 <= j1; j += 4) {
    f32x16 y[4][C] = {};
    for (int64_t r = 0; r < R; ++r) {
      f32x16 x[C];
      for (int c = 0; c < C; ++c) x[c] = load16(X + r * Dp + 16 * c);
      for (int u = 0; u < 4; ++u) {
        const float a = A[r * Tp + j + u];
        for (int c = 0; c < C; ++c) y[u][c] += a * x[c];
      }
    }
    for (int u = 0; u < 4; ++u)
      for (int c = 0; c < C; ++c) store16(Y + (j + u) * Dp + 16 * c, load16(Y + (j + u) * Dp + 16 * c) + y[u][c]);
  }
  for (; j < j1; ++j) {
    f32x16 y[C] = {};
    for (int64_t r = 0; r < R; ++r) {
      const float a = A[r * Tp + j];
      for (int c = 0; c < C; ++c) y[c] += a * load16(X + r * Dp + 16 * c);
    }
    for (int c = 0; c < C; ++c) store16(Y + j * Dp + 16 * c, load16(Y + j * Dp + 16 * c) + y[c]);
  }
}

// Row i's scores S[j] (j in [lo, hi), the rest of [0, Tp) set to 0) -> its probabilities:
// (S * scale - slope |i - j|), softmax over [lo, hi).
void softmax_row(float* S, int64_t i, int64_t lo, int64_t hi, float slope, const Shape& n) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = lo; j < hi; ++j) {
    float x = n.scale == 1.0f ? S[j] : S[j] * n.scale;
    if (slope != 0.0f) x += -slope * static_cast<float>(i > j ? i - j : j - i);
    S[j] = x;
    top = std::max(top, x);
  }
  const int64_t v0 = lo / 16 * 16, v1 = (hi + 15) / 16 * 16;
  for (int64_t j = v0; j < lo; ++j) S[j] = -std::numeric_limits<float>::infinity();
  for (int64_t j = hi; j < v1; ++j) S[j] = -std::numeric_limits<float>::infinity();
  f32x16 total = {};
  for (int64_t j = v0; j < v1; j += 16) {
    f32x16 e = exp16(load16(S + j) - top);  // -inf - top -> below the cut-off -> exactly 0
    store16(S + j, e);
    total += e;
  }
  const float sum = sum16(total);
  for (int64_t j = v0; j < v1; j += 16) store16(S + j, load16(S + j) / sum);
  std::fill(S, S + v0, 0.0f);
  std::fill(S + v1, S + n.Tp, 0.0f);
}

// One (sequence, head)'s q, k, v (and d_out) copied out of [B, T, H, D] into [T, Dp] rows,
// zero-padded; keys and values also transposed into [Dp, Tp].
struct Scratch {
  std::vector<float> q, k, v, kt, vt, g, s, dp, o, dq, dk, dv;
};

void gather(const float* x, float* rows, int64_t b, int64_t h, const Shape& n) {
  for (int64_t t = 0; t < n.T; ++t) {
    const float* src = x + ((b * n.T + t) * n.H + h) * n.D;
    std::memcpy(rows + t * n.Dp, src, n.D * sizeof(float));
    std::fill(rows + t * n.Dp + n.D, rows + (t + 1) * n.Dp, 0.0f);
  }
}

void transpose(const float* rows, float* cols, const Shape& n) {
  std::fill(cols, cols + n.Dp * n.Tp, 0.0f);
  for (int64_t t = 0; t < n.T; ++t)
    for (int64_t d = 0; d < n.D; ++d) cols[d * n.Tp + t] = rows[t * n.Dp + d];
}

void scatter(const float* rows, float* x, int64_t b, int64_t h, const Shape& n) {
  for (int64_t t = 0; t < n.T; ++t)
    std::memcpy(x + ((b * n.T + t) * n.H + h) * n.D, rows + t * n.Dp, n.D * sizeof(float));
}

// The query rows [i0, i0 + R): their key ranges [lo, hi), scores and probabilities into w.s
// [R, Tp]; returns the keys any of them sees, [j0, j1).
std::pair<int64_t, int64_t> probabilities(Scratch& w, int64_t i0, int64_t R, int64_t* lo, int64_t* hi, float slope,
                                          const Shape& n) {
  int64_t j0 = n.T, j1 = 0;
  for (int64_t r = 0; r < R; ++r) {
    lo[r] = n.first(i0 + r);
    hi[r] = n.last(i0 + r);
    j0 = std::min(j0, lo[r]);
    j1 = std::max(j1, hi[r]);
  }
  a_bt(w.q.data() + i0 * n.Dp, w.kt.data(), w.s.data(), R, j0, j1, n);
  for (int64_t r = 0; r < R; ++r) softmax_row(w.s.data() + r * n.Tp, i0 + r, lo[r], hi[r], slope, n);
  return {j0, j1};
}

template <int C>
void forward_pair(const float* q, const float* k, const float* v, const float* slopes, float* out, int64_t b,
                  int64_t h, const Shape& n, Scratch& w) {
  w.q.resize(n.T * n.Dp), w.v.resize(n.T * n.Dp), w.k.resize(n.T * n.Dp), w.kt.resize(n.Dp * n.Tp);
  w.s.resize(kRows * n.Tp), w.o.resize(n.T * n.Dp);
  gather(q, w.q.data(), b, h, n);
  gather(k, w.k.data(), b, h, n);
  gather(v, w.v.data(), b, h, n);
  transpose(w.k.data(), w.kt.data(), n);
  int64_t lo[kRows], hi[kRows];
  for (int64_t i0 = 0; i0 < n.T; i0 += kRows) {
    const int64_t R = std::min(kRows, n.T - i0);
    probabilities(w, i0, R, lo, hi, slopes[h], n);
    p_x<C>(w.s.data(), w.v.data(), w.o.data() + i0 * n.Dp, R, lo, hi, n.Tp);
  }
  scatter(w.o.data(), out, b, h, n);
}

template <int C>
void backward_pair(const float* q, const float* k, const float* v, const float* slopes, const float* g, float* dq,
                   float* dk, float* dv, int64_t b, int64_t h, const Shape& n, Scratch& w) {
  const int64_t rows = n.T * n.Dp;
  w.q.resize(rows), w.k.resize(rows), w.v.resize(rows), w.g.resize(rows), w.kt.resize(n.Dp * n.Tp),
      w.vt.resize(n.Dp * n.Tp), w.s.resize(kRows * n.Tp), w.dp.resize(kRows * n.Tp), w.dq.resize(rows),
      w.dk.resize(rows), w.dv.resize(rows);
  gather(q, w.q.data(), b, h, n);
  gather(k, w.k.data(), b, h, n);
  gather(v, w.v.data(), b, h, n);
  gather(g, w.g.data(), b, h, n);
  transpose(w.k.data(), w.kt.data(), n);
  transpose(w.v.data(), w.vt.data(), n);
  std::fill(w.dk.begin(), w.dk.end(), 0.0f);
  std::fill(w.dv.begin(), w.dv.end(), 0.0f);
  int64_t lo[kRows], hi[kRows];
  for (int64_t i0 = 0; i0 < n.T; i0 += kRows) {
    const int64_t R = std::min(kRows, n.T - i0);
    const auto [j0, j1] = probabilities(w, i0, R, lo, hi, slopes[h], n);
    a_bt(w.g.data() + i0 * n.Dp, w.vt.data(), w.dp.data(), R, j0, j1, n);  // dp = d_out . v
    for (int64_t r = 0; r < R; ++r) {  // ds = p (dp - sum_j p dp) * scale, into dp
      float* p = w.s.data() + r * n.Tp;
      float* d = w.dp.data() + r * n.Tp;
      float dot = 0.0f;
      for (int64_t j = lo[r]; j < hi[r]; ++j) dot += p[j] * d[j];
      for (int64_t j = j0 / 16 * 16; j < (j1 + 15) / 16 * 16; ++j)
        d[j] = (j >= lo[r] && j < hi[r]) ? p[j] * (d[j] - dot) * n.scale : 0.0f;
    }
    p_x<C>(w.dp.data(), w.k.data(), w.dq.data() + i0 * n.Dp, R, lo, hi, n.Tp);  // dq = ds k
    at_x<C>(w.dp.data(), w.q.data() + i0 * n.Dp, w.dk.data(), R, j0, j1, n.Tp);        // dk += ds^T q
    at_x<C>(w.s.data(), w.g.data() + i0 * n.Dp, w.dv.data(), R, j0, j1, n.Tp);         // dv += p^T d_out
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

ffi::Error check(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k, const ffi::Buffer<ffi::F32>& v,
                 const ffi::Buffer<ffi::F32>& slopes, float scale, int32_t causal, int64_t window, Shape& n) {
  auto qd = q.dimensions();
  if (qd.size() != 4) return ffi::Error::InvalidArgument("training attention: expected q, k, v [B, T, H, D]");
  n = Shape{qd[0], qd[1], qd[2], qd[3], scale, causal != 0, window, (qd[3] + 15) / 16 * 16, (qd[1] + 15) / 16 * 16};
  auto same = [&](const ffi::Buffer<ffi::F32>& x) {
    auto d = x.dimensions();
    return d.size() == 4 && d[0] == n.B && d[1] == n.T && d[2] == n.H && d[3] == n.D;
  };
  if (!same(k) || !same(v) || slopes.element_count() != n.H || n.D == 0 || n.D > 128 || n.T == 0 || window < 0)
    return ffi::Error::InvalidArgument("training attention: q, k, v must all be [B, T, H, D] with D <= 128, "
                                       "slopes [H], window >= 0");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::F32> slopes, float scale, int32_t causal, int64_t window,
                   ffi::ResultBuffer<ffi::F32> out) {
  Shape n;
  if (auto e = check(q, k, v, slopes, scale, causal, window, n); e.failure()) return e;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(), *sp = slopes.typed_data();
  float* o = out->typed_data();
  for_each_pair(pool, n, [=](int64_t b, int64_t h, Scratch& w) {
    NEO_DISPATCH(n.Dp / 16, (forward_pair<C>(qp, kp, vp, sp, o, b, h, n, w)));
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::F32> slopes, ffi::Buffer<ffi::F32> g, float scale, int32_t causal,
                    int64_t window, ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv) {
  Shape n;
  if (auto e = check(q, k, v, slopes, scale, causal, window, n); e.failure()) return e;
  if (g.element_count() != q.element_count())
    return ffi::Error::InvalidArgument("training attention: d_out must be [B, T, H, D] as q");
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(), *sp = slopes.typed_data(),
              *gp = g.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  for_each_pair(pool, n, [=](int64_t b, int64_t h, Scratch& w) {
    NEO_DISPATCH(n.Dp / 16, (backward_pair<C>(qp, kp, vp, sp, gp, dqp, dkp, dvp, b, h, n, w)));
  });
  return ffi::Error::Success();
}

}  // namespace

// q, k, v, slopes; scale, causal, window -> out.
XLA_FFI_DEFINE_HANDLER_SYMBOL(NeoAttentionForwardF32, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("causal")
                                  .Attr<int64_t>("window")
                                  .Ret<ffi::Buffer<ffi::F32>>());

// q, k, v, slopes, d_out; scale, causal, window -> dq, dk, dv.
XLA_FFI_DEFINE_HANDLER_SYMBOL(NeoAttentionBackwardF32, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("causal")
                                  .Attr<int64_t>("window")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
