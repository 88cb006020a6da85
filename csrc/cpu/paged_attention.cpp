// paged_attention on the CPU. Built once per instruction set (STOPKIT_ISA = generic | avx2 |
// avx512, see CMakeLists.txt); the inner loops are plain C++ written for the auto-vectoriser.
//
// Work item = (row, kv head, context split). An item reads each KV page once for all G query heads
// of its group and all q_len queries (M = G * q_len rows), converts the page to float32 once, and
// runs an online softmax over the pages. When rows x kv heads are fewer than the threads, the
// context is split and the partial results are merged by their log-sum-exp.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "stopkit/cpu/convert.h"
#include "stopkit/cpu/kernels.h"

#ifndef STOPKIT_ISA
#error "STOPKIT_ISA must name the instruction-set build (generic, avx2, avx512)"
#endif

namespace stopkit::cpu::STOPKIT_ISA {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Loads n rows of D elements, `stride` elements apart, as dense float32 [n][D].
template <DType DT, int kD>
inline const float* rows_to_float(const typename Elem<DT>::T* src, int64_t stride, int64_t n,
                                  int64_t D, float* buf) {
  if constexpr (DT == DType::kFloat32) {
    if (stride == D) return src;  // already dense float32: read in place
  }
  const int64_t d = kD ? kD : D;
  for (int64_t t = 0; t < n; ++t) {
    const auto* s = src + t * stride;
    float* o = buf + t * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) o[i] = Elem<DT>::load(s[i]);
  }
  return buf;
}

template <int kD>
inline float dot(const float* a, const float* b, int64_t D) {
  const int64_t d = kD ? kD : D;
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < d; ++i) acc += a[i] * b[i];
  return acc;
}

// Per-thread state of one work item.
struct Tile {
  std::vector<float> q, acc, k, v, s, m, l;
  void resize(int64_t M, int64_t D, int64_t T) {
    q.resize(M * D);
    acc.resize(M * D);
    k.resize(T * D);
    v.resize(T * D);
    s.resize(M * T);
    m.resize(M);
    l.resize(M);
  }
};

// Online-softmax update of M accumulators with T keys/values (float32, dense [T][D]).
// visible(mi, t) says whether query row mi sees key t.
template <int kD, typename Visible>
inline void attend(Tile& w, const float* k, const float* v, int64_t M, int64_t T, int64_t D,
                   Visible&& visible) {
  const int64_t d = kD ? kD : D;
  for (int64_t mi = 0; mi < M; ++mi) {
    const float* q = w.q.data() + mi * d;
    float* s = w.s.data();
    float tile_max = kNegInf;
    for (int64_t t = 0; t < T; ++t) {
      s[t] = visible(mi, t) ? dot<kD>(q, k + t * d, d) : kNegInf;
      tile_max = std::max(tile_max, s[t]);
    }
    if (tile_max == kNegInf) continue;  // nothing visible to this query in the tile
    const float m_new = std::max(w.m[mi], tile_max);
    const float correction = std::exp(w.m[mi] - m_new);  // exp(-inf) = 0 on the first tile
    float* acc = w.acc.data() + mi * d;
    if (correction != 1.0f) {
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) acc[i] *= correction;
    }
    float l = w.l[mi] * correction;
    for (int64_t t = 0; t < T; ++t) {
      if (s[t] == kNegInf) continue;
      const float p = std::exp(s[t] - m_new);
      l += p;
      const float* vt = v + t * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) acc[i] += p * vt[i];
    }
    w.m[mi] = m_new;
    w.l[mi] = l;
  }
}

template <DType DT, int kD>
void run(const PagedAttentionParams& p) {
  using T = typename Elem<DT>::T;
  const int64_t B = p.batch, S = p.q_len, H = p.num_heads, Hkv = p.num_kv_heads;
  const int64_t D = kD ? kD : p.head_dim, bs = p.block_size, G = H / Hkv, M = G * S;
  const bool has_suffix = p.suffix_k != nullptr;
  const auto* q = static_cast<const T*>(p.q);
  const auto* kc = static_cast<const T*>(p.k_cache);
  const auto* vc = static_cast<const T*>(p.v_cache);
  const auto* sk = static_cast<const T*>(p.suffix_k);
  const auto* sv = static_cast<const T*>(p.suffix_v);
  auto* out = static_cast<T*>(p.out);
  const int64_t tok_stride = Hkv * D;  // elements between consecutive tokens of one kv head

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

  const int threads = omp_get_max_threads();
  const int64_t pairs = B * Hkv;
  int64_t splits = 1;
  if (pairs < threads && max_used > 1) splits = std::min<int64_t>(max_used, (2 * threads + pairs - 1) / pairs);
  // Partial results of split items: acc [items][M][D], m and l [items][M].
  std::vector<float> part_acc, part_ml;
  if (splits > 1) {
    part_acc.resize(pairs * splits * M * D);
    part_ml.resize(pairs * splits * M * 2);
  }

  // Output row of query mi (= g * S + s) of kv head kh in batch row b.
  auto out_index = [&](int64_t b, int64_t kh, int64_t mi) {
    const int64_t g = mi / S, s = mi % S;
    return ((b * S + s) * H + kh * G + g);
  };
  auto finish = [&](int64_t b, int64_t kh, int64_t mi, const float* acc, float m, float l) {
    const int64_t h = kh * G + mi / S;
    if (p.sinks) {
      const float sink = p.sinks[h];
      const float m_all = std::max(m, sink);
      l = l * std::exp(m - m_all) + std::exp(sink - m_all);
      const float rescale = std::exp(m - m_all);
      m = m_all;
      const float inv = l > 0.0f ? rescale / l : 0.0f;
      T* o = out + out_index(b, kh, mi) * D;
      for (int64_t i = 0; i < D; ++i) o[i] = Elem<DT>::store(acc[i] * inv);
    } else {
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
      T* o = out + out_index(b, kh, mi) * D;
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) o[i] = Elem<DT>::store(acc[i] * inv);
    }
    if (p.lse) p.lse[out_index(b, kh, mi)] = l > 0.0f ? m + std::log(l) : kNegInf;
  };

