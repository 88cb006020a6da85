// Shared definitions of stopkit's native ops: dtype codes, bf16/fp16 <-> float conversion and
// argument checks. Framework-agnostic: no libtorch, no Python; CPU and CUDA both include it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <iterator>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define STOPKIT_HOST_DEVICE __host__ __device__ __forceinline__
#else
// Always inlined: the CPU kernels are compiled once per instruction set, and an out-of-line copy
// (one weak symbol for all builds) could run one build's instructions in another.
#define STOPKIT_HOST_DEVICE inline __attribute__((always_inline))
#endif

namespace stopkit {

// The ops take a dtype as its code; stopkit/ops.py reads the codes from dtype_codes() (bindings.h).
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
// torch's name of each code, indexed by code.
inline constexpr const char* kDTypeNames[] = {"float32", "float16", "bfloat16"};
static_assert(std::size(kDTypeNames) == static_cast<size_t>(DType::kBFloat16) + 1);

inline DType dtype_from_code(int64_t code) {
  if (code < 0 || code >= static_cast<int64_t>(std::size(kDTypeNames)))
    throw std::invalid_argument("dtype code must be 0, 1 or 2, got " + std::to_string(code));
  return static_cast<DType>(code);
}

// Thrown for bad arguments; pybind11 turns std::invalid_argument into ValueError.
#define STOPKIT_CHECK(cond, msg)                                                \
  do {                                                                          \
    if (!(cond)) throw std::invalid_argument(std::string("stopkit: ") + (msg)); \
  } while (0)

// bf16 is the top half of a float32; round to nearest even on the way down.
STOPKIT_HOST_DEVICE float bf16_bits_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

STOPKIT_HOST_DEVICE uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u)
    return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

}  // namespace stopkit
