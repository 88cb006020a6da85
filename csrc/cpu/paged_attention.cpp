// paged_attention on the CPU. Built once per instruction set (STOPKIT_ISA = generic | avx2 |
// avx512 | avx512bf16 | amx, see CMakeLists.txt) from the same source: the inner loops use
// native-width vector types (csrc/include/stopkit/cpu/vec.h) that the compiler lowers for each
// build.
//
// Work item = (row, context split). An item walks the row's pages in order and, while a page is in
// cache, runs every kv head over it (a page's [block_size, Hkv, D] keys are one contiguous range,
// prefetched a page ahead). Each kv head reads the page once for all G query heads of its group and
// all q_len queries: the M = G * q_len queries sit in the vector lanes (Q is kept transposed,
// [D][M]), so a tile of keys costs broadcast-FMAs with no horizontal reductions:
//   S[t][m]   = sum_d K[t][d] * Qt[d][m]              (keys of the tile, converted to float32)
//   Ot[d][m] += sum_t V[t][d] * P[t][m]               (online softmax, one running max per lane)
// except that 16-lane passes of the AVX-512 builds run P V with lanes over dims (pv_queries:
// O[m][d] += P[t][m] V[t][d], a broadcast of P per query), so queries that fill a vector only
// partly (24 = 1.5 vectors at the 1.5B shape) cost no FMAs there, and S by dim pairs (scores_paired:
// 8 queries x 2 dims per vector, a 64-bit broadcast of K per pair of dims), so that S too pays only
// for the queries in use to the nearest 8.
// With few queries per kv head (M <= kLanes / 4: decode with a small GQA group), the lanes run along
// head_dim instead (DotPass): S[m][t] = q_m . k_t as FMAs over dims, W keys' sums at once by a
// transpose-add tree, and O[m] += P[m][t] v_t.
// When rows are fewer than the threads, the context is split and the partial results are merged
// by their log-sum-exp.
//
// bfloat16 caches in the avx512bf16 build do not convert keys: vdpbf16ps multiplies bf16 pairs
// read straight from the page and accumulates in float32. On current cores it runs at the float32
// FMA FLOP rate but on fewer ports, so P V stays float32 FMAs, with lanes over dims (every lane
// useful whatever the number of queries):
//   S[t][m]   = scale * sum_p K[t][2p:2p+2] . Qp[p][m]   (Qp: Q as bf16 pairs, lanes over queries)
//   O[m][d'] += sum_t P[t][m] * V[t][d']                 (V unpacked to float32, dims d' permuted
//                                                         inside each 32, undone on output)
// The amx build (avx512bf16 + AMX-BF16) runs both products on AMX tiles instead, when head_dim is a
// multiple of 32, a block of up to 8 tiles of keys (128) at a time per kv head: S as 16 keys x 16
// queries per AMX tile (K rows loaded from the page), one online-softmax step for the block, and
// O += P V as 16 queries x 16 value slots per AMX tile, 32 keys per step, from P transposed to bf16
// and V key pairs interleaved (the slot order above); O goes through the tiles once per block.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "stopkit/cpu/convert.h"
#include "stopkit/cpu/kernels.h"
#include "stopkit/cpu/vec.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

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


// Software prefetches of the pages ahead (scattered, so the hardware prefetcher cannot guess
// them), issued a few lines per step of work: a page or a block of pages at once would fill the
// core's line fill buffers and stall it until the lines arrive, instead of overlapping them with
// the work.
class Prefetcher {
 public:
  void add(const void* p, int64_t bytes) {
    const int64_t lines = (bytes + 63) / 64;
    const char* at = static_cast<const char*>(p);
    ranges_.push_back({at, at + lines * 64});
    left_ += lines;
  }
  // What was added since the last flush goes out over the next `steps` steps.
  void spread(int64_t steps) { per_step_ = (left_ + steps - 1) / std::max<int64_t>(1, steps); }
  // Always inlined: called per key next to 16-24 vector accumulators, which a call would spill
  // (every vector register is caller-saved); GCC had left it out of line in the AVX-512 builds.
  __attribute__((always_inline)) void step() {
    for (int64_t i = 0; i < per_step_; ++i) {
      if (at_ == end_ && !next()) return;
      __builtin_prefetch(at_, 0, 1);
      at_ += 64;
    }
  }
  void flush() {
    do {
      for (; at_ < end_; at_ += 64) __builtin_prefetch(at_, 0, 1);
    } while (next());
    ranges_.clear();
    front_ = 0;
    left_ = 0;
  }

 private:
  struct Range {
    const char *at, *end;
  };
  bool next() {
    if (front_ == ranges_.size()) return false;
    at_ = ranges_[front_].at;
    end_ = ranges_[front_].end;
    ++front_;
    return true;
  }
  std::vector<Range> ranges_;
  size_t front_ = 0;
  const char *at_ = nullptr, *end_ = nullptr;
  int64_t left_ = 0, per_step_ = 0;
};

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
  // dims, permuted: unpacked_dim).
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
  const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
#pragma GCC unroll 8
  for (int b = 0; b < TB; ++b) {
    __m512 sums[P];
    for (int v = 0; v < P; ++v) sums[v] = _mm512_add_ps(acc[b][v], _mm512_permute_ps(acc[b][v], 0xB1));
    for (int j = 0; 2 * j + 1 < P; ++j) w.s[t + b][j] = _mm512_permutex2var_ps(sums[2 * j], evens, sums[2 * j + 1]);
    if constexpr (P % 2 == 1) w.s[t + b][P / 2] = _mm512_permutexvar_ps(evens, sums[P - 1]);
  }
}

// Keys per scores_paired_block at P pair vectors: TB * P accumulators, P operands and the
// broadcast stay in the 32 registers.
constexpr int paired_block_keys(int P) { return P <= 3 ? 8 : (P <= 6 ? 4 : 2); }
// pf steps after each full block of S: P V's steps alone left the memory idle through S (1.5B
// float32: 0.976x at q_len 4, 0.939x at q_len 1 on the shuffled table); more, or steps inside the
// block, cost more than they gained (a step is ~10 cycles).
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
// latency).
template <int DC, int MQ>
inline void pv_span(float* o, int64_t d_len, int64_t c, const float* p, int64_t p_stride,
                    const float* v, int64_t vs, int64_t n, const float* corr, bool changed,
                    Prefetcher* pf) {
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
// the same L1 sets, more than their ways. There 8 queries per call read them fewer times (6 were
// 1.06-1.16x slower at the 8B shape); elsewhere 6 per call get the denser spans (0.95x at the 1.5B
// shape, q_len 4; 0.74x for decode's 6 queries with the pages in cache).
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
        return pv_queries<kD, MaxQ, MQ - 1>(active - m, o + m * d_len, D, p + m, p_stride, v, vs,
                                            n, corr + m, changed, pf);
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

// The dim that slot s of an unpacked value row holds (values_as_float): unpacklo/unpackhi of
// 16-bit elements work inside 128-bit lanes, so each 32 dims (16 at a tail) come out as the low 4
// of every 8, then the high 4.
inline int64_t unpacked_dim(int64_t s, int64_t D) {
  const int64_t base = s & ~int64_t{31}, r = s & 31, half = base + 32 <= D ? 16 : 8;
  return base + (r < half ? (r / 4) * 8 + r % 4 : ((r - half) / 4) * 8 + 4 + r % 4);
}

#if defined(__AVX512BF16__)
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

#if defined(__AMX_BF16__)
// amx build: all 8 tiles are 16 rows of 64 bytes (16 x 16 float32, or 16 x 32 bf16).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

constexpr TileConfig tile_config() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.rows[i] = 16;
    cfg.colsb[i] = 64;
  }
  return cfg;
}

