// paged_attention on the CPU: the driver. Built once per instruction set (STOPKIT_ISA = generic |
// avx2 | avx512 | avx512bf16 | amx, see CMakeLists.txt) from the same source: the inner loops use
// native-width vector types (csrc/include/stopkit/cpu/vec.h) that the compiler lowers for each
// build. The kernel variants live in paged_attention/, one header each:
//   query_lanes.h  float rows, the queries of a kv head in the vector lanes
//   dot_pass.h     float rows, few queries per kv head: lanes along head_dim
//   bf16_dot.h     bfloat16 rows in the avx512bf16 build (vdpbf16ps)
//   amx.h          bfloat16 rows in the amx build (AMX tiles, blocks of 128 keys)
//   prefetch.h     the software prefetcher they step as they work
//
// Work item = (row, context split). An item walks the row's pages in order and, while a page is in
// cache, runs every kv head over it (a page's [block_size, Hkv, D] keys are one contiguous range,
// prefetched a page ahead); each kv head reads the page once for all G query heads of its group and
// all q_len queries. A row longer than kSplitKeys is split into chunks of that many keys, merged by
// their log-sum-exp (stopkit/state.h).
#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "paged_attention/amx.h"
#include "paged_attention/bf16_dot.h"
#include "paged_attention/common.h"
#include "paged_attention/dot_pass.h"
#include "paged_attention/query_lanes.h"
#include "stopkit/cpu/kernels.h"
#include "stopkit/state.h"

