// Element loads/stores between the cache dtypes and float32 on the CPU. Written so GCC and Clang
// vectorise the row loops (bf16 is a shift; fp16 uses _Float16 / __fp16 where the target has it).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "stopkit/common.h"

namespace stopkit::cpu {
// Internal linkage: each instruction-set build of paged_attention.cpp compiles these with its own
// -m flags, and the linker must not pick one build's copy for another's calls.
namespace {

#if defined(__aarch64__)
using half_t = __fp16;
#define STOPKIT_NATIVE_HALF 1
#elif defined(__FLT16_MAX__)
using half_t = _Float16;
#define STOPKIT_NATIVE_HALF 1
#else
#define STOPKIT_NATIVE_HALF 0
#endif

inline float fp16_bits_to_float(uint16_t h) {
#if STOPKIT_NATIVE_HALF
  half_t x;
  std::memcpy(&x, &h, 2);
  return static_cast<float>(x);
#else
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (mant << 13);
  } else {
    float f = static_cast<float>(mant) * 5.9604644775390625e-8f;  // 2^-24
    std::memcpy(&u, &f, 4);
    u |= sign;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

inline uint16_t float_to_fp16_bits(float f) {
#if STOPKIT_NATIVE_HALF
  half_t x = static_cast<half_t>(f);
  uint16_t h;
  std::memcpy(&h, &x, 2);
  return h;
#else
  // Round to nearest even, with subnormals, infinities and NaN.
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);
  if (u >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to inf
  if (u < 0x38800000u) {                                               // subnormal or zero in fp16
    float a;
    std::memcpy(&a, &u, 4);
    a += 0.5f;  // aligns the fp16 subnormal grid to the float mantissa's last bits
    uint32_t b;
    std::memcpy(&b, &a, 4);
    return static_cast<uint16_t>(sign | (b - 0x3f000000u));
  }
  const uint32_t mant_odd = (u >> 13) & 1u;
  u += 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round
  return static_cast<uint16_t>(sign | (u >> 13));
#endif
}

template <DType D>
struct Elem;
template <>
struct Elem<DType::kFloat32> {
  using T = float;
  static inline float load(T x) { return x; }
  static inline T store(float x) { return x; }
};
template <>
struct Elem<DType::kFloat16> {
  using T = uint16_t;
  static inline float load(T x) { return fp16_bits_to_float(x); }
  static inline T store(float x) { return float_to_fp16_bits(x); }
};
template <>
struct Elem<DType::kBFloat16> {
  using T = uint16_t;
  static inline float load(T x) { return bf16_bits_to_float(x); }
  static inline T store(float x) { return float_to_bf16_bits(x); }
};

inline size_t dtype_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

template <DType D>
using DTypeTag = std::integral_constant<DType, D>;

// Calls f(DTypeTag<d>{}): the dtype becomes a compile-time constant, decltype(tag)::value.
template <typename F>
inline void dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::kFloat32: f(DTypeTag<DType::kFloat32>{}); break;
    case DType::kFloat16: f(DTypeTag<DType::kFloat16>{}); break;
    case DType::kBFloat16: f(DTypeTag<DType::kBFloat16>{}); break;
  }
}

}  // namespace
}  // namespace stopkit::cpu
