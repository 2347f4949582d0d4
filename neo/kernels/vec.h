// 16-float vectors (GCC/Clang vector extensions, compiled for the host CPU with -march=native)
// and the few operations on them that neo's CPU kernels share: loads of float32 and bfloat16,
// a store, float32 <-> bfloat16 one value at a time, the pairwise sum of the lanes, and exp.

#pragma once

#include <cstdint>
#include <cstring>

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

inline float sum16(f32x16 v) {  // the 16 lanes added pairwise (halves, then quarters, ...)
  float t[16];
  std::memcpy(t, &v, sizeof t);
  for (int w = 8; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) t[i] += t[i + w];
  return t[0];
}

// exp(x) for 16 floats: 2^n * e^r with n = round(x / ln 2) and |r| <= ln 2 / 2, e^r by its
// degree-6 Taylor polynomial (Cephes' expf: within 2 ulp of the exact value, as XLA:CPU's own
// polynomial); below -87.3 it is 0, as a softmax over masked scores (-1e10, -inf) needs.
inline f32x16 exp16(f32x16 x) {
  const f32x16 hi = f32x16{} + 88.0f, lo = f32x16{} - 87.3365447505531f;
  f32x16 under = (f32x16)(x < lo);  // all-ones lanes where e^x is below the smallest normal float
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  f32x16 n = x * 1.44269504088896341f + 0.5f;
  i32x16 ni = __builtin_convertvector(n, i32x16);
  ni -= (i32x16)(__builtin_convertvector(ni, f32x16) > n) & 1;  // floor
  f32x16 fn = __builtin_convertvector(ni, f32x16);
  f32x16 r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
  f32x16 p = 1.9875691500e-4f + r * 0.0f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  f32x16 scale = (f32x16)((ni + 127) << 23);
  return (f32x16)((i32x16)(p * scale) & ~(i32x16)under);
}

}  // namespace neo