namespace stopkit::cpu::STOPKIT_ISA {
namespace {

using State = SoftmaxState<NaturalLog>;

// The calling thread's buffers for the partial results of split rows, kept between calls (fresh
// ones would cost page faults and zeroing on every call); they grow to the largest call's need.
struct Workspace {
  std::vector<float> acc;
  std::vector<State> states;
};

inline Workspace& workspace() {
  static thread_local Workspace w;
  return w;
}

struct Item {
  int64_t b, blk_lo, blk_hi;  // row and its pages [blk_lo, blk_hi)
  bool last;                  // holds the row's last pages (and so its suffix)
  int64_t split;              // index of its row among the split rows; -1: the row's only item
  int64_t part;               // its slot in the partial results (split rows)
};

struct SplitRow {
  int64_t b, first_part, num_parts;
};

// Walks the pages of a work item in order and, while a page is in cache, runs
// attend(kh, k, v, n, pos0, masked, suffix) on each tile of n <= kTile keys of every kv head (a
// page's [block_size, Hkv, D] K and V are contiguous ranges; k and v point at the tile's first row,
// rows Hkv * D elements apart); then, for the row's last item, on each kv head's suffix. Pages
// entirely below every query's window (lowest) are skipped; tiles starting below the highest window
// bound are masked. Prefetching: at the start of every `ahead` pages, the `ahead` pages after them
// go into pf, spread over `steps` calls of pf.step() (attend makes them); past the item's end that
// is the row's next chunk, whose first pages then wait in cache for the item that runs it.
template <typename T, typename Attend>
inline void walk_pages(const PagedAttentionParams& p, const Item& it, float lowest, float highest,
                       int64_t ahead, int64_t steps, Prefetcher& pf, Attend&& attend) {
  const int64_t Hkv = p.num_kv_heads, D = p.head_dim, bs = p.block_size, S = p.q_len;
  const int64_t L = p.seq_lens[it.b], tok_stride = Hkv * D, page_elems = bs * tok_stride;
  const bool windowed = p.window > 0;
  const auto* kc = static_cast<const T*>(p.k_cache);
  const auto* vc = static_cast<const T*>(p.v_cache);
  const int32_t* table = p.block_table + it.b * p.max_blocks_per_row;
  const int64_t nblk = (L + bs - 1) / bs;
  auto page_len = [&](int64_t j) { return std::min(bs, L - j * bs); };
  int64_t first = it.blk_lo;
  while (windowed && first < it.blk_hi &&
         static_cast<float>(first * bs + page_len(first)) <= lowest)
    ++first;
  auto queue = [&](int64_t from, int64_t to) {
    for (int64_t j = from; j < std::min(to, nblk); ++j) {
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
// over its pages (walk_pages). Writes the unnormalised acc [Hkv][M][D] and the states [Hkv][M].
template <DType DT, int kD, int W, int MV>
void run_pass(const PagedAttentionParams& p, const Item& it, int64_t m0,
              std::vector<Pass<W, MV>>& ws, TileBuffers& buf, float* acc_out, State* st_out) {
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
  // head). Stored through plain pointers: indexing the vectors' lanes would reload their bases and
  // the scale at every store, which split rows pay once per item.
  constexpr bool kPaired = kPairedS<DT, W>;
  const float scale = p.scale;
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
      if constexpr (kDot) {  // q_pairs[pr * MV + j][e]
        int32_t* dst = reinterpret_cast<int32_t*>(w.q_pairs.data()) + j * W + e;
        for (int64_t pr = 0; pr < D / 2; ++pr)
          dst[pr * MV * W] = static_cast<int32_t>(src[2 * pr] | (uint32_t{src[2 * pr + 1]} << 16));
      } else if constexpr (
          kPaired) {  // qt_pairs[pr * pair_vecs + lane / 8][2 * (lane % 8) + d % 2]
        float* dst = reinterpret_cast<float*>(w.qt_pairs.data()) + lane / 8 * W + 2 * (lane % 8);
        for (int64_t pr = 0; pr < D / 2; ++pr) {
          dst[pr * pair_vecs * W] = Elem<DT>::load(src[2 * pr]) * scale;
          dst[pr * pair_vecs * W + 1] = Elem<DT>::load(src[2 * pr + 1]) * scale;
        }
      } else {  // qt[d * MV + j][e]
        float* dst = reinterpret_cast<float*>(w.qt.data()) + j * W + e;
        for (int64_t d = 0; d < D; ++d) dst[d * MV * W] = Elem<DT>::load(src[d]) * scale;
      }
      const float lo =
          windowed ? static_cast<float>(query_position(L, s, has_suffix) - p.window + 1) : kNegInf;
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
    if constexpr (kPaired)
      tile_steps += tile_keys / paired_block_keys(pair_vecs) * kScoreBlockSteps;
  }
#endif
  int64_t ahead = 1, steps = Hkv * page_tiles * tile_steps;
#if defined(__AMX_BF16__)
  const bool amx = W == 16 && use_amx(DT, D);
  std::vector<Block> blocks(amx ? Hkv : 0);
  if (amx) {  // the pages of the next block of tiles, over the steps of this block's AMX products
    ahead = std::max<int64_t>(1, kBlockTiles / page_tiles);
    steps =
        Hkv * std::max<int64_t>(1, ahead * page_tiles / kBlockTiles) * block_prefetch_steps<MV>(D);
  }
#endif
  walk_pages<T>(
      p, it, lowest, highest, ahead, steps, buf.prefetch,
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
      attend_tile_bf16<W, MV, kD>(w, k, v, tok_stride, n, D, p.scale, pos0, masked, suffix, active,
                                  buf);
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
      run_block<MV, kD>(ws[kh], blocks[kh], tok_stride, D, p.scale, active, *buf.block,
                        buf.prefetch);
  }
#endif
  for (int64_t kh = 0; kh < Hkv; ++kh) {
    Pass<W, MV>& w = ws[kh];
    const float* ot = reinterpret_cast<const float*>(w.ot.data());
    for (int64_t lane = 0; lane < active; ++lane) {
      const int64_t mi = kh * M + m0 + lane, j = lane / W, e = lane % W;
      float* dst = acc_out + mi * D;
      if constexpr (kDot) {
#if defined(__AVX512BF16__)
        slots_to_dims(ot + lane * D, D, dst);
#endif
      } else if constexpr (kPvDims<W>) {
        std::memcpy(dst, ot + lane * D, D * sizeof(float));
      } else {  // ot[d * MV + j][e]
        const float* src = ot + j * W + e;
        for (int64_t d = 0; d < D; ++d) dst[d] = src[d * MV * W];
      }
      st_out[mi] = w.l[j][e] > 0.0f ? State{w.m[j][e], w.l[j][e]} : State::empty();
    }
  }
}

// run_pass for the head_dim-lane layout: all M <= MP queries of every kv head of one work item.
template <DType DT, int kD, int MP>
void run_pass_dot(const PagedAttentionParams& p, const Item& it, std::vector<DotPass<MP>>& ws,
                  TileBuffers& buf, float* acc_out, State* st_out) {
  using T = typename Elem<DT>::T;
  const int64_t S = p.q_len, H = p.num_heads, Hkv = p.num_kv_heads, G = H / Hkv, M = G * S;
  const int64_t D = kD ? kD : p.head_dim, L = p.seq_lens[it.b], tok_stride = Hkv * D;
  const bool has_suffix = p.suffix_k != nullptr, windowed = p.window > 0;
  const auto* q = static_cast<const T*>(p.q);
  const float scale = p.scale;

  float lowest = std::numeric_limits<float>::max(), highest = kNegInf;
  for (int64_t kh = 0; kh < Hkv; ++kh) {
    DotPass<MP>& w = ws[kh];
    w.q.assign(MP * D, 0.0f);
    w.o.assign(MP * D, 0.0f);
    for (int j = 0; j < MP; ++j) {
      w.st[j] = {kMasked, 0.0f};
      w.lower[j] = kNegInf;
      w.qidx[j] = 0.0f;
    }
    for (int64_t j = 0; j < M; ++j) {
      const int64_t g = j / S, s = j % S;
      const T* src = q + ((it.b * S + s) * H + kh * G + g) * D;
      for (int64_t d = 0; d < D; ++d) w.q[j * D + d] = Elem<DT>::load(src[d]) * scale;
      const float lo =
          windowed ? static_cast<float>(query_position(L, s, has_suffix) - p.window + 1) : kNegInf;
      w.lower[j] = lo;
      w.qidx[j] = static_cast<float>(s);
      lowest = std::min(lowest, lo);
      highest = std::max(highest, lo);
    }
  }
  // A page ahead, over the steps of its tiles.
  const int64_t steps = Hkv * ((p.block_size + kTile - 1) / kTile) *
                        dot_steps(MP, std::min<int64_t>(kTile, p.block_size), D);
  walk_pages<T>(
      p, it, lowest, highest, 1, steps, buf.prefetch,
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
      st_out[mi] = w.st[j].l > 0.0f ? w.st[j] : State::empty();
    }
  }
}

template <DType DT, int kD>
void run(const PagedAttentionParams& p) {
  using T = typename Elem<DT>::T;
  const int64_t B = p.batch, S = p.q_len, H = p.num_heads, Hkv = p.num_kv_heads;
  const int64_t D = kD ? kD : p.head_dim, bs = p.block_size, G = H / Hkv, M = G * S;

  // Indices are checked here too (ops.py checks first): never read outside the cache.
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = p.seq_lens[b];
    STOPKIT_CHECK(L >= 0 && L <= p.max_blocks_per_row * bs,
                  "paged_attention: seq_lens[" + std::to_string(b) + "] = " + std::to_string(L) +
                      " outside [0, max_blocks_per_row * block_size]");
    const int64_t used = (L + bs - 1) / bs;
    for (int64_t j = 0; j < used; ++j) {
      const int32_t blk = p.block_table[b * p.max_blocks_per_row + j];
      STOPKIT_CHECK(blk >= 0 && blk < p.num_blocks,
                    "paged_attention: block_table[" + std::to_string(b) + ", " + std::to_string(j) +
                        "] = " + std::to_string(blk) + " outside [0, " +
                        std::to_string(p.num_blocks) + ")");
    }
  }

  // Work items: (row, chunk of kSplitKeys keys), each running every kv head of its row. Chunks lie
  // on multiples of kSplitKeys, from the first one the row's window reaches; a row that fits one
  // chunk is finished by its item directly.
  const int64_t HM = Hkv * M;             // query rows of one item
  const int64_t chunk = kSplitKeys / bs;  // pages per item (block_size <= 256 divides kSplitKeys)
  std::vector<Item> items;
  std::vector<SplitRow> split_rows;  // rows of more than one item
  int64_t parts = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = p.seq_lens[b], nblk = (L + bs - 1) / bs;
    const int64_t first_key =
        p.window > 0
            ? std::max<int64_t>(0, query_position(L, 0, p.suffix_k != nullptr) - p.window + 1)
            : 0;
    const int64_t c_lo = first_key / bs / chunk,
                  c_hi = std::max(c_lo + 1, (nblk + chunk - 1) / chunk);
    const int64_t split = c_hi - c_lo > 1 ? static_cast<int64_t>(split_rows.size()) : -1;
    if (split >= 0) split_rows.push_back({b, parts, c_hi - c_lo});
    for (int64_t c = c_lo; c < c_hi; ++c) {
      const int64_t hi = std::min(nblk, (c + 1) * chunk);
      items.push_back({b, std::min(hi, std::max(first_key / bs, c * chunk)), hi, c == c_hi - 1,
                       split, split >= 0 ? parts++ : -1});
    }
  }
  // Parts still running per split row: the thread that finishes a row's last part merges the row
  // (while its parts are still in cache).
  std::unique_ptr<std::atomic<int64_t>[]> parts_left(new std::atomic<int64_t>[split_rows.size()]);
  for (size_t i = 0; i < split_rows.size(); ++i) parts_left[i].store(split_rows[i].num_parts);
  // Unnormalised partial results of the split rows' items: acc [parts][HM][D], states [parts][HM].
  Workspace& ws = workspace();
  if (ws.acc.size() < static_cast<size_t>(parts * HM * D)) ws.acc.resize(parts * HM * D);
  if (ws.states.size() < static_cast<size_t>(parts * HM)) ws.states.resize(parts * HM);
  float* const part_acc =
      ws.acc.data();  // (pointers: the team's threads have workspaces of their own)
  State* const part_st = ws.states.data();