// Tile shapes are per thread: each OpenMP thread configures them before its first tile. (A
// constant, not a local: GCC 12 drops stores to a local that only ldtilecfg reads.)
inline void configure_tiles() {
  static constexpr TileConfig kConfig = tile_config();
  _tile_loadconfig(&kConfig);
}

// Tile registers named at compile time (GCC's _tile_* macros take literal numbers only, and its
// tile loads do not tell the compiler that they read memory: these do).
template <int T>
inline void tile_zero() {
  asm volatile("tilezero %%tmm%c0" ::"i"(T));
}
template <int T>
inline void tile_load(const void* src, int64_t stride) {
  asm volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(src), "r"(stride), "i"(T) : "memory");
}
template <int T>
inline void tile_store(void* dst, int64_t stride) {
  asm volatile("tilestored %%tmm%c2, (%0,%1,1)" ::"r"(dst), "r"(stride), "i"(T) : "memory");
}
template <int C, int A, int B>  // C += A B: A 16 rows x 16 bf16 pairs, B 16 pair rows x 16 columns
inline void tile_dot() {
  asm volatile("tdpbf16ps %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(C), "i"(A), "i"(B));
}

// f(std::integral_constant<int, i>{}) for each i < N.
template <typename F, int... I>
inline void unroll(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, typename F>
inline void unroll(F&& f) {
  unroll(f, std::make_integer_sequence<int, N>{});
}

// The amx build runs tiles of keys in blocks of up to kBlockTiles (128 keys), per kv head: S of the
// block, one online-softmax step, then P V with 32 keys per AMX step and O loaded into and stored
// from the tiles once per block (not once per tile of 16 keys).
constexpr int kBlockTiles = 8;

struct BlockTile {  // bf16 K and V rows of n <= 16 keys at positions pos0.., read in place
  const uint16_t* k;
  const uint16_t* v;
  int64_t n;
  float pos0;
  bool masked, suffix;
};

struct Block {
  BlockTile tiles[kBlockTiles];
  int count = 0;
};

// Query tiles per AMX pass: two where MV is even, so that every K and V tile loaded feeds two
// products, else one. C tiles 0..3 hold 4 / JT key tiles (S) or slot groups (P V) for each of the
// pass's query tiles; the operands follow: JT Q (S) or P^T (P V) tiles from tile 4, then two
// alternating K or V tiles.
template <int MV>
constexpr int kQueryTiles = MV % 2 == 0 ? 2 : 1;

// pf.step() calls of a full block (run_pass spreads the next block's page prefetches over them).
template <int MV>
constexpr int64_t block_prefetch_steps(int64_t D) {
  constexpr int JT = kQueryTiles<MV>;
  const int64_t s_steps = (D / 32) * kBlockTiles;             // per K tile and 32 dims
  const int64_t product_steps = (D / 16) * (kBlockTiles / 2);  // per V tile (16 slots, 32 keys)
  const int64_t softmax_steps = MV * kBlockTiles;              // per query vector and 16 keys
  return MV / JT * (s_steps + product_steps) + softmax_steps;
}

// Per-thread buffers of a block: scores then probabilities [128 keys][4 query vectors], short
// tiles' keys padded to 16 rows, P^T as bf16 (per query tile and step of 32 keys: 16 queries x 32
// keys) and the V key pairs of one round of slot groups (per step and group: 16 pairs x 16 slots
// x 2).
struct BlockBuffers {
  std::vector<Vec<16>::f> s;
  std::vector<uint16_t> padded_keys, p_tiles, v_pairs;
  explicit BlockBuffers(int64_t D)
      : s(kBlockTiles * kTile * kMaxVecs), padded_keys(kBlockTiles * kTile * D),
        p_tiles(kMaxVecs * kBlockTiles / 2 * 512), v_pairs(kBlockTiles / 2 * 4 * 512) {}
};

// S = K Qt of the block's tiles first .. first + NB - 1 (key rows k[b], `stride` bytes apart) for
// query tiles j0 .. j0 + JT - 1, into rows b * 16 + t of bb.s.
template <int MV, int kD, int JT, int NB>
inline void block_scores(const Pass<16, MV>& w, const uint16_t* const* k, const int64_t* stride,
                         int j0, int first, int64_t D, BlockBuffers& bb, Prefetcher& pf) {
  const int64_t d_len = kD ? kD : D;
  unroll<JT * NB>([](auto c) { tile_zero<decltype(c)::value>(); });
  for (int64_t c = 0; c < d_len; c += 32) {
    unroll<JT>([&](auto jj) {  // 16 dim pairs x 16 queries
      tile_load<4 + decltype(jj)::value>(&w.q_pairs[(c / 2) * MV + j0 + jj], MV * 64);
    });
    unroll<NB>([&](auto bt) {
      constexpr int B = decltype(bt)::value, K = 4 + JT + B % 2;
      tile_load<K>(k[first + B] + c, stride[first + B]);
      unroll<JT>([](auto jj) {
        constexpr int J = decltype(jj)::value;
        tile_dot<J * NB + B, K, 4 + J>();
      });
      pf.step();
    });
  }
  unroll<JT>([&](auto jj) {
    constexpr int J = decltype(jj)::value;
    unroll<NB>([&](auto bt) {
      constexpr int B = decltype(bt)::value;
      tile_store<J * NB + B>(&bb.s[(first + B) * 16 * MV + j0 + J], MV * 64);
    });
  });
}

// One online-softmax step over the block (scale, masks, keys past a tile's n masked): bb.s becomes
// P = exp(scale * S - m_new), 0 where masked. Returns whether any running max moved (else corr
// is 1). Only tiles with masked keys write their scores back (as -inf) before the exp pass, which
// steps pf per 16 keys (else the memory would idle through the softmax: 0.935x at 1.5B bf16 q_len
// 4).
template <int MV>
inline bool block_softmax(Pass<16, MV>& w, const Block& blk, float scale, BlockBuffers& bb,
                          float* corr, Prefetcher& pf) {
  using V = Vec<16>;
  using vfloat = V::f;
  const vfloat neg_inf = V::broadcast(kNegInf);
  bool changed = false;
  for (int j = 0; j < MV; ++j) {
    vfloat tmax = V::broadcast(kMasked);
    for (int b = 0; b < blk.count; ++b) {
      const BlockTile& t = blk.tiles[b];
      vfloat* x = &bb.s[b * 16 * MV + j];
      if (t.n == 16 && !t.masked) {
        for (int64_t r = 0; r < 16; ++r) tmax = V::max(tmax, x[r * MV] * scale);
        continue;
      }
      for (int64_t r = 0; r < 16; ++r) {
        auto ok = V::broadcast(static_cast<float>(r)) < static_cast<float>(t.n);
        if (t.masked) {
          ok = ok & (t.pos0 + static_cast<float>(r) >= w.lower[j]);
          if (t.suffix) ok = ok & (static_cast<float>(r) <= w.qidx[j]);
        }
        x[r * MV] = ok ? x[r * MV] : neg_inf;
        tmax = ok ? V::max(tmax, x[r * MV] * scale) : tmax;
      }
    }
    const vfloat m_new = V::max(w.m[j], tmax), c = exp_diff<16>(w.m[j], m_new);
    changed |= V::reduce_max(m_new - w.m[j]) > 0.0f;
    std::memcpy(corr + j * 16, &c, sizeof(c));
    vfloat lsum = w.l[j] * c;
    // exp(scale * x - m_new) as 2^(x * scale log2 e - m_new log2 e): one FMA (m_new is finite
    // wherever x is unmasked; its rounding is the same over the block, so it cancels in O / l).
    const float scale2 = scale * kLog2e;
    const vfloat m2 = m_new * kLog2e;
    for (int64_t i = 0; i < blk.count * 16; ++i) {
      vfloat& x = bb.s[i * MV + j];
      x = x > neg_inf ? V::exp2(x * scale2 - m2) : vfloat{};
      lsum += x;
      if (i % 16 == 15) pf.step();
    }
    w.l[j] = lsum;
    w.m[j] = m_new;
  }
  return changed;
}

// out[i] (8 dwords, rows of a 16 x 8 matrix, `out_stride` dwords apart) = column i of the 8 x 16
// dword matrix r: two 8 x 8 transposes, one per 256-bit half, then each row pair split.
inline void transpose_8x16(const __m512i (&r)[8], uint32_t* out, int64_t out_stride) {
  __m512i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // rows 4h .. 4h+3: lane L of u[4h + c] holds column 4L + c
    u[4 * h + 0] = _mm512_unpacklo_epi64(t[4 * h], t[4 * h + 2]);
    u[4 * h + 1] = _mm512_unpackhi_epi64(t[4 * h], t[4 * h + 2]);
    u[4 * h + 2] = _mm512_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);
    u[4 * h + 3] = _mm512_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);
  }
  auto store = [&](int row, __m256i x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + row * out_stride), x);
  };
  for (int c = 0; c < 4; ++c) {
    // lanes 0, 2 (columns c, 8 + c) and 1, 3 (columns 4 + c, 12 + c) of rows 0..3 and 4..7
    const __m512i even = _mm512_shuffle_i32x4(u[c], u[4 + c], _MM_SHUFFLE(2, 0, 2, 0));
    const __m512i odd = _mm512_shuffle_i32x4(u[c], u[4 + c], _MM_SHUFFLE(3, 1, 3, 1));
    const __m512i col_c = _mm512_shuffle_i32x4(even, even, _MM_SHUFFLE(3, 1, 2, 0));
    const __m512i col_4c = _mm512_shuffle_i32x4(odd, odd, _MM_SHUFFLE(3, 1, 2, 0));
    store(c, _mm512_castsi512_si256(col_c));
    store(8 + c, _mm512_extracti64x4_epi64(col_c, 1));
    store(4 + c, _mm512_castsi512_si256(col_4c));
    store(12 + c, _mm512_extracti64x4_epi64(col_4c, 1));
  }
}

