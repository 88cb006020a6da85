// Native-width float32 vectors through GCC/Clang vector extensions: 16 lanes (zmm) on AVX-512, 8
// (ymm) on AVX2, 4 (xmm) on SSE2 or NEON, chosen by the -m flags the including file is built with;
// that is how csrc/cpu/paged_attention.cpp is built once per instruction set. (Wider-than-native
// vectors are lowered to scalar code for some operations, so the width must match the target.)
#pragma once

#include <cstdint>
#include <cstring>

namespace stopkit::cpu {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX2__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float vfloat __attribute__((vector_size(4 * kLanes)));
typedef int32_t vint __attribute__((vector_size(4 * kLanes)));

inline vfloat vbroadcast(float x) { return vfloat{} + x; }

inline vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }

inline vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }

inline float vreduce_max(vfloat v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = m > v[i] ? m : v[i];
  return m;
}

// exp(x) for x <= 0 arguments of a softmax (works for any x in [-87, 88]): x = n ln2 + r with
// |r| <= ln2 / 2, a degree-7 Taylor polynomial for e^r (relative error < 3e-8), 2^n by building
// the exponent bits. Arguments below -87 give about 1e-38, not 0: callers mask what must be 0.
inline vfloat vexp(vfloat x) {
  x = x < -87.0f ? vbroadcast(-87.0f) : x;
  x = x > 88.0f ? vbroadcast(88.0f) : x;
  const vfloat t = x * 1.44269504088896341f;
  const vfloat half = t >= 0.0f ? vbroadcast(0.5f) : vbroadcast(-0.5f);
  const vint n = __builtin_convertvector(t + half, vint);  // round half away from zero
  const vfloat nf = __builtin_convertvector(n, vfloat);
  const vfloat r = (x - nf * 0.693145751953125f) - nf * 1.428606765330187e-06f;  // Cody-Waite
  vfloat p = vbroadcast(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vint bits = (n + 127) << 23;
  vfloat scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

}  // namespace stopkit::cpu
