// float32 vectors of W lanes through GCC/Clang vector extensions. kLanes is the native width of
// the build (16 with AVX-512, 8 with AVX2, 4 with SSE2 or NEON), chosen by the -m flags the
// including file is built with: that is how csrc/cpu/paged_attention.cpp is built once per
// instruction set. Narrower vectors (W < kLanes) serve work with few lanes to fill; wider than
// native must not be used (some operations are then lowered to scalar code).
#pragma once

#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
// GCC 12 reports its own AVX-512 intrinsics (their _mm512_undefined_* sources) as maybe
// uninitialized once inlined: the diagnostic is about the header, not about this code.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

namespace stopkit::cpu {
// Internal linkage: each instruction-set build of paged_attention.cpp compiles these with its own
// -m flags, and the linker must not pick one build's copy for another's calls.
namespace {

constexpr float kLog2e = 1.44269504088896341f;

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX2__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif

// The vector types themselves (GCC needs a literal vector_size: no template-dependent sizes).
template <int W>
struct VecTypes;
template <>
struct VecTypes<4> {
  typedef float f __attribute__((vector_size(16)));
  typedef int32_t i __attribute__((vector_size(16)));
};
template <>
struct VecTypes<8> {
  typedef float f __attribute__((vector_size(32)));
  typedef int32_t i __attribute__((vector_size(32)));
};
template <>
struct VecTypes<16> {
  typedef float f __attribute__((vector_size(64)));
  typedef int32_t i __attribute__((vector_size(64)));
};

template <int W>
struct Vec {
  using f = typename VecTypes<W>::f;
  using i = typename VecTypes<W>::i;

  static inline f broadcast(float x) { return f{} + x; }
  static inline f max(f a, f b) { return a > b ? a : b; }
  static inline float reduce_max(f v) {
    float m = v[0];
    for (int k = 1; k < W; ++k) m = m > v[k] ? m : v[k];
    return m;
  }

  // exp(x) for softmax arguments (any x in [-87, 88]): x = n ln2 + r with |r| <= ln2 / 2, a
  // degree-7 Taylor polynomial for e^r (relative error < 3e-8), 2^n by building the exponent
  // bits (AVX-512: vscalefps). Arguments below -87 give about 1e-38, not 0: callers mask what must
  // be 0.
  __attribute__((always_inline)) static inline f exp(f x) {
    x = x < -87.0f ? broadcast(-87.0f) : x;
    x = x > 88.0f ? broadcast(88.0f) : x;
#if defined(__AVX512F__)
    if constexpr (W == 16) {  // the same steps, n by vrndscaleps and p * 2^n by vscalefps
      const __m512 n =
          _mm512_roundscale_ps((__m512)(x * kLog2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const f r = (x - (f)n * 0.693145751953125f) - (f)n * 1.428606765330187e-06f;
      return (f)_mm512_scalef_ps((__m512)taylor7(r), n);
    }
#endif
    const f t = x * kLog2e;
    const f half = t >= 0.0f ? broadcast(0.5f) : broadcast(-0.5f);
    const i n = __builtin_convertvector(t + half, i);  // round half away from zero
    const f nf = __builtin_convertvector(n, f);
    const f r = (x - nf * 0.693145751953125f) - nf * 1.428606765330187e-06f;  // Cody-Waite
    const i bits = (n + 127) << 23;
    f scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return taylor7(r) * scale;
  }

#if defined(__AVX512F__)
  // 2^t (16 lanes): t = n + r with |r| <= 1/2 (vrndscaleps), a degree-5 minimax polynomial for
  // 2^r (relative error < 2e-7, under 2 float32 ulps), times 2^n by vscalefps, so any t below the
  // float range gives 0 and no clamping is needed; -inf gives NaN: callers mask it.
  __attribute__((always_inline)) static inline f exp2(f t) {
    static_assert(W == 16, "exp2: AVX-512 vectors only");
    const __m512 n = _mm512_roundscale_ps((__m512)t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const f r = t - (f)n;
    f p = broadcast(1.3264709850773215e-3f);
    p = p * r + 9.671507403254509e-3f;
    p = p * r + 5.550733581185341e-2f;
    p = p * r + 2.4022242426872253e-1f;
    p = p * r + 6.931470036506653e-1f;
    p = p * r + 1.0f;  // exactly 1 at t = 0: a correction exp(m - m) must be 1, not 1 + 1e-7
    return (f)_mm512_scalef_ps((__m512)p, n);
  }
#endif

  // e^r for |r| <= ln2 / 2: the degree-7 Taylor polynomial.
  __attribute__((always_inline)) static inline f taylor7(f r) {
    f p = broadcast(1.0f / 5040.0f);
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    return p * r + 1.0f;
  }
};

}  // namespace
}  // namespace stopkit::cpu
