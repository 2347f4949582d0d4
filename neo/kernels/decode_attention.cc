// A decode step's attention on CPU: each row's one new key and value are written into the KV
// cache in place, then its query attends to the cache's slots (reading only the blocks that
// hold visible ones: visible_blocks).
//
//   q [B, H, D], k_new and v_new [B, G, D], the caches [B, G, S, D] (heads before slots, as
//   neo/model/attention.py keeps them; G kv heads, each serving H / G query heads), all in one
//   dtype (float32 or bfloat16); slot: where the new key goes (clamped into the cache, as XLA's
//   dynamic-update-slice does); bias [B, 1 or H, S] float32: 0 where the key is visible,
//   -1e10 where not, plus ALiBi's bias where the model has it; scale: the scores' factor.
//   -> out [B, H, D] in the cache's dtype, and the two caches (aliased to the inputs: XLA hands
//   the same buffers back, so the write is in place).
//
// Why (docs/benchmarks.md, 2026-11-30 "decode attention on CPU"): XLA:CPU rewrites a bfloat16
// cache whole at every step (it widens the dynamic-update-slice to float32 and rounds the whole
// result back), then copies the keys and values into float32 to multiply them: about 14 bytes
// of memory traffic per cached value per step where reading it once is 2, a quarter of a
// bfloat16 decode step at batch 8 and more as the context grows.
//
// The same sums as neo/model/attention_op.py's dense path: float32 scores from q and k in
// their dtype (exact products), times scale, plus bias; softmax in float32 (exp(x - max) /
// sum); the probabilities rounded to the cache's dtype; their products with the values summed
// in float32 and rounded once. Only the order of the additions differs. Threads divide the
// (row, kv head) pairs between them, never a sum, so results do not depend on the thread count.
//
// On the CPU's own vectors (vec.h's kLanes: 16 floats with AVX-512, 8 with AVX2), so either
// keeps a head's query and sums in registers (docs/benchmarks.md, "decoding on a CPU without
// AVX-512").

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using neo::expL;
using neo::f32xL;
using neo::kLanes;
using neo::loadL;
using neo::narrow;
using neo::storeL;
using neo::sumL;
using neo::u32xL;
using neo::widen;

template <typename T>
float dot(const float* q, const T* k, int64_t D) {
  f32xL acc = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) acc += loadL(q + d) * loadL(k + d);
  float s = sumL(acc);
  for (; d < D; ++d) s += q[d] * widen(k[d]);
  return s;
}

// A probability rounded to the cache's dtype and widened back (float32: as it is).
inline f32xL as_dtype(f32xL x, float*) { return x; }
inline f32xL as_dtype(f32xL x, uint16_t*) {  // round to nearest even, keep the high half
  u32xL u = (u32xL)x;
  u += 0x7fffu + ((u >> 16) & 1u);
  return (f32xL)(u & 0xffff0000u);
}

struct Shape {
  int64_t B, H, G, S, D, bias_heads;
  float scale;
};

// x [S] <- softmax(x * scale + bias), each probability rounded to T (as attend's probs.astype).
template <typename T>
void softmax(float* x, const float* bias, float scale, int64_t S) {
  const int64_t SL = S / kLanes * kLanes;
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < S; ++s) {
    x[s] = (scale == 1.0f ? x[s] : x[s] * scale) + bias[s];
    top = std::max(top, x[s]);
  }
  f32xL total = {};
  for (int64_t s = 0; s < SL; s += kLanes) {
    f32xL e = expL(loadL(x + s) - top);
    storeL(x + s, e);
    total += e;
  }
  float sum = sumL(total);
  if (SL < S) {  // the tail, through the padded scratch: lanes past S do not count
    float tail[kLanes] = {};
    for (int64_t s = SL; s < S; ++s) tail[s - SL] = x[s] - top;
    f32xL e = expL(loadL(tail));
    for (int64_t s = SL; s < S; ++s) sum += (x[s] = e[s - SL]);
  }
  for (int64_t s = 0; s < SL; s += kLanes) storeL(x + s, as_dtype(loadL(x + s) / sum, (T*)nullptr));
  for (int64_t s = SL; s < S; ++s) x[s] = widen(narrow<T>(x[s] / sum));
}