  auto* out = static_cast<T*>(p.out);
  auto finish = [&](int64_t b, int64_t kh, int64_t mi, const float* acc, State st) {
    const int64_t h = kh * G + mi / S, row = (b * S + mi % S) * H + h;
    const float acc_scale = p.sinks ? st.add_sink(p.sinks[h]) : 1.0f;
    const float inv = st.output_scale(acc_scale);
    T* o = out + row * D;
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) o[i] = Elem<DT>::store(acc[i] * inv);
    if (p.lse) p.lse[row] = st.lse();
  };
  // A split row's parts merge in order, the first chunk first: the same sums whatever ran them.
  auto merge = [&](const SplitRow& row, float* merged) {
    for (int64_t hm = 0; hm < HM; ++hm) {
      State st = State::empty();
      std::fill(merged, merged + D, 0.0f);
      for (int64_t sp = 0; sp < row.num_parts; ++sp) {
        const int64_t at = (row.first_part + sp) * HM + hm;
        const State::Scales c = st.merge(part_st[at]);
        const float* pa = part_acc + at * D;
#pragma omp simd
        for (int64_t i = 0; i < D; ++i) merged[i] = merged[i] * c.self + c.other * pa[i];
      }
      finish(row.b, hm / M, hm % M, merged, st);
    }
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
    std::vector<float> acc(HM * D);
    std::vector<State> sts(HM);
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
    for (size_t i = 0; i < items.size(); ++i) {
      const Item& it = items[i];
      const bool direct = it.split < 0;
      float* acc_out = direct ? acc.data() : part_acc + it.part * HM * D;
      State* st_out = direct ? sts.data() : part_st + it.part * HM;
      if (dot_layout) {
        if (M == 1) run_pass_dot<DT, kD>(p, it, dot1, buf, acc_out, st_out);
        else if (M == 2) run_pass_dot<DT, kD>(p, it, dot2, buf, acc_out, st_out);
        else run_pass_dot<DT, kD>(p, it, dot4, buf, acc_out, st_out);
      }
      for (int64_t m0 = 0; !dot_layout && m0 < M; m0 += kMaxVecs * kLanes) {
        const int64_t rest = M - m0,
                      vecs = std::min<int64_t>(kMaxVecs, (rest + kLanes - 1) / kLanes);
        if (rest <= 4 && kLanes > 4 && !amx) {  // AMX: 16-lane passes only (a tile row of S)
          run_pass<DT, kD>(p, it, m0, narrow4, buf, acc_out, st_out);
        } else if (rest <= 8 && kLanes > 8 && !amx && !kPairedS<DT, kLanes>) {
          // (where S runs by dim pairs, 5..8 queries fill a 16-lane pass instead)
          run_pass<DT, kD>(p, it, m0, narrow8, buf, acc_out, st_out);
        } else {
          switch (vecs) {
            case 1: run_pass<DT, kD>(p, it, m0, w1, buf, acc_out, st_out); break;
            case 2: run_pass<DT, kD>(p, it, m0, w2, buf, acc_out, st_out); break;
            case 3: run_pass<DT, kD>(p, it, m0, w3, buf, acc_out, st_out); break;
            default: run_pass<DT, kD>(p, it, m0, w4, buf, acc_out, st_out); break;
          }
        }
      }
      if (direct) {
        for (int64_t r = 0; r < HM; ++r) finish(it.b, r / M, r % M, acc_out + r * D, st_out[r]);
      } else if (parts_left[it.split].fetch_sub(1, std::memory_order_acq_rel) == 1) {
        merge(split_rows[it.split], acc.data());
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
