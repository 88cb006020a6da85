// Few queries per kv head: lanes along head_dim (part of paged_attention.cpp). Decode with a small
// GQA group (M = G * q_len of 1..kLanes/4) would leave most lanes of a query vector empty. There
// the lanes run along head_dim instead: S[m][t] = q_m . k_t is D/W FMAs and a horizontal sum, done
// for W keys at once by a transpose-add tree; O[m] += P[m][t] v_t is D/W FMAs.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "common.h"
#include "stopkit/state.h"

namespace stopkit::cpu::STOPKIT_ISA {
namespace {

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
  for (int i = 0; i < H; ++i)
    x[i] = fold_pair<W, H>(x[i], x[i + H], std::make_integer_sequence<int, W>{});
  if constexpr (H > 1) fold_lanes<W, H / 2>(x);
}

// State of the M <= MP queries of one kv head (MP a power of two; the pad queries are zero).
template <int MP>
struct DotPass {
  std::vector<float> q, o;  // [MP][D]
  SoftmaxState<NaturalLog> st[MP];
  float lower[MP], qidx[MP];
  float p[MP][kTile];  // scores, then probabilities, of the current tile
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
  auto load = [](const float* x) {
    vfloat r;
    std::memcpy(&r, x, sizeof(r));
    return r;
  };

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
    SoftmaxState<NaturalLog>& st = w.st[j];
    const float corr = st.raise_max(V::reduce_max(tmax));
    vfloat lsum{};
    for (int g = 0; g < NV; ++g) {
      const vfloat e = sv[j][g] > kMasked ? V::exp(sv[j][g] - st.m) : vfloat{};
      std::memcpy(&w.p[j][g * W], &e, sizeof(e));
      lsum += e;
    }
    for (int i = 0; i < W; ++i) st.l += lsum[i];
    if (corr != 1.0f) {
      float* o = w.o.data() + j * d_len;
#pragma omp simd
      for (int64_t d = 0; d < d_len; ++d) o[d] *= corr;
    }
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
      for (int b = 0; b < B; ++b)
        std::memcpy(w.o.data() + j * d_len + (dv + b) * W, &acc[j][b], sizeof(vfloat));
  };
  for (; dv + DB <= dv_len; dv += DB) pv(std::integral_constant<int, DB>{});
  for (; dv < dv_len; ++dv) pv(std::integral_constant<int, 1>{});
}

}  // namespace
}  // namespace stopkit::cpu::STOPKIT_ISA