// O[m][s] = O * corr[m] + sum over the block's keys of P[key][m] V[key][dim of slot s], for the
// first `active` query lanes, on AMX: per step of 32 keys, P^T as bf16 and V key pairs (built a
// round of slot groups at a time, so they are still in L1 when loaded); O in tiles 0..3.
template <int MV, int kD>
inline void block_pv(Pass<16, MV>& w, const Block& blk, int64_t rs, int64_t D, const float* corr,
                     bool changed, int64_t active, BlockBuffers& bb, Prefetcher& pf) {
  constexpr int JT = kQueryTiles<MV>, NG = 4 / JT;
  const int64_t d_len = kD ? kD : D, groups = d_len / 16;
  const int steps = (blk.count + 1) / 2;  // 32 keys each
  const int tiles_j = static_cast<int>((active + 16 * JT - 1) / (16 * JT)) * JT;  // query tiles run
  float* o = reinterpret_cast<float*>(w.ot.data());
  if (changed) {
    for (int64_t m = 0; m < active; ++m) {
      const __m512 c = _mm512_set1_ps(corr[m]);
      for (int64_t d = 0; d < d_len; d += 16)
        _mm512_storeu_ps(o + m * d_len + d, _mm512_mul_ps(c, _mm512_loadu_ps(o + m * d_len + d)));
    }
  }
  const __m512i zero = _mm512_setzero_si512();
  // P^T of query tile j, step h: dword m of pair row i = (P[2i][m], P[2i+1][m]) as bf16, from the
  // two converted rows interleaved, then transposed.
  const __m512i interleave = _mm512_set_epi16(
      31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
      23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int j = 0; j < tiles_j; ++j) {
    for (int b = 0; b < 2 * steps; ++b) {
      __m512i pairs[8];
      for (int i = 0; i < 8; ++i) {
        if (b < blk.count) {
          const __m512 p0 = (__m512)bb.s[(b * 16 + 2 * i) * MV + j];
          const __m512 p1 = (__m512)bb.s[(b * 16 + 2 * i + 1) * MV + j];
          pairs[i] = _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
        } else {
          pairs[i] = zero;
        }
      }
      auto* tile = reinterpret_cast<uint32_t*>(bb.p_tiles.data()) + (j * kBlockTiles / 2 + b / 2) * 256;
      transpose_8x16(pairs, tile + (b % 2) * 8, 16);
    }
  }
  for (int64_t g = 0; g < groups; g += NG) {  // NG slot groups per round (2 at a tail: D % 32 == 0)
    const int64_t ng = std::min<int64_t>(NG, groups - g);
    // V pairs: row (b % 2) * 8 + i of step b / 2, group gg: (V[2i][dim], V[2i+1][dim]) of tile b
    // for the group's 16 slots (the order of unpacked_dim); zero past a tile's keys.
    for (int b = 0; b < 2 * steps; ++b) {
      const int64_t n = b < blk.count ? blk.tiles[b].n : 0;
      const uint16_t* v = b < blk.count ? blk.tiles[b].v + g * 16 : nullptr;
      uint16_t* vp = bb.v_pairs.data() + (b / 2) * NG * 512 + (b % 2) * 8 * 32;
      for (int64_t i = 0; i < 8; ++i) {
        for (int64_t gg = 0; gg < ng; gg += 2) {
          const __m512i x0 = 2 * i < n ? _mm512_loadu_si512(v + 2 * i * rs + gg * 16) : zero;
          const __m512i x1 = 2 * i + 1 < n ? _mm512_loadu_si512(v + (2 * i + 1) * rs + gg * 16) : zero;
          _mm512_storeu_si512(vp + gg * 512 + i * 32, _mm512_unpacklo_epi16(x0, x1));
          _mm512_storeu_si512(vp + (gg + 1) * 512 + i * 32, _mm512_unpackhi_epi16(x0, x1));
        }
      }
    }
    auto round = [&](auto group_count) {
      constexpr int G = decltype(group_count)::value;
      for (int j0 = 0; j0 < tiles_j; j0 += JT) {
        float* oj = o + j0 * 16 * d_len + g * 16;
        unroll<JT>([&](auto jj) {
          constexpr int J = decltype(jj)::value;
          unroll<G>([&](auto gt) {
            tile_load<J * G + decltype(gt)::value>(oj + J * 16 * d_len + gt * 16, d_len * 4);
          });
        });
        for (int h = 0; h < steps; ++h) {
          unroll<JT>([&](auto jj) {
            const int64_t tile = (j0 + jj) * kBlockTiles / 2 + h;
            tile_load<4 + decltype(jj)::value>(bb.p_tiles.data() + tile * 512, 64);
          });
          unroll<G>([&](auto gt) {
            constexpr int GG = decltype(gt)::value, V = 4 + JT + GG % 2;
            tile_load<V>(bb.v_pairs.data() + (h * NG + GG) * 512, 64);
            unroll<JT>([](auto jj) {
              constexpr int J = decltype(jj)::value;
              tile_dot<J * G + GG, 4 + J, V>();
            });
            pf.step();
          });
        }
        unroll<JT>([&](auto jj) {
          constexpr int J = decltype(jj)::value;
          unroll<G>([&](auto gt) {
            tile_store<J * G + decltype(gt)::value>(oj + J * 16 * d_len + gt * 16, d_len * 4);
          });
        });
      }
    };
    if (ng == NG) round(std::integral_constant<int, NG>{});
    else round(std::integral_constant<int, 2>{});
  }
}

