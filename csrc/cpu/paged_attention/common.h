// What every variant of the CPU paged_attention kernel shares: tile and register constants, which
// path a dtype takes in this build, the state of a pass over the queries (Pass) and the per-thread
// tile buffers. Like the other headers of this folder it is part of paged_attention.cpp, compiled
// once per instruction set: everything sits in that build's namespace, with internal linkage.
#pragma once

#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "prefetch.h"
#include "stopkit/cpu/convert.h"
#include "stopkit/cpu/vec.h"

#ifndef STOPKIT_ISA
#error "STOPKIT_ISA must name the instruction-set build (generic, avx2, avx512, avx512bf16, amx)"
#endif

namespace stopkit::cpu::STOPKIT_ISA {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kMasked = -1e30f;  // running max of a lane that has seen nothing yet
constexpr int kTile = 16;          // keys per tile (never crosses a page: block_size >= 8)
constexpr int kMaxVecs = 4;        // queries per pass: up to kMaxVecs * kLanes
// Vector registers: 32 zmm with AVX-512, else 16 (ymm, xmm; NEON has 32 but 16 is plenty).
#if defined(__AVX512F__)
constexpr int kVecRegs = 32;
#else
constexpr int kVecRegs = 16;
#endif

// How many keys (or dims) to block over so blocks x MV accumulators + MV operands stay in registers.
constexpr int register_block(int mv) {
  int fit = (kVecRegs - mv) / mv;
  fit = fit < 1 ? 1 : (fit > 8 ? 8 : fit);
  int pow2 = 1;
  while (pow2 * 2 <= fit) pow2 *= 2;
  return pow2;
}

// n rows of D elements, `stride` elements apart, as float32 rows `stride` apart: float32 input is
// read in place; other dtypes are converted into dst (and the stride becomes D).
template <DType DT, int kD>
inline const float* rows_as_float(const typename Elem<DT>::T* src, int64_t& stride, int64_t n,
                                  int64_t D, float* dst) {
  if constexpr (DT == DType::kFloat32) {
    return src;
  } else {
    const int64_t d = kD ? kD : D;
    for (int64_t t = 0; t < n; ++t) {
      const auto* s = src + t * stride;
      float* o = dst + t * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) o[i] = Elem<DT>::load(s[i]);
    }
    stride = d;
    return dst;
  }
}

#if defined(__AVX512BF16__)
constexpr bool kHasBf16Dot = true;
#else
constexpr bool kHasBf16Dot = false;
#endif
// bf16 caches take the vdpbf16ps path where the build has it.
template <DType DT>
constexpr bool kBf16Dot = kHasBf16Dot && DT == DType::kBFloat16;
#if defined(__AMX_BF16__)
constexpr bool kHasAmx = true;
#else
constexpr bool kHasAmx = false;
#endif
// ... and run on AMX tiles in the amx build, when head_dim is a multiple of 32 (a tile row is 32
// bf16), with 16 query lanes per vector (a tile row of S).
inline bool use_amx(DType dtype, int64_t D) {
  return kHasAmx && dtype == DType::kBFloat16 && D % 32 == 0;
}

// State of one pass over the queries [m0, m0 + MV*W) of a work item: W lanes per vector.
template <int W, int MV>
struct Pass {
  using vf = typename Vec<W>::f;
  using vi = typename Vec<W>::i;
  // Float path: qt = scale * Q and ot = O, both [D][MV] (lanes over queries).
  // bf16 dot path: q_pairs = Q as bf16 pairs [D/2][MV]; ot is O as float32 [MV*W][D'] (lanes over
  // dims, in the slot order of bf16_dot.h).
  // Float path in 16-lane AVX-512 passes: Qt as dim pairs instead of qt, qt_pairs [D/2][pair_vecs]
  // (8 queries per vector; see scores_paired).
  std::vector<vf> qt, ot, qt_pairs;
  std::vector<vi> q_pairs;
  int pair_vecs = 0;
  vf m[MV], l[MV], lower[MV], qidx[MV];
  vf s[kTile][MV];
};

// Per-thread buffers of one tile (the suffix is a tile too: q_len <= 16 = kTile keys): its keys
// and values as float32 where the cache holds 16-bit values (bf16 dot path: values only).
#if defined(__AMX_BF16__)
struct BlockBuffers;
#endif
struct TileBuffers {
  std::vector<float> k, v;
  Prefetcher prefetch;
#if defined(__AMX_BF16__)
  std::unique_ptr<BlockBuffers> block;  // where use_amx
#endif
  explicit TileBuffers(int64_t D) : k(kTile * D), v(kTile * D) {}
};

}  // namespace
}  // namespace stopkit::cpu::STOPKIT_ISA