#pragma omp parallel
  {
    Tile w;
    w.resize(M, D, std::max(bs, S));
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < pairs * splits; ++item) {
      const int64_t b = item / (Hkv * splits), kh = (item / splits) % Hkv, split = item % splits;
      const int64_t L = p.seq_lens[b];
      const int64_t nblk = (L + bs - 1) / bs;
      const int64_t per = (nblk + splits - 1) / splits;
      const int64_t blk_lo = std::min(nblk, split * per), blk_hi = std::min(nblk, blk_lo + per);
      const bool last = split == splits - 1;

      // Queries, pre-scaled, as float32 [M][D]; lowest visible position of each query.
      int64_t lowest_needed = std::numeric_limits<int64_t>::max();
      std::vector<int64_t> lower(M, 0);
      for (int64_t mi = 0; mi < M; ++mi) {
        const int64_t g = mi / S, s = mi % S;
        const T* src = q + ((b * S + s) * H + kh * G + g) * D;
        float* dst = w.q.data() + mi * D;
        for (int64_t i = 0; i < D; ++i) dst[i] = Elem<DT>::load(src[i]) * p.scale;
        if (p.window > 0) lower[mi] = query_position(L, s, has_suffix) - p.window + 1;
        lowest_needed = std::min(lowest_needed, lower[mi]);
        w.m[mi] = kNegInf;
        w.l[mi] = 0.0f;
      }
      std::fill(w.acc.begin(), w.acc.end(), 0.0f);

      for (int64_t j = blk_lo; j < blk_hi; ++j) {
        const int64_t start = j * bs, n = std::min(bs, L - start);
        if (start + n <= lowest_needed) continue;  // the whole page is outside every window
        const int64_t blk = p.block_table[b * p.max_blocks_per_row + j];
        const T* kp = kc + (blk * bs * Hkv + kh) * D;
        const T* vp = vc + (blk * bs * Hkv + kh) * D;
        const float* kf = rows_to_float<DT, kD>(kp, tok_stride, n, D, w.k.data());
        const float* vf = rows_to_float<DT, kD>(vp, tok_stride, n, D, w.v.data());
        attend<kD>(w, kf, vf, M, n, D, [&](int64_t mi, int64_t t) { return start + t >= lower[mi]; });
      }
      if (has_suffix && last) {
        const T* kp = sk + (b * S * Hkv + kh) * D;
        const T* vp = sv + (b * S * Hkv + kh) * D;
        const float* kf = rows_to_float<DT, kD>(kp, tok_stride, S, D, w.k.data());
        const float* vf = rows_to_float<DT, kD>(vp, tok_stride, S, D, w.v.data());
        attend<kD>(w, kf, vf, M, S, D, [&](int64_t mi, int64_t t) {
          return t <= mi % S && L + t >= lower[mi];
        });
      }

      if (splits == 1) {
        for (int64_t mi = 0; mi < M; ++mi) finish(b, kh, mi, w.acc.data() + mi * D, w.m[mi], w.l[mi]);
      } else {
        std::copy(w.acc.begin(), w.acc.begin() + M * D, part_acc.begin() + item * M * D);
        for (int64_t mi = 0; mi < M; ++mi) {
          part_ml[(item * M + mi) * 2] = w.m[mi];
          part_ml[(item * M + mi) * 2 + 1] = w.l[mi];
        }
      }
    }

    if (splits > 1) {
      std::vector<float> acc(D);
#pragma omp for schedule(static)
      for (int64_t r = 0; r < pairs * M; ++r) {
        const int64_t pair = r / M, mi = r % M;
        float m = kNegInf;
        for (int64_t sp = 0; sp < splits; ++sp) m = std::max(m, part_ml[((pair * splits + sp) * M + mi) * 2]);
        std::fill(acc.begin(), acc.end(), 0.0f);
        float l = 0.0f;
        if (m != kNegInf) {
          for (int64_t sp = 0; sp < splits; ++sp) {
            const int64_t it = pair * splits + sp;
            const float mi_s = part_ml[(it * M + mi) * 2];
            if (mi_s == kNegInf) continue;
            const float c = std::exp(mi_s - m);
            l += part_ml[(it * M + mi) * 2 + 1] * c;
            const float* pa = part_acc.data() + (it * M + mi) * D;
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) acc[i] += c * pa[i];
          }
        }
        finish(pair / Hkv, pair % Hkv, mi, acc.data(), m, l);
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