// Runs the block's tiles (then empties it): S, softmax, P V.
template <int MV, int kD>
inline void run_block(Pass<16, MV>& w, Block& blk, int64_t rs, int64_t D, float scale,
                      int64_t active, BlockBuffers& bb, Prefetcher& pf) {
  if (blk.count == 0) return;
  constexpr int JT = kQueryTiles<MV>, NB = 4 / JT;
  const int64_t d_len = kD ? kD : D;
  const uint16_t* k[kBlockTiles];
  int64_t stride[kBlockTiles];  // bytes
  for (int b = 0; b < blk.count; ++b) {
    const BlockTile& t = blk.tiles[b];
    k[b] = t.k;
    stride[b] = rs * 2;
    if (t.n < 16) {  // a short tile (end of a row, block size 8, the suffix): never read past it
      uint16_t* pad = bb.padded_keys.data() + b * 16 * d_len;
      for (int64_t r = 0; r < 16; ++r)
        for (int64_t d = 0; d < d_len; ++d) pad[r * d_len + d] = r < t.n ? t.k[r * rs + d] : 0;
      k[b] = pad;
      stride[b] = d_len * 2;
    }
  }
  for (int j0 = 0; j0 < MV; j0 += JT) {
    for (int first = 0; first < blk.count; first += NB) {
      auto scores = [&](auto key_tiles) {
        block_scores<MV, kD, JT, decltype(key_tiles)::value>(w, k, stride, j0, first, D, bb, pf);
      };
      switch (std::min(NB, blk.count - first)) {
        case 1: scores(std::integral_constant<int, 1>{}); break;
        case 2: scores(std::integral_constant<int, 2>{}); break;
        case 3: if constexpr (NB > 2) scores(std::integral_constant<int, 3>{}); break;
        default: if constexpr (NB > 2) scores(std::integral_constant<int, 4>{}); break;
      }
    }
  }
  alignas(64) float corr[kMaxVecs * 16];
  const bool changed = block_softmax(w, blk, scale, bb, corr, pf);
  block_pv<MV, kD>(w, blk, rs, D, corr, changed, active, bb, pf);
  blk.count = 0;
}
#endif

