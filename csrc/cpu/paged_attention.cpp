// paged_attention on the CPU. Built once per instruction set (STOPKIT_ISA = generic | avx2 |
// avx512, see CMakeLists.txt) from the same source: the inner loops use native-width vector types
// (csrc/include/stopkit/cpu/vec.h) that the compiler lowers for each build.
//
// Work item = (row, context split). An item walks the row's pages in order and, while a page is in
// cache, runs every kv head over it (a page's [block_size, Hkv, D] keys are one contiguous range,
// prefetched a page ahead). Each kv head reads the page once for all G query heads of its group and
// all q_len queries: the M = G * q_len queries sit in the vector lanes (Q is kept transposed,
// [D][M]), so a tile of keys costs broadcast-FMAs with no horizontal reductions:
//   S[t][m]   = sum_d K[t][d] * Qt[d][m]              (keys of the tile, converted to float32)
//   Ot[d][m] += sum_t V[t][d] * P[t][m]               (online softmax, one running max per lane)
// When rows are fewer than the threads, the context is split and the partial results are merged
// by their log-sum-exp.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "stopkit/cpu/convert.h"
#include "stopkit/cpu/kernels.h"
#include "stopkit/cpu/vec.h"

#ifndef STOPKIT_ISA
#error "STOPKIT_ISA must name the instruction-set build (generic, avx2, avx512)"
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

constexpr int64_t kPrefetchBlocks = 1;  // pages ahead to prefetch

template <typename T>
inline void prefetch_range(const T* src, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(src);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(bytes + b, 0, 1);
}

// State of one pass over the queries [m0, m0 + MV*W) of a work item: W lanes per vector.
template <int W, int MV>
struct Pass {
  using vf = typename Vec<W>::f;
  std::vector<vf> qt, ot;  // [D][MV]
  vf m[MV], l[MV], lower[MV], qidx[MV];
  vf s[kTile][MV];
};

// One tile of n keys at positions pos0 .. pos0+n-1, rows of k and v `rs` floats apart. suffix: the
// tile holds suffix tokens, query lane with suffix index s sees tile key t only when t <= s.
// masked: a window or suffix applies.
template <int W, int MV, int kD>
inline void attend_tile(Pass<W, MV>& w, const float* k, const float* v, int64_t rs, int64_t n,
                        int64_t D, float pos0, bool masked, bool suffix) {
  using V = Vec<W>;
  using vfloat = typename V::f;
  const int64_t d_len = kD ? kD : D;
  constexpr int TB = register_block(MV);
  // S = K Qt, TB keys at a time so each Qt load feeds TB FMAs.
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

  // Masks, the tile's max per lane, new running max.
  vfloat m_new[MV], corr[MV];
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
    corr[j] = V::exp(w.m[j] - m_new[j]);
    changed |= V::reduce_max(m_new[j] - w.m[j]) > 0.0f;
  }
  // P = exp(S - m_new) (0 where masked), l = l * corr + sum P.
  for (int j = 0; j < MV; ++j) {
    vfloat lsum = w.l[j] * corr[j];
    for (int64_t tt = 0; tt < n; ++tt) {
      const vfloat sv = w.s[tt][j];
      const vfloat p = sv > kMasked ? V::exp(sv - m_new[j]) : vfloat{};
      w.s[tt][j] = p;
      lsum += p;
    }
    w.l[j] = lsum;
    w.m[j] = m_new[j];
  }
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
  }
}

struct Item {
  int64_t b, blk_lo, blk_hi;  // row and its pages [blk_lo, blk_hi)
  bool last;                  // holds the row's last pages (and so its suffix)
};

