// bfloat16 caches on AMX tiles in the amx build (avx512bf16 + AMX-BF16; part of
// paged_attention.cpp), when head_dim is a multiple of 32: a block of up to 8 tiles of keys (128)
// at a time per kv head. S as 16 keys x 16 queries per AMX tile (K rows loaded from the page), one
// online-softmax step for the block, and O += P V as 16 queries x 16 value slots per AMX tile, 32
// keys per step, from P transposed to bf16 and V key pairs interleaved (the slot order of
// bf16_dot.h); O goes through the tiles once per block.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "query_lanes.h"

#if defined(__AMX_BF16__)
#include <immintrin.h>
#endif

namespace stopkit::cpu::STOPKIT_ISA {
namespace {

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
// constant, not a local: the compiler may drop stores to a local that only ldtilecfg reads.)
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
  const int64_t s_steps = (D / 32) * kBlockTiles;              // per K tile and 32 dims
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
// steps pf per 16 keys (else the memory would idle through the softmax).
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
  const int steps = (blk.count + 1) / 2;                                          // 32 keys each
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
  const __m512i interleave =
      _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                       21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
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
      auto* tile =
          reinterpret_cast<uint32_t*>(bb.p_tiles.data()) + (j * kBlockTiles / 2 + b / 2) * 256;
      transpose_8x16(pairs, tile + (b % 2) * 8, 16);
    }
  }
  for (int64_t g = 0; g < groups; g += NG) {  // NG slot groups per round (2 at a tail: D % 32 == 0)
    const int64_t ng = std::min<int64_t>(NG, groups - g);
    // V pairs: row (b % 2) * 8 + i of step b / 2, group gg: (V[2i][dim], V[2i+1][dim]) of tile b
    // for the group's 16 slots (bf16_dot.h's slot order); zero past a tile's keys.
    for (int b = 0; b < 2 * steps; ++b) {
      const int64_t n = b < blk.count ? blk.tiles[b].n : 0;
      const uint16_t* v = b < blk.count ? blk.tiles[b].v + g * 16 : nullptr;
      uint16_t* vp = bb.v_pairs.data() + (b / 2) * NG * 512 + (b % 2) * 8 * 32;
      for (int64_t i = 0; i < 8; ++i) {
        for (int64_t gg = 0; gg < ng; gg += 2) {
          const __m512i x0 = 2 * i < n ? _mm512_loadu_si512(v + 2 * i * rs + gg * 16) : zero;
          const __m512i x1 =
              2 * i + 1 < n ? _mm512_loadu_si512(v + (2 * i + 1) * rs + gg * 16) : zero;
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
        case 3:
          if constexpr (NB > 2) scores(std::integral_constant<int, 3>{});
          break;
        default:
          if constexpr (NB > 2) scores(std::integral_constant<int, 4>{});
          break;
      }
    }
  }
  alignas(64) float corr[kMaxVecs * 16];
  const bool changed = block_softmax(w, blk, scale, bb, corr, pf);
  block_pv<MV, kD>(w, blk, rs, D, corr, changed, active, bb, pf);
  blk.count = 0;
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

}  // namespace
}  // namespace stopkit::cpu::STOPKIT_ISA