// n bf16 value rows, `rs` elements apart, as float32 rows [n][D'] (a bf16 is the top half of a
// float32: one unpack with zero per 16 values); slot s holds dim unpacked_dim(s, D).
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
                             int64_t n, int64_t D, float scale, float pos0, bool masked, bool suffix,
                             int64_t active, TileBuffers& buf) {
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

// This thread's AMX tile configuration, held while alive (amx build; `on`: use_amx).
struct AmxTiles {
  bool on;
  explicit AmxTiles(bool use) : on(use) {
#if defined(__AMX_BF16__)
    if (on) configure_tiles();
#endif
  }
  ~AmxTiles() {
#if defined(__AMX_BF16__)
    if (on) _tile_release();
#endif
  }
  AmxTiles(const AmxTiles&) = delete;
  AmxTiles& operator=(const AmxTiles&) = delete;
};

// ---- Few queries per kv head: lanes along head_dim ----------------------------------------------
// Decode with a small GQA group (M = G * q_len of 1..kLanes/4) would leave most lanes of a query
// vector empty. There the lanes run along head_dim instead: S[m][t] = q_m . k_t is D/W FMAs and a
// horizontal sum, done for W keys at once by a transpose-add tree; O[m] += P[m][t] v_t is D/W FMAs.

// Lane l of the result sums lanes l and l + H of a (first H lanes of each 2H block) or lanes l - H
// and l of b (the other H): one stage of the tree.
template <int W, int H, int... L>
inline typename Vec<W>::f fold_pair(typename Vec<W>::f a, typename Vec<W>::f b,
                                    std::integer_sequence<int, L...>) {
  return __builtin_shufflevector(a, b, ((L % (2 * H)) < H ? L : W + L - H)...) +
         __builtin_shufflevector(a, b, ((L % (2 * H)) < H ? L + H : W + L)...);
}

// x[0..2H) -> x[0], whose lane i is the sum of the lanes of input x[i] (H = W / 2 at the top).
template <int W, int H>
inline void fold_lanes(typename Vec<W>::f* x) {
  for (int i = 0; i < H; ++i) x[i] = fold_pair<W, H>(x[i], x[i + H], std::make_integer_sequence<int, W>{});
  if constexpr (H > 1) fold_lanes<W, H / 2>(x);
}

// State of the M <= MP queries of one kv head (MP a power of two; the pad queries are zero).
template <int MP>
struct DotPass {
  std::vector<float> q, o;  // [MP][D]
  float m[MP], l[MP], lower[MP], qidx[MP];
  float p[MP][kTile];       // scores, then probabilities, of the current tile
};

constexpr int dot_pv_block(int mp) { return mp >= 4 ? 4 : 8; }

// pf steps of dot_tile over n keys: one per key in S and in each block of P V.
inline int64_t dot_steps(int mp, int64_t n, int64_t D) {
  return n * (1 + (D / kLanes + dot_pv_block(mp) - 1) / dot_pv_block(mp));
}

template <int MP, int kD>
inline void dot_tile(DotPass<MP>& w, const float* k, const float* v, int64_t rs, int64_t n,
                     int64_t D, float pos0, bool masked, bool suffix, Prefetcher& pf) {
  constexpr int W = kLanes;
  using V = Vec<W>;
  using vfloat = typename V::f;
  const int64_t dv_len = (kD ? kD : D) / W;
  const int64_t d_len = dv_len * W;
  auto load = [](const float* x) { vfloat r; std::memcpy(&r, x, sizeof(r)); return r; };

  // S: W keys at a time; x[t] holds the per-lane partial dot products of key t, folded into one
  // vector of W scores, sv[j][g] for keys g*W .. g*W+W-1 (lanes past n are masked below).
  constexpr int NV = kTile / W;
  vfloat sv[MP][NV];
  for (int g = 0; g < NV; ++g) {
    const int64_t t0 = g * W, nt = std::max<int64_t>(0, std::min<int64_t>(W, n - t0));
    if (nt == 0) {
      for (int j = 0; j < MP; ++j) sv[j][g] = vfloat{};
      continue;
    }
    vfloat x[MP][W];
    for (int64_t t = 0; t < W; ++t) {
      vfloat acc[MP] = {};
      if (t < nt) {
        const float* kt = k + (t0 + t) * rs;
        for (int64_t dv = 0; dv < dv_len; ++dv) {
          const vfloat kv = load(kt + dv * W);
          for (int j = 0; j < MP; ++j) acc[j] += load(w.q.data() + j * d_len + dv * W) * kv;
        }
        pf.step();
      }
      for (int j = 0; j < MP; ++j) x[j][t] = acc[j];
    }
    for (int j = 0; j < MP; ++j) {
      fold_lanes<W, W / 2>(x[j]);
      sv[j][g] = x[j][0];
    }
  }
  // Online softmax per query over the tile, W keys per vector.
  vfloat lane;
  for (int i = 0; i < W; ++i) lane[i] = static_cast<float>(i);
  for (int j = 0; j < MP; ++j) {
    vfloat tmax = V::broadcast(kMasked);
    for (int g = 0; g < NV; ++g) {
      const vfloat t = lane + static_cast<float>(g * W);
      auto ok = t < static_cast<float>(n);
      if (masked) {
        ok = ok & (t + pos0 >= w.lower[j]);
        if (suffix) ok = ok & (t <= w.qidx[j]);
      }
      sv[j][g] = ok ? sv[j][g] : V::broadcast(kNegInf);
      tmax = V::max(tmax, sv[j][g]);
    }
    const float m_new = std::max(w.m[j], V::reduce_max(tmax)), corr = std::exp(w.m[j] - m_new);
    vfloat lsum{};
    for (int g = 0; g < NV; ++g) {
      const vfloat e = sv[j][g] > kMasked ? V::exp(sv[j][g] - m_new) : vfloat{};
      std::memcpy(&w.p[j][g * W], &e, sizeof(e));
      lsum += e;
    }
    float l = w.l[j] * corr;
    for (int i = 0; i < W; ++i) l += lsum[i];
    w.l[j] = l;
    if (m_new != w.m[j]) {
      float* o = w.o.data() + j * d_len;
#pragma omp simd
      for (int64_t d = 0; d < d_len; ++d) o[d] *= corr;
    }
    w.m[j] = m_new;
  }
  // O += P V, DB vectors of dims at a time (MP * DB register accumulators).
  constexpr int DB = dot_pv_block(MP);
  int64_t dv = 0;
  auto pv = [&](auto db_tag) {
    constexpr int B = decltype(db_tag)::value;
    vfloat acc[MP][B];
    for (int j = 0; j < MP; ++j)
      for (int b = 0; b < B; ++b) acc[j][b] = load(w.o.data() + j * d_len + (dv + b) * W);
    for (int64_t t = 0; t < n; ++t) {
      vfloat vt[B];
      for (int b = 0; b < B; ++b) vt[b] = load(v + t * rs + (dv + b) * W);
      for (int j = 0; j < MP; ++j) {
        const float pj = w.p[j][t];
        for (int b = 0; b < B; ++b) acc[j][b] += pj * vt[b];
      }
      pf.step();
    }
    for (int j = 0; j < MP; ++j)
      for (int b = 0; b < B; ++b) std::memcpy(w.o.data() + j * d_len + (dv + b) * W, &acc[j][b], sizeof(vfloat));
  };
  for (; dv + DB <= dv_len; dv += DB) pv(std::integral_constant<int, DB>{});
  for (; dv < dv_len; ++dv) pv(std::integral_constant<int, 1>{});
}

struct Item {
  int64_t b, blk_lo, blk_hi;  // row and its pages [blk_lo, blk_hi)
  bool last;                  // holds the row's last pages (and so its suffix)
};

// Walks the pages of a work item in order and, while a page is in cache, runs
// attend(kh, k, v, n, pos0, masked, suffix) on each tile of n <= kTile keys of every kv head (a
// page's [block_size, Hkv, D] K and V are contiguous ranges; k and v point at the tile's first row,
// rows Hkv * D elements apart); then, for the row's last item, on each kv head's suffix. Pages
// entirely below every query's window (lowest) are skipped; tiles starting below the highest window
// bound are masked. Prefetching: at the start of every `ahead` pages, the `ahead` pages after them
// go into pf, spread over `steps` calls of pf.step() (attend makes them).
template <typename T, typename Attend>
inline void walk_pages(const PagedAttentionParams& p, const Item& it, float lowest, float highest,
                       int64_t ahead, int64_t steps, Prefetcher& pf, Attend&& attend) {
  const int64_t Hkv = p.num_kv_heads, D = p.head_dim, bs = p.block_size, S = p.q_len;
  const int64_t L = p.seq_lens[it.b], tok_stride = Hkv * D, page_elems = bs * tok_stride;
  const bool windowed = p.window > 0;
  const auto* kc = static_cast<const T*>(p.k_cache);
  const auto* vc = static_cast<const T*>(p.v_cache);
  const int32_t* table = p.block_table + it.b * p.max_blocks_per_row;
  auto page_len = [&](int64_t j) { return std::min(bs, L - j * bs); };
  int64_t first = it.blk_lo;
  while (windowed && first < it.blk_hi && static_cast<float>(first * bs + page_len(first)) <= lowest) ++first;
  auto queue = [&](int64_t from, int64_t to) {
    for (int64_t j = from; j < std::min(to, it.blk_hi); ++j) {
      const int64_t bytes = page_len(j) * tok_stride * static_cast<int64_t>(sizeof(T));
      pf.add(kc + table[j] * page_elems, bytes);
      pf.add(vc + table[j] * page_elems, bytes);
    }
  };
  queue(first, first + ahead);
  pf.flush();  // the first pages: nothing to overlap them with
  for (int64_t j = first; j < it.blk_hi; ++j) {
    if ((j - first) % ahead == 0) {
      pf.flush();
      queue(j + ahead, j + 2 * ahead);
      pf.spread(steps);
    }
    const int64_t start = j * bs, n_blk = page_len(j), blk = table[j];
    for (int64_t kh = 0; kh < Hkv; ++kh) {
      for (int64_t off = 0; off < n_blk; off += kTile) {
        const int64_t n = std::min<int64_t>(kTile, n_blk - off);
        const int64_t row0 = (blk * bs + off) * Hkv + kh;
        const bool masked = windowed && static_cast<float>(start + off) < highest;
        attend(kh, kc + row0 * D, vc + row0 * D, n, static_cast<float>(start + off), masked, false);
      }
    }
  }
  pf.flush();
  if (p.suffix_k != nullptr && it.last) {
    for (int64_t kh = 0; kh < Hkv; ++kh) {
      const int64_t row0 = it.b * S * Hkv + kh;
      attend(kh, static_cast<const T*>(p.suffix_k) + row0 * D,
             static_cast<const T*>(p.suffix_v) + row0 * D, S, static_cast<float>(L), true, true);
    }
  }
}

// Runs queries [m0, m0 + MV*W) of every kv head of one work item (ws[kh] holds head kh's state)
// over its pages (walk_pages). Writes the unnormalised acc [Hkv][M][D], m and l [Hkv][M].
template <DType DT, int kD, int W, int MV>
void run_pass(const PagedAttentionParams& p, const Item& it, int64_t m0, std::vector<Pass<W, MV>>& ws,
              TileBuffers& buf, float* acc_out, float* m_out, float* l_out) {
  using T = typename Elem<DT>::T;
  using V = Vec<W>;
  using vfloat = typename V::f;
  using vint = typename V::i;
  constexpr bool kDot = kBf16Dot<DT>;
  const int64_t S = p.q_len, H = p.num_heads, Hkv = p.num_kv_heads, G = H / Hkv, M = G * S;
  const int64_t D = kD ? kD : p.head_dim;
  const int64_t L = p.seq_lens[it.b];
  const int64_t active = std::min<int64_t>(MV * W, M - m0);  // query lanes in use
  const bool has_suffix = p.suffix_k != nullptr, windowed = p.window > 0;
  const int64_t tok_stride = Hkv * D;
  const auto* q = static_cast<const T*>(p.q);

  // Q of query m0 + lane in lane `lane` (zero in padding lanes): Qt = scale * Q (as dim pairs in
  // the AVX-512 16-lane passes), or Q as bf16 pairs; window lower bounds (the same for every kv
  // head).
  constexpr bool kPaired = kPairedS<DT, W>;
  const int pair_vecs = kPaired ? static_cast<int>((active + 7) / 8) : 0;
  float lowest = std::numeric_limits<float>::max(), highest = kNegInf;
  for (int64_t kh = 0; kh < Hkv; ++kh) {
    Pass<W, MV>& w = ws[kh];
    if constexpr (kDot) w.q_pairs.assign(D / 2 * MV, vint{});
    else if constexpr (kPaired) w.qt_pairs.assign(D / 2 * pair_vecs, vfloat{});
    else w.qt.assign(D * MV, vfloat{});
    w.pair_vecs = pair_vecs;
    w.ot.assign(D * MV, vfloat{});
    for (int j = 0; j < MV; ++j) {
      w.m[j] = V::broadcast(kMasked);
      w.l[j] = vfloat{};
      w.lower[j] = V::broadcast(kNegInf);
      w.qidx[j] = vfloat{};
    }
    for (int64_t lane = 0; lane < active; ++lane) {
      const int64_t mi = m0 + lane, g = mi / S, s = mi % S, j = lane / W, e = lane % W;
      const T* src = q + ((it.b * S + s) * H + kh * G + g) * D;
      if constexpr (kDot) {
        for (int64_t pr = 0; pr < D / 2; ++pr)
          w.q_pairs[pr * MV + j][e] = static_cast<int32_t>(src[2 * pr] | (uint32_t{src[2 * pr + 1]} << 16));
      } else if constexpr (kPaired) {
        for (int64_t d = 0; d < D; ++d)
          w.qt_pairs[d / 2 * pair_vecs + lane / 8][2 * (lane % 8) + d % 2] = Elem<DT>::load(src[d]) * p.scale;
      } else {
        for (int64_t d = 0; d < D; ++d) w.qt[d * MV + j][e] = Elem<DT>::load(src[d]) * p.scale;
      }
      const float lo = windowed ? static_cast<float>(query_position(L, s, has_suffix) - p.window + 1) : kNegInf;
      w.lower[j][e] = lo;
      w.qidx[j][e] = static_cast<float>(s);
      lowest = std::min(lowest, lo);
      highest = std::max(highest, lo);
    }
  }

  // Prefetch a page ahead: a step per key of each span of pv_queries (float rows in 16-lane passes,
  // the bf16 dot path) and kScoreBlockSteps per block of S keys (float rows in 16-lane passes), or
  // per register block of dims in attend_tile's own P V.
  const int64_t page_tiles = (p.block_size + kTile - 1) / kTile;
  int64_t tile_steps = D / register_block(MV);
#if defined(__AVX512F__)
  if constexpr (kDot || kPvDims<W>) {
    const int64_t vs = DT == DType::kFloat32 ? tok_stride : D;  // rows_as_float's value rows
    const int64_t tile_keys = std::min<int64_t>(kTile, p.block_size);
    tile_steps = pv_steps(active, D, vs) * tile_keys;
    if constexpr (kPaired) tile_steps += tile_keys / paired_block_keys(pair_vecs) * kScoreBlockSteps;
  }
#endif
  int64_t ahead = 1, steps = Hkv * page_tiles * tile_steps;
#if defined(__AMX_BF16__)
  const bool amx = W == 16 && use_amx(DT, D);
  std::vector<Block> blocks(amx ? Hkv : 0);
  if (amx) {  // the pages of the next block of tiles, over the steps of this block's AMX products
    ahead = std::max<int64_t>(1, kBlockTiles / page_tiles);
    steps = Hkv * std::max<int64_t>(1, ahead * page_tiles / kBlockTiles) * block_prefetch_steps<MV>(D);
  }
#endif
  walk_pages<T>(p, it, lowest, highest, ahead, steps, buf.prefetch,
                [&](int64_t kh, const T* k, const T* v, int64_t n, float pos0, bool masked, bool suffix) {
    Pass<W, MV>& w = ws[kh];
#if defined(__AMX_BF16__)
    if constexpr (kDot && W == 16) {
      if (amx) {
        Block& blk = blocks[kh];
        blk.tiles[blk.count++] = {k, v, n, pos0, masked, suffix};
        if (blk.count == kBlockTiles)
          run_block<MV, kD>(w, blk, tok_stride, D, p.scale, active, *buf.block, buf.prefetch);
        return;
      }
    }
#endif
#if defined(__AVX512BF16__)
    if constexpr (kDot) {
      attend_tile_bf16<W, MV, kD>(w, k, v, tok_stride, n, D, p.scale, pos0, masked, suffix,
                                  active, buf);
      return;
    }
#endif
    int64_t rs = tok_stride;
    const float* kf = rows_as_float<DT, kD>(k, rs, n, D, buf.k.data());
    rs = tok_stride;
    const float* vf = rows_as_float<DT, kD>(v, rs, n, D, buf.v.data());
    attend_tile<W, MV, kD>(w, kf, vf, rs, n, D, pos0, masked, suffix, active, buf.prefetch);
  });
#if defined(__AMX_BF16__)
  if constexpr (kDot && W == 16) {
    for (int64_t kh = 0; kh < Hkv && amx; ++kh)
      run_block<MV, kD>(ws[kh], blocks[kh], tok_stride, D, p.scale, active, *buf.block, buf.prefetch);
  }
#endif
  for (int64_t kh = 0; kh < Hkv; ++kh) {
    Pass<W, MV>& w = ws[kh];
    const float* ot = reinterpret_cast<const float*>(w.ot.data());
    for (int64_t lane = 0; lane < active; ++lane) {
      const int64_t mi = kh * M + m0 + lane, j = lane / W, e = lane % W;
      float* dst = acc_out + mi * D;
      if constexpr (kDot) {
        for (int64_t s = 0; s < D; ++s) dst[unpacked_dim(s, D)] = ot[lane * D + s];
      } else if constexpr (kPvDims<W>) {
        std::memcpy(dst, ot + lane * D, D * sizeof(float));
      } else {
        for (int64_t d = 0; d < D; ++d) dst[d] = ot[(d * MV + j) * W + e];
      }
      const bool seen = w.l[j][e] > 0.0f;
      m_out[mi] = seen ? w.m[j][e] : kNegInf;
      l_out[mi] = seen ? w.l[j][e] : 0.0f;
    }
  }
}

// run_pass for the head_dim-lane layout: all M <= MP queries of every kv head of one work item.
template <DType DT, int kD, int MP>
void run_pass_dot(const PagedAttentionParams& p, const Item& it, std::vector<DotPass<MP>>& ws,
                  TileBuffers& buf, float* acc_out, float* m_out, float* l_out) {
  using T = typename Elem<DT>::T;
  const int64_t S = p.q_len, H = p.num_heads, Hkv = p.num_kv_heads, G = H / Hkv, M = G * S;
  const int64_t D = kD ? kD : p.head_dim, L = p.seq_lens[it.b], tok_stride = Hkv * D;
  const bool has_suffix = p.suffix_k != nullptr, windowed = p.window > 0;
  const auto* q = static_cast<const T*>(p.q);

  float lowest = std::numeric_limits<float>::max(), highest = kNegInf;
  for (int64_t kh = 0; kh < Hkv; ++kh) {
    DotPass<MP>& w = ws[kh];
    w.q.assign(MP * D, 0.0f);
    w.o.assign(MP * D, 0.0f);
    for (int j = 0; j < MP; ++j) {
      w.m[j] = kMasked;
      w.l[j] = 0.0f;
      w.lower[j] = kNegInf;
      w.qidx[j] = 0.0f;
    }
    for (int64_t j = 0; j < M; ++j) {
      const int64_t g = j / S, s = j % S;
      const T* src = q + ((it.b * S + s) * H + kh * G + g) * D;
      for (int64_t d = 0; d < D; ++d) w.q[j * D + d] = Elem<DT>::load(src[d]) * p.scale;
      const float lo = windowed ? static_cast<float>(query_position(L, s, has_suffix) - p.window + 1) : kNegInf;
      w.lower[j] = lo;
      w.qidx[j] = static_cast<float>(s);
      lowest = std::min(lowest, lo);
      highest = std::max(highest, lo);
    }
  }
  // A page ahead, over the steps of its tiles.
  const int64_t steps = Hkv * ((p.block_size + kTile - 1) / kTile) * dot_steps(MP, std::min<int64_t>(kTile, p.block_size), D);
  walk_pages<T>(p, it, lowest, highest, 1, steps, buf.prefetch,
                [&](int64_t kh, const T* k, const T* v, int64_t n, float pos0, bool masked, bool suffix) {
    int64_t rs = tok_stride;
    const float* kf = rows_as_float<DT, kD>(k, rs, n, D, buf.k.data());
    rs = tok_stride;
    const float* vf = rows_as_float<DT, kD>(v, rs, n, D, buf.v.data());
    dot_tile<MP, kD>(ws[kh], kf, vf, rs, n, D, pos0, masked, suffix, buf.prefetch);
  });
  for (int64_t kh = 0; kh < Hkv; ++kh) {
    const DotPass<MP>& w = ws[kh];
    for (int64_t j = 0; j < M; ++j) {
      const int64_t mi = kh * M + j;
      std::copy(w.o.begin() + j * D, w.o.begin() + (j + 1) * D, acc_out + mi * D);
      const bool seen = w.l[j] > 0.0f;
      m_out[mi] = seen ? w.m[j] : kNegInf;
      l_out[mi] = seen ? w.l[j] : 0.0f;
    }
  }
}

template <DType DT, int kD>
void run(const PagedAttentionParams& p) {
  using T = typename Elem<DT>::T;
  const int64_t B = p.batch, S = p.q_len, H = p.num_heads, Hkv = p.num_kv_heads;
  const int64_t D = kD ? kD : p.head_dim, bs = p.block_size, G = H / Hkv, M = G * S;

  // Indices are checked here too (ops.py checks first): never read outside the cache.
  int64_t max_used = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = p.seq_lens[b];
    STOPKIT_CHECK(L >= 0 && L <= p.max_blocks_per_row * bs,
                  "paged_attention: seq_lens[" + std::to_string(b) + "] = " + std::to_string(L) +
                      " outside [0, max_blocks_per_row * block_size]");
    const int64_t used = (L + bs - 1) / bs;
    max_used = std::max(max_used, used);
    for (int64_t j = 0; j < used; ++j) {
      const int32_t blk = p.block_table[b * p.max_blocks_per_row + j];
      STOPKIT_CHECK(blk >= 0 && blk < p.num_blocks,
                    "paged_attention: block_table[" + std::to_string(b) + ", " + std::to_string(j) +
                        "] = " + std::to_string(blk) + " outside [0, " + std::to_string(p.num_blocks) + ")");
    }
  }

  // Work item = (row, context split); each item runs every kv head of its row.
  const int threads = omp_get_max_threads();
  const int64_t HM = Hkv * M;  // query rows of one item
  int64_t splits = 1;
  if (B < threads && max_used > 1) splits = std::min<int64_t>(max_used, (2 * threads + B - 1) / B);
  // Unnormalised partial results of every item: acc [items][HM][D], m and l [items][HM].
  const bool direct = splits == 1;
  std::vector<float> part_acc(direct ? 0 : B * splits * HM * D), part_m(direct ? 0 : B * splits * HM),
      part_l(direct ? 0 : B * splits * HM);

  auto* out = static_cast<T*>(p.out);
  auto finish = [&](int64_t b, int64_t kh, int64_t mi, const float* acc, float m, float l) {
    const int64_t h = kh * G + mi / S, row = (b * S + mi % S) * H + h;
    float rescale = 1.0f;
    if (p.sinks) {
      const float sink = p.sinks[h];
      const float m_all = std::max(m, sink);
      rescale = std::exp(m - m_all);
      l = l * rescale + std::exp(sink - m_all);
      m = m_all;
    }
    const float inv = l > 0.0f ? rescale / l : 0.0f;
    T* o = out + row * D;
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) o[i] = Elem<DT>::store(acc[i] * inv);
    if (p.lse) p.lse[row] = l > 0.0f ? m + std::log(l) : kNegInf;
  };

  // Tiny calls (short contexts, small batches) run on the calling thread: waking the team costs
  // more than the work, and much more on a busy machine.
  int64_t work = 0;
  for (int64_t b = 0; b < B; ++b) work += p.seq_lens[b] + S;
  work *= Hkv * M * D;
  const bool amx = use_amx(DT, D);
  // Up to a quarter of a vector of queries: lanes along head_dim instead (DotPass). The bf16 dot
  // builds keep their own path.
  const bool dot_layout = 4 * M <= kLanes && !kBf16Dot<DT>;