// Runs queries [m0, m0 + MV*W) of every kv head of one work item (ws[kh] holds head kh's state).
// Pages are read in order and each page is used by all kv heads while it is in cache: a page's
// [block_size, Hkv, D] K (and V) is one contiguous range the prefetcher can stream. Writes the
// unnormalised acc [Hkv][M][D], m and l [Hkv][M].
template <DType DT, int kD, int W, int MV>
void run_pass(const PagedAttentionParams& p, const Item& it, int64_t m0, std::vector<Pass<W, MV>>& ws,
              std::vector<float>& kbuf, std::vector<float>& vbuf, float* acc_out, float* m_out,
              float* l_out) {
  using T = typename Elem<DT>::T;
  using V = Vec<W>;
  using vfloat = typename V::f;
  const int64_t S = p.q_len, H = p.num_heads, Hkv = p.num_kv_heads, G = H / Hkv, M = G * S;
  const int64_t D = kD ? kD : p.head_dim, bs = p.block_size;
  const int64_t L = p.seq_lens[it.b];
  const bool has_suffix = p.suffix_k != nullptr, windowed = p.window > 0;
  const int64_t tok_stride = Hkv * D;
  const auto* q = static_cast<const T*>(p.q);
  const auto* kc = static_cast<const T*>(p.k_cache);
  const auto* vc = static_cast<const T*>(p.v_cache);

  // Qt[d][lane] = scale * q of query m0 + lane (zero in padding lanes); window lower bounds (the
  // same for every kv head).
  float lowest = std::numeric_limits<float>::max(), highest = kNegInf;
  for (int64_t kh = 0; kh < Hkv; ++kh) {
    Pass<W, MV>& w = ws[kh];
    w.qt.assign(D * MV, vfloat{});
    w.ot.assign(D * MV, vfloat{});
    for (int j = 0; j < MV; ++j) {
      w.m[j] = V::broadcast(kMasked);
      w.l[j] = vfloat{};
      w.lower[j] = V::broadcast(kNegInf);
      w.qidx[j] = vfloat{};
    }
    float* qt = reinterpret_cast<float*>(w.qt.data());
    for (int64_t lane = 0; lane < MV * W && m0 + lane < M; ++lane) {
      const int64_t mi = m0 + lane, g = mi / S, s = mi % S;
      const T* src = q + ((it.b * S + s) * H + kh * G + g) * D;
      for (int64_t d = 0; d < D; ++d) qt[(d * MV + lane / W) * W + lane % W] = Elem<DT>::load(src[d]) * p.scale;
      const float lo = windowed ? static_cast<float>(query_position(L, s, has_suffix) - p.window + 1) : kNegInf;
      w.lower[lane / W][lane % W] = lo;
      w.qidx[lane / W][lane % W] = static_cast<float>(s);
      lowest = std::min(lowest, lo);
      highest = std::max(highest, lo);
    }
  }

  const int64_t page_elems = bs * Hkv * D;
  for (int64_t j = it.blk_lo; j < it.blk_hi; ++j) {
    const int64_t start = j * bs, n_blk = std::min(bs, L - start);
    if (windowed && static_cast<float>(start + n_blk) <= lowest) continue;  // outside every window
    const int64_t blk = p.block_table[it.b * p.max_blocks_per_row + j];
    if (j + kPrefetchBlocks < it.blk_hi) {
      // Pages are scattered, so the hardware prefetcher cannot guess the next one: ask for it.
      const int64_t next = p.block_table[it.b * p.max_blocks_per_row + j + kPrefetchBlocks];
      const int64_t n_next = std::min(bs, L - (j + kPrefetchBlocks) * bs) * tok_stride;
      prefetch_range(kc + next * page_elems, n_next);
      prefetch_range(vc + next * page_elems, n_next);
    }
    for (int64_t kh = 0; kh < Hkv; ++kh) {
      for (int64_t off = 0; off < n_blk; off += kTile) {
        const int64_t n = std::min<int64_t>(kTile, n_blk - off);
        const int64_t row0 = (blk * bs + off) * Hkv + kh;
        int64_t rs = tok_stride;
        const float* kf = rows_as_float<DT, kD>(kc + row0 * D, rs, n, D, kbuf.data());
        rs = tok_stride;
        const float* vf = rows_as_float<DT, kD>(vc + row0 * D, rs, n, D, vbuf.data());
        const bool masked = windowed && static_cast<float>(start + off) < highest;
        attend_tile<W, MV, kD>(ws[kh], kf, vf, rs, n, D, static_cast<float>(start + off),
                               masked, false);
      }
    }
  }
  for (int64_t kh = 0; kh < Hkv; ++kh) {
    Pass<W, MV>& w = ws[kh];
    if (has_suffix && it.last) {
      const int64_t row0 = it.b * S * Hkv + kh;
      int64_t rs = tok_stride;
      const float* kf = rows_as_float<DT, kD>(static_cast<const T*>(p.suffix_k) + row0 * D, rs, S, D, kbuf.data());
      rs = tok_stride;
      const float* vf = rows_as_float<DT, kD>(static_cast<const T*>(p.suffix_v) + row0 * D, rs, S, D, vbuf.data());
      attend_tile<W, MV, kD>(w, kf, vf, rs, S, D, static_cast<float>(L), true, true);
    }
    const float* ot = reinterpret_cast<const float*>(w.ot.data());
    for (int64_t lane = 0; lane < MV * W && m0 + lane < M; ++lane) {
      const int64_t mi = kh * M + m0 + lane, j = lane / W, e = lane % W;
      float* dst = acc_out + mi * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = ot[(d * MV + j) * W + e];
      const bool seen = w.l[j][e] > 0.0f;
      m_out[mi] = seen ? w.m[j][e] : kNegInf;
      l_out[mi] = seen ? w.l[j][e] : 0.0f;
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
#pragma omp parallel if (work > (int64_t{1} << 20))
  {
    std::vector<float> kbuf(std::max<int64_t>(kTile, S) * D), vbuf(kbuf.size());
    std::vector<float> acc(direct ? HM * D : 0), ms(direct ? HM : 0), ls(direct ? HM : 0);
    // Few queries (decode: G * q_len is often 1..8) use narrower vectors than the native width.
    std::vector<Pass<4, 1>> narrow4(Hkv);
    std::vector<Pass<(kLanes >= 8 ? 8 : 4), 1>> narrow8(Hkv);
    std::vector<Pass<kLanes, 1>> w1(Hkv);
    std::vector<Pass<kLanes, 2>> w2(Hkv);
    std::vector<Pass<kLanes, 3>> w3(Hkv);
    std::vector<Pass<kLanes, 4>> w4(Hkv);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < B * splits; ++item) {
      const int64_t b = item / splits, split = item % splits;
      const int64_t nblk = (p.seq_lens[b] + bs - 1) / bs, per = (nblk + splits - 1) / splits;
      const int64_t lo = std::min(nblk, split * per);
      const Item it{b, lo, std::min(nblk, lo + per), split == splits - 1};
      float* acc_out = direct ? acc.data() : part_acc.data() + item * HM * D;
      float* m_out = direct ? ms.data() : part_m.data() + item * HM;
      float* l_out = direct ? ls.data() : part_l.data() + item * HM;
      for (int64_t m0 = 0; m0 < M; m0 += kMaxVecs * kLanes) {
        const int64_t rest = M - m0, vecs = std::min<int64_t>(kMaxVecs, (rest + kLanes - 1) / kLanes);
        if (rest <= 4 && kLanes > 4) {
          run_pass<DT, kD>(p, it, m0, narrow4, kbuf, vbuf, acc_out, m_out, l_out);
        } else if (rest <= 8 && kLanes > 8) {
          run_pass<DT, kD>(p, it, m0, narrow8, kbuf, vbuf, acc_out, m_out, l_out);
        } else {
          switch (vecs) {
            case 1: run_pass<DT, kD>(p, it, m0, w1, kbuf, vbuf, acc_out, m_out, l_out); break;
            case 2: run_pass<DT, kD>(p, it, m0, w2, kbuf, vbuf, acc_out, m_out, l_out); break;
            case 3: run_pass<DT, kD>(p, it, m0, w3, kbuf, vbuf, acc_out, m_out, l_out); break;
            default: run_pass<DT, kD>(p, it, m0, w4, kbuf, vbuf, acc_out, m_out, l_out); break;
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
