// 16-float vectors and the host CPU's own (kLanes floats: GCC/Clang vector extensions, compiled
// for the host CPU with -march=native) and the few operations on them that neo's CPU kernels
// share: loads of float32 and bfloat16, a store, float32 <-> bfloat16 one value at a time, the
// pairwise sum of the lanes, and exp.

#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#if defined(__AVX2__) && !defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace neo {

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline f32x16 load16(const uint16_t* p) {  // bfloat16 bits -> float32: the high half of the word
  u16x16 h;
  std::memcpy(&h, p, sizeof h);
  return (f32x16)(__builtin_convertvector(h, u32x16) << 16);
}

inline void store16(float* p, f32x16 v) { std::memcpy(p, &v, sizeof v); }

// The host CPU's own vector, kLanes floats: 16 with AVX-512, else 8 (AVX2). The decode kernels
// compute on it, so they run on either without splitting vectors or spilling registers; the
// training kernels are written for 16-float vectors only (neo/kernels/cpu.py).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float f32xL __attribute__((vector_size(4 * kLanes)));
typedef uint16_t u16xL __attribute__((vector_size(2 * kLanes)));
typedef uint32_t u32xL __attribute__((vector_size(4 * kLanes)));
typedef int32_t i32xL __attribute__((vector_size(4 * kLanes)));

inline f32xL loadL(const float* p) {
  f32xL v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

#if defined(__AVX2__) && !defined(__AVX512F__)
inline f32xL loadL(const uint16_t* p) {  // bfloat16 bits -> float32, one widening load and a shift
  // (GCC makes the generic version below two 128-bit widenings, a shuffle and an insert)
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return (f32xL)_mm256_slli_epi32(w, 16);
}
#else
inline f32xL loadL(const uint16_t* p) {  // bfloat16 bits -> float32: the high half of the word
  u16xL h;
  std::memcpy(&h, p, sizeof h);
  return (f32xL)(__builtin_convertvector(h, u32xL) << 16);
}
#endif

inline void storeL(float* p, f32xL v) { std::memcpy(p, &v, sizeof v); }

// One value of a float32 or bfloat16 (its bits, uint16_t) tensor as float32 (exact), and back.
inline float widen(float x) { return x; }
inline float widen(uint16_t bits) {  // bfloat16 -> float32: the high half of the word
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// float32 -> T, rounded to nearest even (as XLA's convert), NaN kept a NaN.
template <typename T>
T narrow(float x);
template <>
inline float narrow<float>(float x) { return x; }
template <>
inline uint16_t narrow<uint16_t>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}

template <typename F>
inline float sum_lanes(F v) {  // the lanes added pairwise (halves, then quarters, ...)
  constexpr int n = sizeof(F) / sizeof(float);
  float t[n];
  std::memcpy(t, &v, sizeof t);
  for (int w = n / 2; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) t[i] += t[i + w];
  return t[0];
}
inline float sum16(f32x16 v) { return sum_lanes(v); }
inline float sumL(f32xL v) { return sum_lanes(v); }

// exp(x) for a vector of floats (F: f32x16 or f32xL; I: the int32 vector of as many lanes):
// 2^n * e^r with n = round(x / ln 2) and |r| <= ln 2 / 2, e^r by its degree-6 Taylor
// polynomial (Cephes' expf: within 2 ulp of the exact value, as XLA:CPU's own polynomial);
// below -87.3 it is 0, as a softmax over masked scores (-1e10, -inf) needs.
template <typename F, typename I>
inline F exp_lanes(F x) {
  const F hi = F{} + 88.0f, lo = F{} - 87.3365447505531f;
  F under = (F)(x < lo);  // all-ones lanes where e^x is below the smallest normal float
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  F n = x * 1.44269504088896341f + 0.5f;
  I ni = __builtin_convertvector(n, I);
  ni -= (I)(__builtin_convertvector(ni, F) > n) & 1;  // floor
  F fn = __builtin_convertvector(ni, F);
  F r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
  F p = 1.9875691500e-4f + r * 0.0f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  F scale = (F)((ni + 127) << 23);
  return (F)((I)(p * scale) & ~(I)under);
}

inline f32x16 exp16(f32x16 x) { return exp_lanes<f32x16, i32x16>(x); }
inline f32xL expL(f32xL x) { return exp_lanes<f32xL, i32xL>(x); }

// Scratch whose data starts on a 64-byte cache line. std::vector's own does not: glibc returns
// a large block 16 bytes past a page boundary, so every 16-float load from it spans two cache
// lines. On the Xeon, one thread, matmul.cc's products from packed panels ran 10-13% slower that
// way (docs/benchmarks.md, 2026-12-01 "scratch on cache lines").
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) {
    void* p = std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64);
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t) { std::free(p); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};
template <typename T>
using aligned_vector = std::vector<T, CacheLineAllocator<T>>;

}  // namespace neo