#pragma omp parallel if (work > (int64_t{1} << 20))
  {
    const AmxTiles tiles(amx);
    TileBuffers buf(D);
#if defined(__AMX_BF16__)
    if (amx) buf.block = std::make_unique<BlockBuffers>(D);
#endif
    std::vector<float> acc(direct ? HM * D : 0), ms(direct ? HM : 0), ls(direct ? HM : 0);
    // Few queries (decode: G * q_len is often 1..8) use narrower vectors than the native width.
    std::vector<Pass<4, 1>> narrow4(Hkv);
    std::vector<Pass<(kLanes >= 8 ? 8 : 4), 1>> narrow8(Hkv);
    std::vector<Pass<kLanes, 1>> w1(Hkv);
    std::vector<Pass<kLanes, 2>> w2(Hkv);
    std::vector<Pass<kLanes, 3>> w3(Hkv);
    std::vector<Pass<kLanes, 4>> w4(Hkv);
    std::vector<DotPass<1>> dot1(Hkv);
    std::vector<DotPass<2>> dot2(Hkv);
    std::vector<DotPass<4>> dot4(Hkv);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < B * splits; ++item) {
      const int64_t b = item / splits, split = item % splits;
      const int64_t nblk = (p.seq_lens[b] + bs - 1) / bs, per = (nblk + splits - 1) / splits;
      const int64_t lo = std::min(nblk, split * per);
      const Item it{b, lo, std::min(nblk, lo + per), split == splits - 1};
      float* acc_out = direct ? acc.data() : part_acc.data() + item * HM * D;
      float* m_out = direct ? ms.data() : part_m.data() + item * HM;
      float* l_out = direct ? ls.data() : part_l.data() + item * HM;
      if (dot_layout) {
        if (M == 1) run_pass_dot<DT, kD>(p, it, dot1, buf, acc_out, m_out, l_out);
        else if (M == 2) run_pass_dot<DT, kD>(p, it, dot2, buf, acc_out, m_out, l_out);
        else run_pass_dot<DT, kD>(p, it, dot4, buf, acc_out, m_out, l_out);
      }
      for (int64_t m0 = 0; !dot_layout && m0 < M; m0 += kMaxVecs * kLanes) {
        const int64_t rest = M - m0, vecs = std::min<int64_t>(kMaxVecs, (rest + kLanes - 1) / kLanes);
        if (rest <= 4 && kLanes > 4 && !amx) {  // AMX: 16-lane passes only (a tile row of S)
          run_pass<DT, kD>(p, it, m0, narrow4, buf, acc_out, m_out, l_out);
        } else if (rest <= 8 && kLanes > 8 && !amx && !kPairedS<DT, kLanes>) {
          // (where S runs by dim pairs, 5..8 queries fill a 16-lane pass instead)
          run_pass<DT, kD>(p, it, m0, narrow8, buf, acc_out, m_out, l_out);
        } else {
          switch (vecs) {
            case 1: run_pass<DT, kD>(p, it, m0, w1, buf, acc_out, m_out, l_out); break;
            case 2: run_pass<DT, kD>(p, it, m0, w2, buf, acc_out, m_out, l_out); break;
            case 3: run_pass<DT, kD>(p, it, m0, w3, buf, acc_out, m_out, l_out); break;
            default: run_pass<DT, kD>(p, it, m0, w4, buf, acc_out, m_out, l_out); break;
          }
        }
      }
      if (direct)
        for (int64_t r = 0; r < HM; ++r) finish(b, r / M, r % M, acc_out + r * D, m_out[r], l_out[r]);
    }

    if (!direct) {
      std::vector<float> merged(D);
#pragma omp for schedule(static)
      for (int64_t r = 0; r < B * HM; ++r) {
        const int64_t b = r / HM, hm = r % HM;
        float m = kNegInf;
        for (int64_t sp = 0; sp < splits; ++sp) m = std::max(m, part_m[(b * splits + sp) * HM + hm]);
        std::fill(merged.begin(), merged.end(), 0.0f);
        float l = 0.0f;
        for (int64_t sp = 0; sp < splits && m != kNegInf; ++sp) {
          const int64_t at = (b * splits + sp) * HM + hm;
          if (part_m[at] == kNegInf) continue;
          const float c = std::exp(part_m[at] - m);
          l += part_l[at] * c;
          const float* pa = part_acc.data() + at * D;
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) merged[i] += c * pa[i];
        }
        finish(b, hm / M, hm % M, merged.data(), m, l);
      }
    }
  }
}

}  // namespace

void paged_attention(const PagedAttentionParams& p) {
  STOPKIT_CHECK(p.num_kv_heads > 0 && p.num_heads % p.num_kv_heads == 0,
                "paged_attention: num_heads must be a multiple of num_kv_heads");
  STOPKIT_CHECK(p.head_dim % 16 == 0 && p.head_dim >= 32 && p.head_dim <= 256,
                "paged_attention: head_dim must be a multiple of 16 in 32..256");
  STOPKIT_CHECK(p.block_size >= 8 && (p.block_size & (p.block_size - 1)) == 0,
                "paged_attention: block_size must be a power of two >= 8");
  dispatch_dtype(p.dtype, [&](auto tag) {
    constexpr DType DT = decltype(tag)::value;
    switch (p.head_dim) {
      case 64: run<DT, 64>(p); break;
      case 128: run<DT, 128>(p); break;
      case 256: run<DT, 256>(p); break;
      default: run<DT, 0>(p); break;
    }
  });
}

}  // namespace stopkit::cpu::STOPKIT_ISA