// One query head over the S slots of its kv head: scores into x [S], softmax, then the
// probabilities' sum of the values into y [D]. C > 0: D = kLanes C, the query and the sums
// held in C vectors; C = 0: any D, through memory.
template <typename T, int C>
void attend_head(const float* q, const T* K, const T* V, const float* bias, float scale, int64_t S, int64_t D,
                 float* x, float* y) {
  if constexpr (C > 0) {
    f32xL qv[C], acc[C] = {};
    for (int c = 0; c < C; ++c) qv[c] = loadL(q + kLanes * c);
    for (int64_t s = 0; s < S; ++s) {
      f32xL a = qv[0] * loadL(K + s * D);
      for (int c = 1; c < C; ++c) a += qv[c] * loadL(K + s * D + kLanes * c);
      x[s] = sumL(a);
    }
    softmax<T>(x, bias, scale, S);
    for (int64_t s = 0; s < S; ++s)
      for (int c = 0; c < C; ++c) acc[c] += x[s] * loadL(V + s * D + kLanes * c);
    for (int c = 0; c < C; ++c) storeL(y + kLanes * c, acc[c]);
  } else {
    for (int64_t s = 0; s < S; ++s) x[s] = dot(q, K + s * D, D);
    softmax<T>(x, bias, scale, S);
    std::fill(y, y + D, 0.0f);
    const int64_t DL = D / kLanes * kLanes;
    for (int64_t s = 0; s < S; ++s) {
      const T* v = V + s * D;
      for (int64_t d = 0; d < DL; d += kLanes) storeL(y + d, loadL(y + d) + x[s] * loadL(v + d));
      for (int64_t d = DL; d < D; ++d) y[d] += x[s] * widen(v[d]);
    }
  }
}

// Calls f(std::integral_constant<int, C>()) for C in 0 .. 128 / kLanes: the head's vectors as a
// compile-time constant (0: any head size, through memory).
template <int C = 1, typename F>
void with_vectors(int64_t vectors, F f) {
  if constexpr (C > 128 / kLanes) {
    return f(std::integral_constant<int, 0>());
  } else {
    if (vectors == C) return f(std::integral_constant<int, C>());
    return with_vectors<C + 1>(vectors, f);
  }
}

// The slots [first, last) one head reads: from the first visible slot's block of kLanes to the
// end of the last visible one's (bias above kHidden; all S where none is). The blocks outside
// hold masked slots only, whose probabilities are exactly 0 (exp_lanes of -1e10): the same
// max, the same vector lanes and scalar tail in softmax, and the same sums over the values, to
// the bit, without reading their keys and values. A sampler's cache has room for the prompt and
// every token still to come (neo/predict.py), so a step reads only the part written so far:
// gpt_neo_125M float32 at batch 8, 32 prompt tokens, decoded at 189.4 against 171.6 tok/s for
// 256 new tokens, 189.6 against 182.9 for 64 (interleaved in one process, the same tokens;
// docs/benchmarks.md, 2026-12-02 "morning, later").
constexpr float kHidden = -1e9f;  // masked slots' bias is -1e10 (attention_op.NEG_INF), plus ALiBi's

inline void visible_blocks(const float* bias, int64_t S, int64_t& first, int64_t& last) {
  int64_t lo = 0, hi = S;
  while (lo < S && !(bias[lo] > kHidden)) ++lo;
  if (lo == S) {  // nothing visible: every slot, as before
    first = 0, last = S;
    return;
  }
  while (!(bias[hi - 1] > kHidden)) --hi;
  first = lo / kLanes * kLanes;
  last = std::min(S, (hi + kLanes - 1) / kLanes * kLanes);
}

// Row b, kv head g: its R = H / G query heads h0 .. h0 + R - 1, one after the other (the kv
// head's keys and values stay in cache between them). scratch: S scores, D query and D sums.
template <typename T>
void attend(const Shape& n, const T* q, const T* keys, const T* values, const float* bias, T* out, int64_t b,
            int64_t g, neo::aligned_vector<float>& scratch) {
  const int64_t R = n.H / n.G, h0 = g * R, S = n.S, D = n.D;
  scratch.resize(S + 2 * D);
  float *x = scratch.data(), *qf = x + S, *y = qf + D;
  const T* K = keys + (b * n.G + g) * S * D;
  const T* V = values + (b * n.G + g) * S * D;
  for (int64_t h = h0; h < h0 + R; ++h) {
    for (int64_t d = 0; d < D; ++d) qf[d] = widen(q[(b * n.H + h) * D + d]);
    const float* c = bias + (b * n.bias_heads + (n.bias_heads == 1 ? 0 : h)) * S;
    int64_t first, last;
    visible_blocks(c, S, first, last);
    with_vectors(D % kLanes == 0 && D <= 128 ? D / kLanes : 0, [&](auto C) {
      attend_head<T, decltype(C)::value>(qf, K + first * D, V + first * D, c + first, n.scale, last - first, D, x, y);
    });
    for (int64_t d = 0; d < D; ++d) out[(b * n.H + h) * D + d] = narrow<T>(y[d]);
  }
}

template <typename A, typename B>
bool same(const A& a, const B& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return false;
  return true;
}

