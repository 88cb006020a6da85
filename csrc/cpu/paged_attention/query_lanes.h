// Float lanes over queries (part of paged_attention.cpp): the M = G * q_len queries of a kv head
// sit in the vector lanes (Q kept transposed, [D][M]), so a tile of keys costs broadcast-FMAs with
// no horizontal reductions:
//   S[t][m]   = sum_d K[t][d] * Qt[d][m]              (keys of the tile, converted to float32)
//   Ot[d][m] += sum_t V[t][d] * P[t][m]               (online softmax, one running max per lane)
// except that 16-lane passes of the AVX-512 builds run P V with lanes over dims (pv_queries:
// O[m][d] += P[t][m] V[t][d], a broadcast of P per query), so queries that fill a vector only
// partly cost no FMAs there, and S by dim pairs (scores_paired: 8 queries x 2 dims per vector, a
// 64-bit broadcast of K per pair of dims), so that S too pays only for the queries in use to the
// nearest 8. The tile softmax and pv_queries serve the bf16 dot path too.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common.h"

namespace stopkit::cpu::STOPKIT_ISA {
namespace {

#if defined(__AVX512F__)
// S in the 16-lane float passes of the AVX-512 builds (scores calls it), by pairs of dims: lane
// 2i + h of pair vector v holds query 8v + i at dim 2p + h (qt_pairs [D/2][P], P = pair_vecs), so
// K[t][2p : 2p + 2] is one 64-bit broadcast for all P vectors: a load per P FMAs, where a broadcast
// per dim costs a load per FMA at one query vector (and the load ports, not the FMAs, set the
// pace). Neighbour lanes are then added and pair vectors 2j, 2j + 1 gathered into S vector j (a
// lone last one into lanes 0..7, repeated in 8..15; no output reads those).
template <int MV, int P, int TB, int kD>
inline void scores_paired_block(Pass<16, MV>& w, const float* k, int64_t rs, int64_t t, int64_t D) {
  const int64_t d_len = kD ? kD : D;
  __m512 acc[TB][P];
#pragma GCC unroll 8
  for (int b = 0; b < TB; ++b)
    for (int v = 0; v < P; ++v) acc[b][v] = _mm512_setzero_ps();
  const __m512* qp = w.qt_pairs.data();
  for (int64_t d = 0; d < d_len; d += 2, qp += P) {
    __m512 q[P];
    for (int v = 0; v < P; ++v) q[v] = qp[v];
#pragma GCC unroll 8
    for (int b = 0; b < TB; ++b) {
      double pair;
      std::memcpy(&pair, k + (t + b) * rs + d, sizeof pair);
      const __m512 kp = _mm512_castpd_ps(_mm512_set1_pd(pair));
      for (int v = 0; v < P; ++v) acc[b][v] = _mm512_fmadd_ps(kp, q[v], acc[b][v]);
    }
  }
  // evens of the first operand, then (16 + i: of the second) evens of the second
  const __m512i evens =
      _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
#pragma GCC unroll 8
  for (int b = 0; b < TB; ++b) {
    __m512 sums[P];
    for (int v = 0; v < P; ++v)
      sums[v] = _mm512_add_ps(acc[b][v], _mm512_permute_ps(acc[b][v], 0xB1));
    for (int j = 0; 2 * j + 1 < P; ++j)
      w.s[t + b][j] = _mm512_permutex2var_ps(sums[2 * j], evens, sums[2 * j + 1]);
    if constexpr (P % 2 == 1) w.s[t + b][P / 2] = _mm512_permutexvar_ps(evens, sums[P - 1]);
  }
}

// Keys per scores_paired_block at P pair vectors: TB * P accumulators, P operands and the
// broadcast stay in the 32 registers.
constexpr int paired_block_keys(int P) { return P <= 3 ? 8 : (P <= 6 ? 4 : 2); }
// pf steps after each full block of S: with P V's steps alone the memory would idle through S;
// more, or steps inside the block, cost more than they gain (a step is ~10 cycles).
constexpr int kScoreBlockSteps = 2;

// scores_paired_block over a tile of n keys, P = w.pair_vecs (<= 2 MV), stepping pf.
template <int MV, int kD, int P = 2 * MV>
inline void scores_paired(Pass<16, MV>& w, const float* k, int64_t rs, int64_t n, int64_t D,
                          Prefetcher& pf) {
  if constexpr (P > 1) {
    if (w.pair_vecs < P) return scores_paired<MV, kD, P - 1>(w, k, rs, n, D, pf);
  }
  constexpr int TB = paired_block_keys(P);
  int64_t t = 0;
  for (; t + TB <= n; t += TB) {
    scores_paired_block<MV, P, TB, kD>(w, k, rs, t, D);
    for (int i = 0; i < kScoreBlockSteps; ++i) pf.step();
  }
  for (; t < n; ++t) scores_paired_block<MV, P, 1, kD>(w, k, rs, t, D);
}
#endif

// S = K Qt for a tile of n keys, rows `rs` floats apart (16-lane passes step pf).
template <int W, int MV, int kD>
inline void scores(Pass<W, MV>& w, const float* k, int64_t rs, int64_t n, int64_t D,
                   [[maybe_unused]] Prefetcher& pf) {
  using vfloat = typename Vec<W>::f;
#if defined(__AVX512F__)
  if constexpr (W == 16) return scores_paired<MV, kD>(w, k, rs, n, D, pf);
#endif
  const int64_t d_len = kD ? kD : D;
  constexpr int TB = register_block(MV);
  // TB keys at a time so each Qt load feeds TB FMAs.
  int64_t t = 0;
  for (; t + TB <= n; t += TB) {
    vfloat acc[TB][MV];
    for (int b = 0; b < TB; ++b)
      for (int j = 0; j < MV; ++j) acc[b][j] = vfloat{};
    for (int64_t d = 0; d < d_len; ++d) {
      vfloat q[MV];
      for (int j = 0; j < MV; ++j) q[j] = w.qt[d * MV + j];
      for (int b = 0; b < TB; ++b) {
        const float kb = k[(t + b) * rs + d];
        for (int j = 0; j < MV; ++j) acc[b][j] += kb * q[j];
      }
    }
    for (int b = 0; b < TB; ++b)
      for (int j = 0; j < MV; ++j) w.s[t + b][j] = acc[b][j];
  }
  for (; t < n; ++t) {
    vfloat acc[MV];
    for (int j = 0; j < MV; ++j) acc[j] = vfloat{};
    for (int64_t d = 0; d < d_len; ++d) {
      const float kb = k[t * rs + d];
      for (int j = 0; j < MV; ++j) acc[j] += kb * w.qt[d * MV + j];
    }
    for (int j = 0; j < MV; ++j) w.s[t][j] = acc[j];
  }
}

// exp(x - m) for softmax: in 16-lane AVX-512 passes as 2^((x - m) log2 e) (Vec::exp2, fewer
// instructions). Not as an FMA x log2 e - m log2 e: with m at kMasked, the exact product against
// the rounded one leaves a difference of ~1e23.
template <int W>
inline typename Vec<W>::f exp_diff(typename Vec<W>::f x, typename Vec<W>::f m) {
#if defined(__AVX512F__)
  if constexpr (W == 16) return Vec<16>::exp2((x - m) * kLog2e);
#endif
  return Vec<W>::exp(x - m);
}

// Online softmax over the tile's scores w.s (keys at positions pos0 .. pos0+n-1): masks (masked: a
// window or suffix applies; suffix: query lane with suffix index s sees tile key t only when
// t <= s), new running max, w.s becomes P = exp(S - m_new) (0 where masked), l = l * corr + sum P.
// Returns whether any running max moved (else corr is all ones).
template <int W, int MV>
inline bool softmax_tile(Pass<W, MV>& w, int64_t n, float pos0, bool masked, bool suffix,
                         typename Vec<W>::f (&corr)[MV]) {
  using V = Vec<W>;
  using vfloat = typename V::f;
  vfloat m_new[MV];
  bool changed = false;
  for (int j = 0; j < MV; ++j) {
    vfloat tmax = V::broadcast(kMasked);
    for (int64_t tt = 0; tt < n; ++tt) {
      if (masked) {
        const float pos = pos0 + static_cast<float>(tt);
        auto ok = pos >= w.lower[j];
        if (suffix) ok = ok & (static_cast<float>(tt) <= w.qidx[j]);
        w.s[tt][j] = ok ? w.s[tt][j] : V::broadcast(kNegInf);
      }
      tmax = V::max(tmax, w.s[tt][j]);
    }
    m_new[j] = V::max(w.m[j], tmax);
    corr[j] = exp_diff<W>(w.m[j], m_new[j]);
    changed |= V::reduce_max(m_new[j] - w.m[j]) > 0.0f;
  }
  for (int j = 0; j < MV; ++j) {
    vfloat lsum = w.l[j] * corr[j];
    for (int64_t tt = 0; tt < n; ++tt) {
      const vfloat sv = w.s[tt][j];
      const vfloat p = sv > kMasked ? exp_diff<W>(sv, m_new[j]) : vfloat{};
      w.s[tt][j] = p;
      lsum += p;
    }
    w.l[j] = lsum;
    w.m[j] = m_new[j];
  }
  return changed;
}

#if defined(__AVX512F__)
// P V with lanes over dims, O as [M][D] (every lane useful whatever the number of queries): the
// bf16 dot path, and float rows in 16-lane passes of the AVX-512 builds.
constexpr bool kAvx512 = true;

// O[m][c : c + 16*DC] = O * corr[m] + sum_t P[t][m] * V[t][c : c + 16*DC] for MQ queries (V rows
// `vs` floats apart): DC * MQ accumulators in registers (enough independent chains to hide the FMA
// latency). Always inlined: left to itself the compiler's choice moves with unrelated code, and a
// call per span of every tile is measurably slower.
template <int DC, int MQ>
__attribute__((always_inline)) inline void pv_span(float* o, int64_t d_len, int64_t c,
                                                   const float* p, int64_t p_stride, const float* v,
                                                   int64_t vs, int64_t n, const float* corr,
                                                   bool changed, Prefetcher* pf) {
  __m512 acc[DC][MQ];
  for (int i = 0; i < MQ; ++i)
    for (int h = 0; h < DC; ++h) {
      acc[h][i] = _mm512_loadu_ps(o + i * d_len + c + 16 * h);
      if (changed) acc[h][i] = _mm512_mul_ps(acc[h][i], _mm512_set1_ps(corr[i]));
    }
  for (int64_t t = 0; t < n; ++t) {
    __m512 vt[DC];
    for (int h = 0; h < DC; ++h) vt[h] = _mm512_loadu_ps(v + t * vs + c + 16 * h);
    for (int i = 0; i < MQ; ++i) {
      const __m512 pt = _mm512_set1_ps(p[t * p_stride + i]);
      for (int h = 0; h < DC; ++h) acc[h][i] = _mm512_fmadd_ps(pt, vt[h], acc[h][i]);
    }
    if (pf) pf->step();
  }
  for (int i = 0; i < MQ; ++i)
    for (int h = 0; h < DC; ++h) _mm512_storeu_ps(o + i * d_len + c + 16 * h, acc[h][i]);
}

// Queries per pv_span: up to 6 take 64-dim spans (24 accumulators, 10 loads per 24 FMAs), 7 or 8
// take 32-dim spans (16 FMAs per 10 loads).
constexpr int pv_dims_per_span(int mq) { return 16 * (mq <= 6 ? 4 : (mq <= 8 ? 2 : 1)); }

// pv_span over all dims (a pf step per key of each span where pf is given).
template <int kD, int MQ>
inline void pv(float* o, int64_t D, const float* p, int64_t p_stride, const float* v, int64_t vs,
               int64_t n, const float* corr, bool changed, Prefetcher* pf) {
  const int64_t d_len = kD ? kD : D;
  constexpr int DC = pv_dims_per_span(MQ) / 16;
  int64_t c = 0;
  for (; c + 16 * DC <= d_len; c += 16 * DC) {
    pv_span<DC, MQ>(o, d_len, c, p, p_stride, v, vs, n, corr, changed, pf);
  }
  for (; c < d_len; c += 16) {
    pv_span<1, MQ>(o, d_len, c, p, p_stride, v, vs, n, corr, changed, pf);
  }
}

// Queries per pv call. Each call reads the tile's values again: from L1, unless the value rows lie
// a multiple of 4 KiB apart (8 kv heads x 128 float32 dims) and so all 16 of a tile's rows fall in
// the same L1 sets, more than their ways. There 8 queries per call read them fewer times; elsewhere
// 6 per call get the denser spans.
inline int64_t pv_group(int64_t vs) { return vs % 1024 == 0 ? 8 : 6; }

// pv for the `active` queries of a pass, pv_group(vs) at a time: O [active][D], P rows p_stride
// apart. MQ: the queries of the call being compiled (fewer for a last, smaller group).
template <int kD, int MaxQ, int MQ = std::min(8, MaxQ)>
inline void pv_queries(int64_t active, float* o, int64_t D, const float* p, int64_t p_stride,
                       const float* v, int64_t vs, int64_t n, const float* corr, bool changed,
                       Prefetcher* pf) {
  const int64_t d_len = kD ? kD : D;
  const int64_t group = pv_group(vs);
  for (int64_t m = 0; m < active; m += group) {
    if constexpr (MQ > 1) {
      if (std::min(group, active - m) < MQ)
        return pv_queries<kD, MaxQ, MQ - 1>(active - m, o + m * d_len, D, p + m, p_stride, v, vs, n,
                                            corr + m, changed, pf);
    }
    pv<kD, MQ>(o + m * d_len, D, p + m, p_stride, v, vs, n, corr + m, changed, pf);
  }
}

// pv_span calls of pv_queries (each makes a pf step per key).
inline int64_t pv_steps(int64_t active, int64_t D, int64_t vs) {
  const int64_t group = pv_group(vs);
  int64_t steps = 0;
  for (int64_t m = 0; m < active; m += group) {
    const int64_t span = pv_dims_per_span(static_cast<int>(std::min(group, active - m)));
    steps += D / span + (D % span) / 16;
  }
  return steps;
}
#else
constexpr bool kAvx512 = false;
#endif
// Passes whose P V runs with lanes over dims (pv_queries) on float rows.
template <int W>
constexpr bool kPvDims = kAvx512 && W == 16;
// Passes of DT whose S runs by dim pairs (scores_paired): those, on float rows (not the bf16 dot path).
template <DType DT, int W>
constexpr bool kPairedS = kPvDims<W> && !kBf16Dot<DT>;

// One tile of n keys at positions pos0 .. pos0+n-1, float32 rows of k and v `rs` floats apart.
template <int W, int MV, int kD>
inline void attend_tile(Pass<W, MV>& w, const float* k, const float* v, int64_t rs, int64_t n,
                        int64_t D, float pos0, bool masked, bool suffix, int64_t active,
                        Prefetcher& pf) {
  using vfloat = typename Vec<W>::f;
  const int64_t d_len = kD ? kD : D;
  scores<W, MV, kD>(w, k, rs, n, D, pf);
  vfloat corr[MV];
  const bool changed = softmax_tile(w, n, pos0, masked, suffix, corr);
#if defined(__AVX512F__)
  if constexpr (kPvDims<W>) {
    pv_queries<kD, MV * W>(active, reinterpret_cast<float*>(w.ot.data()), D,
                           reinterpret_cast<const float*>(w.s), MV * W, v, rs, n,
                           reinterpret_cast<const float*>(corr), changed, &pf);
    return;
  }
#endif
  // Ot = Ot * corr + V^T P, DB dims at a time (DB * MV register accumulators).
  constexpr int DB = register_block(MV);  // divides D: D is a multiple of 16
  for (int64_t d = 0; d < d_len; d += DB) {
    vfloat acc[DB][MV];
    for (int b = 0; b < DB; ++b)
      for (int j = 0; j < MV; ++j)
        acc[b][j] = changed ? w.ot[(d + b) * MV + j] * corr[j] : w.ot[(d + b) * MV + j];
    for (int64_t tt = 0; tt < n; ++tt) {
      vfloat p[MV];
      for (int j = 0; j < MV; ++j) p[j] = w.s[tt][j];
      const float* vt = v + tt * rs + d;
      for (int b = 0; b < DB; ++b) {
        const float vb = vt[b];
        for (int j = 0; j < MV; ++j) acc[b][j] += vb * p[j];
      }
    }
    for (int b = 0; b < DB; ++b)
      for (int j = 0; j < MV; ++j) w.ot[(d + b) * MV + j] = acc[b][j];
    pf.step();
  }
}

}  // namespace
}  // namespace stopkit::cpu::STOPKIT_ISA
