// bfloat16 caches in the avx512bf16 build (part of paged_attention.cpp): keys are not converted;
// vdpbf16ps multiplies bf16 pairs read straight from the page and accumulates in float32. It runs
// at the float32 FMA FLOP rate but on fewer ports, so P V stays float32 FMAs, with lanes over dims
// (every lane useful whatever the number of queries):
//   S[t][m]   = scale * sum_p K[t][2p:2p+2] . Qp[p][m]   (Qp: Q as bf16 pairs, lanes over queries)
//   O[m][d'] += sum_t P[t][m] * V[t][d']                 (V unpacked to float32, dims d' permuted
//                                                         inside each 32, undone on output)
#pragma once

#include <cstdint>
#include <cstring>

#include "query_lanes.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace stopkit::cpu::STOPKIT_ISA {
namespace {

#if defined(__AVX512BF16__)
// The slot order of value rows unpacked to float32 (values_as_float): unpacklo/unpackhi of 16-bit
// elements work inside 128-bit lanes, so each 32 slots hold dims 0-3, 8-11, 16-19, 24-27, then 4-7,
// 12-15, 20-23, 28-31 (a tail of 16: 0-3, 8-11, then 4-7, 12-15). slots_to_dims puts a row of O
// back in dim order, two permutes per 32 dims.
inline void slots_to_dims(const float* slots, int64_t D, float* dims) {
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second =
      _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) {
    const __m512 lo = _mm512_loadu_ps(slots + d), hi = _mm512_loadu_ps(slots + d + 16);
    _mm512_storeu_ps(dims + d, _mm512_permutex2var_ps(lo, first, hi));
    _mm512_storeu_ps(dims + d + 16, _mm512_permutex2var_ps(lo, second, hi));
  }
  if (d < D) {
    const __m512i tail = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15);
    _mm512_storeu_ps(dims + d, _mm512_permutexvar_ps(tail, _mm512_loadu_ps(slots + d)));
  }
}

template <int W>
inline typename Vec<W>::f dot_bf16_pairs(typename Vec<W>::f acc, typename Vec<W>::i a,
                                         typename Vec<W>::i b) {
  using vfloat = typename Vec<W>::f;
  if constexpr (W == 16) return (vfloat)_mm512_dpbf16_ps((__m512)acc, (__m512bh)a, (__m512bh)b);
  else if constexpr (W == 8) return (vfloat)_mm256_dpbf16_ps((__m256)acc, (__m256bh)a, (__m256bh)b);
  else return (vfloat)_mm_dpbf16_ps((__m128)acc, (__m128bh)a, (__m128bh)b);
}

// S = scale * K Qt for a tile of n bf16 keys, rows `rs` elements apart, read from the page.
template <int W, int MV, int kD>
inline void scores_bf16(Pass<W, MV>& w, const uint16_t* k, int64_t rs, int64_t n, int64_t D,
                        float scale) {
  using vfloat = typename Vec<W>::f;
  using vint = typename Vec<W>::i;
  const int64_t pairs = (kD ? kD : D) / 2;
  constexpr int TB = register_block(MV);
  auto key_pair = [&](int64_t t, int64_t pr) {
    int32_t x;
    std::memcpy(&x, k + t * rs + 2 * pr, 4);
    return vint{} + x;
  };
  int64_t t = 0;
  for (; t + TB <= n; t += TB) {
    vfloat acc[TB][MV];
    for (int b = 0; b < TB; ++b)
      for (int j = 0; j < MV; ++j) acc[b][j] = vfloat{};
    for (int64_t pr = 0; pr < pairs; ++pr) {
      vint q[MV];
      for (int j = 0; j < MV; ++j) q[j] = w.q_pairs[pr * MV + j];
      for (int b = 0; b < TB; ++b) {
        const vint kb = key_pair(t + b, pr);
        for (int j = 0; j < MV; ++j) acc[b][j] = dot_bf16_pairs<W>(acc[b][j], kb, q[j]);
      }
    }
    for (int b = 0; b < TB; ++b)
      for (int j = 0; j < MV; ++j) w.s[t + b][j] = acc[b][j] * scale;
  }
  for (; t < n; ++t) {
    vfloat acc[MV];
    for (int j = 0; j < MV; ++j) acc[j] = vfloat{};
    for (int64_t pr = 0; pr < pairs; ++pr) {
      const vint kb = key_pair(t, pr);
      for (int j = 0; j < MV; ++j) acc[j] = dot_bf16_pairs<W>(acc[j], kb, w.q_pairs[pr * MV + j]);
    }
    for (int j = 0; j < MV; ++j) w.s[t][j] = acc[j] * scale;
  }
}

// n bf16 value rows, `rs` elements apart, as float32 rows [n][D'] (a bf16 is the top half of a
// float32: one unpack with zero per 16 values), in the slot order above.
inline void values_as_float(const uint16_t* v, int64_t rs, int64_t n, int64_t D, float* out) {
  for (int64_t t = 0; t < n; ++t) {
    const uint16_t* row = v + t * rs;
    float* o = out + t * D;
    int64_t d = 0;
    for (; d + 32 <= D; d += 32) {
      const __m512i x = _mm512_loadu_si512(row + d), zero = _mm512_setzero_si512();
      _mm512_storeu_si512(o + d, _mm512_unpacklo_epi16(zero, x));
      _mm512_storeu_si512(o + d + 16, _mm512_unpackhi_epi16(zero, x));
    }
    if (d < D) {  // 16 dims left
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + d));
      const __m256i zero = _mm256_setzero_si256();
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + d), _mm256_unpacklo_epi16(zero, x));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + d + 8), _mm256_unpackhi_epi16(zero, x));
    }
  }
}

// One tile of n bf16 keys and values at positions pos0 .. pos0+n-1 (rows `rs` elements apart, read
// in place), for the first `active` query lanes; P V on the values unpacked to float32 in buf.v
// (stepping buf.prefetch per key of each span).
template <int W, int MV, int kD>
inline void attend_tile_bf16(Pass<W, MV>& w, const uint16_t* k, const uint16_t* v, int64_t rs,
                             int64_t n, int64_t D, float scale, float pos0, bool masked,
                             bool suffix, int64_t active, TileBuffers& buf) {
  scores_bf16<W, MV, kD>(w, k, rs, n, D, scale);
  typename Vec<W>::f corr[MV];
  const bool changed = softmax_tile(w, n, pos0, masked, suffix, corr);
  values_as_float(v, rs, n, D, buf.v.data());
  const int64_t d_len = kD ? kD : D;
  float* o = reinterpret_cast<float*>(w.ot.data());
  const float* p = reinterpret_cast<const float*>(w.s);
  const float* corr_f = reinterpret_cast<const float*>(corr);
  pv_queries<kD, MV * W>(active, o, D, p, MV * W, buf.v.data(), d_len, n, corr_f, changed,
                         &buf.prefetch);
}
#endif

}  // namespace
}  // namespace stopkit::cpu::STOPKIT_ISA