template <typename T, ffi::DataType DT>
ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<DT> q, ffi::Buffer<DT> k_new, ffi::Buffer<DT> v_new,
                     ffi::Buffer<DT> k_cache, ffi::Buffer<DT> v_cache, ffi::Buffer<ffi::S32> slot,
                     ffi::Buffer<ffi::F32> bias, float scale, ffi::ResultBuffer<DT> out,
                     ffi::ResultBuffer<DT> k_out, ffi::ResultBuffer<DT> v_out) {
  auto qd = q.dimensions(), nd = k_new.dimensions(), cd = k_cache.dimensions(), bd = bias.dimensions();
  if (qd.size() != 3 || nd.size() != 3 || cd.size() != 4 || bd.size() != 3 || slot.element_count() != 1)
    return ffi::Error::InvalidArgument("expected q [B, H, D], k_new [B, G, D], caches [B, G, S, D], bias [B, 1|H, S]");
  Shape n{qd[0], qd[1], nd[1], cd[2], qd[2], bd[1], scale};
  if (nd[0] != n.B || nd[2] != n.D || cd[0] != n.B || cd[1] != n.G || cd[3] != n.D || n.G == 0 || n.H % n.G ||
      !same(v_new.dimensions(), nd) || !same(v_cache.dimensions(), cd) || bd[0] != n.B || bd[2] != n.S ||
      (n.bias_heads != 1 && n.bias_heads != n.H) || n.S == 0)
    return ffi::Error::InvalidArgument("decode attention: shapes do not agree (q [B, H, D], k_new/v_new [B, G, D], "
                                       "caches [B, G, S, D] with G dividing H, bias [B, 1|H, S])");
  const int64_t row = n.S * n.D, cache = n.B * n.G * row;
  T* kc = reinterpret_cast<T*>(k_out->untyped_data());
  T* vc = reinterpret_cast<T*>(v_out->untyped_data());
  // XLA aliases the outputs to the inputs (the same buffers); copy only where it did not.
  if (kc != k_cache.untyped_data()) std::memcpy(kc, k_cache.untyped_data(), cache * sizeof(T));
  if (vc != v_cache.untyped_data()) std::memcpy(vc, v_cache.untyped_data(), cache * sizeof(T));
  const int64_t at = std::min<int64_t>(std::max<int64_t>(slot.typed_data()[0], 0), n.S - 1);
  const T* kn = reinterpret_cast<const T*>(k_new.untyped_data());
  const T* vn = reinterpret_cast<const T*>(v_new.untyped_data());
  for (int64_t i = 0; i < n.B * n.G; ++i) {
    std::memcpy(kc + i * row + at * n.D, kn + i * n.D, n.D * sizeof(T));
    std::memcpy(vc + i * row + at * n.D, vn + i * n.D, n.D * sizeof(T));
  }
  const T* qp = reinterpret_cast<const T*>(q.untyped_data());
  const float* bp = bias.typed_data();
  T* o = reinterpret_cast<T*>(out->untyped_data());
  // Threads only where there is enough to read: about 256 KiB of cache per thread.
  const int64_t units = n.B * n.G, bytes = 2 * cache * static_cast<int64_t>(sizeof(T));
  const int64_t threads = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), 1 + bytes / (256 << 10));
  neo::parallel_chunks(pool, units, std::max<int64_t>(1, units / (4 * threads)), threads,
                       [=, &n](int64_t first, int64_t last) {
                         thread_local neo::aligned_vector<float> scratch;
                         for (int64_t i = first; i < last; ++i) attend(n, qp, kc, vc, bp, o, i / n.G, i % n.G, scratch);
                       });
  return ffi::Error::Success();
}

// q, k_new, v_new, k_cache, v_cache, slot, bias, scale -> out, k_cache, v_cache (updated in place).
#define NEO_ATTENTION_BINDING(DT)                                                                    \
  ffi::Ffi::Bind()                                                                                 \
      .Ctx<ffi::ThreadPool>()                                                                      \
      .Arg<ffi::Buffer<DT>>()                                                                      \
      .Arg<ffi::Buffer<DT>>()                                                                      \
      .Arg<ffi::Buffer<DT>>()                                                                      \
      .Arg<ffi::Buffer<DT>>()                                                                      \
      .Arg<ffi::Buffer<DT>>()                                                                      \
      .Arg<ffi::Buffer<ffi::S32>>()                                                                \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                \
      .Attr<float>("scale")                                                                        \
      .Ret<ffi::Buffer<DT>>()                                                                      \
      .Ret<ffi::Buffer<DT>>()                                                                      \
      .Ret<ffi::Buffer<DT>>()

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NeoDecodeAttentionF32, (Attention<float, ffi::F32>), NEO_ATTENTION_BINDING(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(NeoDecodeAttentionBF16, (Attention<uint16_t, ffi::BF16>),
                              NEO_ATTENTION_BINDING(ffi::BF16));
