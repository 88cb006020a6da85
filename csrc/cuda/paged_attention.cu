// paged_attention on CUDA (sm_80+): split-KV flash decoding over a paged cache.
//
// One block of 4 warps per (row, kv head, context split, query tile). The block streams its keys
// and values through shared memory once, 16-byte cp.async copies `stages` tiles deep, and every
// query row of the tile (G query heads x q_len queries, up to 64) reads them there. Warps split a
// tile two ways: by 16-row query slices (mt) and by 16-key chunks (kg); each warp keeps its own
// online softmax (float32) and the block merges its warps at the end. Half types run QK^T and PV
// on the tensor cores (mma.sync m16n8k16, float32 accumulators, P rounded to the input type as
// in FlashAttention); float32 runs the same data layout with scalar FMAs, for exact results.
// The pipeline depth, query tile and shared memory come from the launch plan
// (stopkit/cuda/launch_plan.h), chosen from the device's shared-memory limit.
//
// Keys of a block form one list: its share of the cached positions [lo, seq_len) (lo > 0 only
// under a window), then, in the last split, the q_len suffix keys at positions seq_len + j. Each
// key's absolute position sits in shared memory beside the tile (-1 for a masked key: past the
// list, or on a block id outside [0, num_blocks)), so one test does causal, window and padding:
// query row at position qp sees key position kp iff max(0, qp - window + 1) <= kp <= qp.
// Scores live in the log2 domain (scale * log2 e folded in); each row's online softmax and every
// merge of partial rows (key groups, splits, the sink) go through stopkit/state.h.
//
// With more than one split, each block writes (out / l, log2-sum-exp) per row to a float32
// workspace that the caller allocates (torch's allocator: CUDA graphs and memory accounting see
// it), and a second kernel merges the splits by their LSE; sinks join there.
#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <mutex>

#include "stopkit/cuda/common.cuh"
#include "stopkit/cuda/kernels.cuh"
#include "stopkit/state.h"

namespace stopkit::cuda {
namespace {

using State = SoftmaxState<Log2>;
static_assert(kMaxStages - 2 <= 2, "cp_async_wait_dynamic waits for at most 2 groups");

std::atomic<int> g_num_splits{0};
std::atomic<int64_t> g_smem_limit{0};

// Compile-time shape of one kernel instance: element type T, head_dim bucket DMAX.
template <typename T, int DMAX>
struct Cfg {
  static constexpr TileLayout kLayout{static_cast<int>(sizeof(T)), DMAX};
  static constexpr int E16 = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte chunk
  static constexpr int LD = kLayout.ld();
  static constexpr int TILE = kLayout.keys();
  static constexpr int KSTEPS = DMAX / 16;
  static constexpr int kChunksPerThread = TILE * DMAX * static_cast<int>(sizeof(T)) / 16 / kThreads;
  static constexpr bool kMma = kLayout.mma();
  static constexpr bool kQInRegs = kMma && DMAX <= 128;
  static constexpr int kPLd = TileLayout::kPLd;
  static constexpr int kRedLd = kLayout.red_ld();
  static_assert(TILE % 16 == 0 && TILE >= 16, "a tile holds whole 16-key chunks");
  static_assert(kChunksPerThread * kThreads * 16 == TILE * DMAX * static_cast<int>(sizeof(T)), "");
};

struct Launch {
  PagedAttentionParams p;
  int G, GS;   // query heads per kv head; query rows per (row, kv head) = G * q_len
  int mt;      // 16-row query slices per block (1, 2 or 4); key groups = kWarps / mt
  int stages;  // pipeline depth
  int qtiles, nsplit;
  int log2_bs;
  float scale2;   // softmax scale * log2(e): scores live in the log2 domain
  float* ws_o;    // [nsplit][B*S*H][D] or null when nsplit == 1
  float* ws_lse;  // [nsplit][B*S*H], log2 domain
};

// The keys of one block: row b, kv head kvh, split sp, query tile qt.
struct Work {
  int64_t b;
  int kvh, sp, qt;
  int L;        // cached keys of the row (seq_len, clamped to the block table)
  int c_begin;  // first cached position of this split
  int nc, nk;   // cached keys of this split; plus the suffix keys (last split only)
  int ntiles;
};

template <int TILE>
__device__ __forceinline__ Work locate(const Launch& a) {
  const PagedAttentionParams& p = a.p;
  Work w;
  // The query tile varies fastest so that blocks sharing keys run together.
  int64_t item = blockIdx.x;
  w.qt = static_cast<int>(item % a.qtiles);
  item /= a.qtiles;
  w.sp = static_cast<int>(item % a.nsplit);
  item /= a.nsplit;
  w.kvh = static_cast<int>(item % p.num_kv_heads);
  w.b = item / p.num_kv_heads;

  const bool has_suffix = p.suffix_k != nullptr;
  const int64_t max_len = p.max_blocks_per_row << a.log2_bs;
  w.L = static_cast<int>(min64(max64(p.seq_lens[w.b], 0), max_len));
  // Cached keys [lo, L): lo > 0 only when a window hides the oldest positions from every query.
  int lo = 0;
  if (p.window > 0) lo = static_cast<int>(max64(0, (has_suffix ? w.L : w.L - 1) - p.window + 1));
  lo = min(lo, w.L);
  const int n_cached = w.L - lo;
  int per = (n_cached + a.nsplit - 1) / a.nsplit;
  per = (per + 15) & ~15;
  w.c_begin = lo + static_cast<int>(min64(n_cached, int64_t(w.sp) * per));
  const int c_end = lo + static_cast<int>(min64(n_cached, int64_t(w.sp + 1) * per));
  w.nc = c_end - w.c_begin;
  w.nk = w.nc + ((has_suffix && w.sp == a.nsplit - 1) ? static_cast<int>(p.q_len) : 0);
  w.ntiles = (w.nk + TILE - 1) / TILE;
  return w;
}

// Issues the cp.async copies of key tile `tile` into one stage (zero-fill for masked keys) and
// writes the keys' positions. The block-table reads of all chunks go out first and the rest is
// branch-free, so one thread waits for one table read per tile, not one per chunk.
template <typename T, int DMAX, bool EXACT>
__device__ __forceinline__ void load_kv_tile(const Launch& a, const Work& w, int tile, T* ks, T* vs,
                                             int* kpos) {
  using C = Cfg<T, DMAX>;
  constexpr int TILE = C::TILE, LD = C::LD, E16 = C::E16;
  const PagedAttentionParams& p = a.p;
  const int D = EXACT ? DMAX : static_cast<int>(p.head_dim);
  const int cpr = D / E16;  // 16-byte chunks per key row
  const int tid = threadIdx.x;
  const T* kc = static_cast<const T*>(p.k_cache);
  const T* vc = static_cast<const T*>(p.v_cache);
  const T* sk = static_cast<const T*>(p.suffix_k);
  const T* sv = static_cast<const T*>(p.suffix_v);
  const int32_t* bt = p.block_table + w.b * p.max_blocks_per_row;
  const int64_t tok_stride = p.num_kv_heads * D;  // elements between consecutive tokens

  int page[C::kChunksPerThread];
#pragma unroll
  for (int i = 0; i < C::kChunksPerThread; ++i) {
    const int c = tid + i * kThreads;
    const int key = tile * TILE + c / cpr;
    const bool cached = (EXACT || c < TILE * cpr) && key < w.nc;
    page[i] = cached ? __ldg(bt + ((w.c_begin + key) >> a.log2_bs)) : -1;
  }
#pragma unroll
  for (int i = 0; i < C::kChunksPerThread; ++i) {
    const int c = tid + i * kThreads;
    if (!EXACT && c >= TILE * cpr) break;  // generic head_dim: fewer chunks per tile
    const int r = c / cpr, cc = c - r * cpr;
    const int key = tile * TILE + r;
    const int t = w.c_begin + key, j = key - w.nc;  // cached position / suffix index
    const bool cached = key < w.nc;
    const bool ok = cached ? (page[i] >= 0 && page[i] < p.num_blocks) : key < w.nk;
    if (cached) debug_trap_if(!ok);
    const int64_t off =
        cached ? (int64_t(page[i]) * p.block_size + (t & (p.block_size - 1))) * tok_stride
               : ((w.b * p.q_len + j) * p.num_kv_heads) * D;
    const int64_t col = int64_t(w.kvh) * D + cc * E16;
    const T* ksrc = ok ? (cached ? kc : sk) + off + col : kc;  // a valid address even when unused
    const T* vsrc = ok ? (cached ? vc : sv) + off + col : vc;
    cp_async_16(ks + r * LD + cc * E16, ksrc, ok);
    cp_async_16(vs + r * LD + cc * E16, vsrc, ok);
    if (cc == 0) kpos[r] = ok ? (cached ? t : w.L + j) : -1;
  }
}

// Query rows of the block into shared memory: row r is R = row0 + r, R = s * G + g (query s,
// head kvh * G + g); rows past GS are zero.
template <typename T, int DMAX, bool EXACT>
__device__ __forceinline__ void load_queries(const Launch& a, const Work& w, int row0, int rows,
                                             T* q_s) {
  using C = Cfg<T, DMAX>;
  const PagedAttentionParams& p = a.p;
  const int D = EXACT ? DMAX : static_cast<int>(p.head_dim);
  const int cpr = D / C::E16;
  const T* qg = static_cast<const T*>(p.q);
  for (int c = threadIdx.x; c < rows * cpr; c += kThreads) {
    const int r = c / cpr, cc = c - r * cpr;
    const int R = row0 + r;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (R < a.GS) {
      const int s = R / a.G, g = R - s * a.G;
      v = *reinterpret_cast<const uint4*>(
          qg + ((w.b * p.q_len + s) * p.num_heads + int64_t(w.kvh) * a.G + g) * D + cc * C::E16);
    }
    *reinterpret_cast<uint4*>(q_s + r * C::LD + cc * C::E16) = v;
  }
}

// Query fragments of a warp's 16-row slice, kept in registers where they fit (half types,
// head_dim <= 128); otherwise QK^T reloads them from shared memory per chunk.
template <typename T, int DMAX>
struct QFrags {
  uint32_t r[Cfg<T, DMAX>::kQInRegs ? Cfg<T, DMAX>::KSTEPS : 1][4];
};

// Lane's ldmatrix address of the A operand (16 query rows x 16 dims at kk * 16): lanes 0-7 rows
// 0-7, 8-15 rows 8-15 (dims 0-7), 16-31 the same rows at dims 8-15.
template <typename T, int LD>
__device__ __forceinline__ const T* q_frag_addr(const T* q_warp, int kk, int lane) {
  return q_warp + ((lane & 7) + ((lane >> 3) & 1) * 8) * LD + kk * 16 + (lane >> 4) * 8;
}

template <typename T, int DMAX, bool EXACT>
__device__ __forceinline__ void load_q_frags(QFrags<T, DMAX>& qf, const T* q_warp, int D,
                                             int lane) {
  using C = Cfg<T, DMAX>;
  if constexpr (C::kQInRegs) {
#pragma unroll
    for (int kk = 0; kk < C::KSTEPS; ++kk) {
      if (EXACT || kk < D / 16) ldmatrix_x4(qf.r[kk], q_frag_addr<T, C::LD>(q_warp, kk, lane));
    }
  }
}

// Scores of 16 keys (chunk ch of the stage) for the warp's 16 query rows:
// sc[j][e] row g, key ch*16 + j*8 + 2*t4 + e; sc[j][2 + e] row g + 8 (g = lane / 4, t4 = lane % 4).
template <typename T, int DMAX, bool EXACT>
__device__ __forceinline__ void qk_chunk(float (&sc)[2][4], const QFrags<T, DMAX>& qf,
                                         const T* q_warp, const T* ks, int ch, int D, int lane) {
  using C = Cfg<T, DMAX>;
  constexpr int LD = C::LD;
#pragma unroll
  for (int j = 0; j < 2; ++j) sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.0f;
  if constexpr (C::kMma) {
#pragma unroll
    for (int kk = 0; kk < C::KSTEPS; ++kk) {
      if (EXACT || kk < D / 16) {
        uint32_t qa[4];
        if constexpr (C::kQInRegs) {
          qa[0] = qf.r[kk][0];
          qa[1] = qf.r[kk][1];
          qa[2] = qf.r[kk][2];
          qa[3] = qf.r[kk][3];
        } else {
          ldmatrix_x4(qa, q_frag_addr<T, LD>(q_warp, kk, lane));
        }
        // B operand (K^T): lanes 0-7 keys 0-7 dims 0-7, 8-15 keys 0-7 dims 8-15, 16-31 keys 8-15.
        uint32_t kb[4];
        ldmatrix_x4(kb, ks + (ch * 16 + (lane & 7) + (lane >> 4) * 8) * LD + kk * 16 +
                            ((lane >> 3) & 1) * 8);
        mma_16816<T>(sc[0], qa, kb[0], kb[1]);
        mma_16816<T>(sc[1], qa, kb[2], kb[3]);
      }
    }
  } else {
    const int g = lane >> 2, t4 = lane & 3;
    const float* q0 = reinterpret_cast<const float*>(q_warp) + g * LD;
    const float* q1 = q0 + 8 * LD;
    const float* kf = reinterpret_cast<const float*>(ks) + (ch * 16 + 2 * t4) * LD;
#pragma unroll 4
    for (int d = 0; d < DMAX; d += 4) {
      if (!EXACT && d >= D) break;
      const float4 a0 = *reinterpret_cast<const float4*>(q0 + d);
      const float4 a1 = *reinterpret_cast<const float4*>(q1 + d);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float4 k4 = *reinterpret_cast<const float4*>(kf + (j * 8 + e) * LD + d);
          sc[j][e] += a0.x * k4.x + a0.y * k4.y + a0.z * k4.z + a0.w * k4.w;
          sc[j][2 + e] += a1.x * k4.x + a1.y * k4.y + a1.z * k4.z + a1.w * k4.w;
        }
      }
    }
  }
}

// One online-softmax step over a chunk's scores: masks by position, raises the running max of
// this thread's two rows (st; their l holds this thread's share of the sum, its quad adds them
// up at the end), turns the scores into P in place and returns in alpha the factor the
// accumulator rows must be scaled by.
__device__ __forceinline__ void softmax_step(float (&sc)[2][4], const int* kp, const int (&qpos)[2],
                                             const int (&qlo)[2], float scale2, State (&st)[2],
                                             float (&alpha)[2], int lane) {
  const int t4 = lane & 3;
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int j = 0; j < 2; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int kpos = kp[j * 8 + 2 * t4 + e];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float& s = sc[j][2 * i + e];
        s = (kpos >= qlo[i] && kpos <= qpos[i]) ? s * scale2 : -INFINITY;
        mx[i] = fmaxf(mx[i], s);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
    alpha[i] = st[i].raise_max(mx[i]);
  }
  float psum[2] = {0.0f, 0.0f};
#pragma unroll
  for (int j = 0; j < 2; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      sc[j][e] = State::rescale(sc[j][e], st[e >> 1].m);  // 0 for a masked key
      psum[e >> 1] += sc[j][e];
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) st[i].l += psum[i];
}

template <int DMAX>
__device__ __forceinline__ void scale_rows(float (&acc)[DMAX / 8][4], const float (&alpha)[2]) {
#pragma unroll
  for (int n = 0; n < DMAX / 8; ++n) {
    acc[n][0] *= alpha[0];
    acc[n][1] *= alpha[0];
    acc[n][2] *= alpha[1];
    acc[n][3] *= alpha[1];
  }
}

// acc += P V over the chunk's 16 keys; acc[n] holds dims n*8 + 2*t4 + {0, 1} of rows g, g + 8.
// ps: the warp's P staging rows (float32 path only).
template <typename T, int DMAX, bool EXACT>
__device__ __forceinline__ void pv_chunk(float (&acc)[DMAX / 8][4], const float (&sc)[2][4],
                                         const T* vs, int ch, int D, float* ps, int lane) {
  using C = Cfg<T, DMAX>;
  constexpr int LD = C::LD;
  if constexpr (C::kMma) {
    // P as the A operand: rows g / g + 8, keys 2*t4 (+8) of the chunk.
    const uint32_t pa[4] = {pack2<T>(sc[0][0], sc[0][1]), pack2<T>(sc[0][2], sc[0][3]),
                            pack2<T>(sc[1][0], sc[1][1]), pack2<T>(sc[1][2], sc[1][3])};
#pragma unroll
    for (int np = 0; np < DMAX / 16; ++np) {
      if (EXACT || np < D / 16) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, vs + (ch * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + np * 16 +
                                  (lane >> 4) * 8);
        mma_16816<T>(acc[2 * np], pa, vb[0], vb[1]);
        mma_16816<T>(acc[2 * np + 1], pa, vb[2], vb[3]);
      }
    }
  } else {
    const int g = lane >> 2, t4 = lane & 3;
    __syncwarp();  // the previous chunk's reads of ps are done
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        ps[g * C::kPLd + j * 8 + 2 * t4 + e] = sc[j][e];
        ps[(g + 8) * C::kPLd + j * 8 + 2 * t4 + e] = sc[j][2 + e];
      }
    }
    __syncwarp();
    const float* vf = reinterpret_cast<const float*>(vs) + ch * 16 * LD + 2 * t4;
#pragma unroll 2
    for (int k = 0; k < 16; ++k) {
      const float pa0 = ps[g * C::kPLd + k], pa1 = ps[(g + 8) * C::kPLd + k];
#pragma unroll
      for (int n = 0; n < DMAX / 8; ++n) {
        if (EXACT || n < D / 8) {
          const float2 v2 = *reinterpret_cast<const float2*>(vf + k * LD + n * 8);
          acc[n][0] += pa0 * v2.x;
          acc[n][1] += pa0 * v2.y;
          acc[n][2] += pa1 * v2.x;
          acc[n][3] += pa1 * v2.y;
        }
      }
    }
  }
}

// Folds head h's sink (if any) into a finished row's state and returns the factor that turns the
// row's accumulator into its output.
__device__ __forceinline__ float finish_row(State& st, const float* sinks, int64_t h) {
  const float c = sinks ? st.add_sink(sinks[h] * Log2::kFromNatural) : 1.0f;
  return st.output_scale() * c;  // 1 / l, then c: no general division (its slow path spills)
}
// Epilogue: merges the key groups of each query slice through shared memory (the pipeline's,
// drained), then writes each row's output and LSE, or its split's partial to the workspace.
template <typename T, int DMAX, bool EXACT>
__device__ __forceinline__ void epilogue(const Launch& a, const Work& w, int row0, int rows,
                                         const float (&acc)[DMAX / 8][4], State (&st)[2],
                                         unsigned char* smem) {
  using C = Cfg<T, DMAX>;
  const PagedAttentionParams& p = a.p;
  const int D = EXACT ? DMAX : static_cast<int>(p.head_dim);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int n_kg = kWarps / a.mt;
#pragma unroll
  for (int i = 0; i < 2; ++i) {  // the quad's shares of the sum (the max is the quad's already)
    st[i].l += __shfl_xor_sync(0xffffffffu, st[i].l, 1);
    st[i].l += __shfl_xor_sync(0xffffffffu, st[i].l, 2);
  }
  float* red = reinterpret_cast<float*>(smem);    // [kWarps][16][kRedLd]
  float* red_ml = red + kWarps * 16 * C::kRedLd;  // [kWarps][16][2]: m, l
  {
    float* ro = red + warp * 16 * C::kRedLd;
#pragma unroll
    for (int n = 0; n < DMAX / 8; ++n) {
      if (EXACT || n < D / 8) {
        *reinterpret_cast<float2*>(ro + g * C::kRedLd + n * 8 + 2 * t4) =
            make_float2(acc[n][0], acc[n][1]);
        *reinterpret_cast<float2*>(ro + (g + 8) * C::kRedLd + n * 8 + 2 * t4) =
            make_float2(acc[n][2], acc[n][3]);
      }
    }
    if (t4 == 0) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        red_ml[(warp * 16 + g + 8 * i) * 2] = st[i].m;
        red_ml[(warp * 16 + g + 8 * i) * 2 + 1] = st[i].l;
      }
    }
  }
  __syncthreads();

  const int64_t nrows = p.batch * p.q_len * p.num_heads;
  const int d4n = D / 4;
  for (int e = tid; e < rows * d4n; e += kThreads) {
    const int r = e / d4n, d = (e - r * d4n) * 4;
    const int R = row0 + r;
    if (R >= a.GS) break;  // rows only grow with e
    const int slice = r >> 4, rr = r & 15;
    State row = State::empty();
    float o[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int k = 0; k < n_kg; ++k) {
      const int wk = k * a.mt + slice;
      const State::Scales c =
          row.merge({red_ml[(wk * 16 + rr) * 2], red_ml[(wk * 16 + rr) * 2 + 1]});
      const float4 v = *reinterpret_cast<const float4*>(red + (wk * 16 + rr) * C::kRedLd + d);
      o[0] = o[0] * c.self + v.x * c.other;
      o[1] = o[1] * c.self + v.y * c.other;
      o[2] = o[2] * c.self + v.z * c.other;
      o[3] = o[3] * c.self + v.w * c.other;
    }
    const int s = R / a.G, gq = R - s * a.G;
    const int64_t h = int64_t(w.kvh) * a.G + gq;
    const int64_t orow = (w.b * p.q_len + s) * p.num_heads + h;
    if (a.ws_o == nullptr) {
      const float scale = finish_row(row, p.sinks, h);
      store4(static_cast<T*>(p.out) + orow * D + d, o[0] * scale, o[1] * scale, o[2] * scale,
             o[3] * scale);
      if (p.lse && d == 0) p.lse[orow] = row.natural_lse();
    } else {  // this split's normalised rows and their log2-sum-exp, for merge_splits_kernel
      const float scale = row.output_scale();
      const int64_t wrow = int64_t(w.sp) * nrows + orow;
      *reinterpret_cast<float4*>(a.ws_o + wrow * D + d) =
          make_float4(o[0] * scale, o[1] * scale, o[2] * scale, o[3] * scale);
      if (d == 0) a.ws_lse[wrow] = row.lse();
    }
  }
}

template <typename T, int DMAX, bool EXACT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    paged_attention_kernel(const Launch a) {
  using C = Cfg<T, DMAX>;
  constexpr int TILE = C::TILE, LD = C::LD;
  const PagedAttentionParams& p = a.p;
  const int D = EXACT ? DMAX : static_cast<int>(p.head_dim);
  const int stages = a.stages;

  constexpr TileLayout layout = C::kLayout;
  extern __shared__ __align__(16) unsigned char smem[];
  T* kv_s = reinterpret_cast<T*>(smem);  // [stages][K|V][TILE][LD]
  int* kpos_s = reinterpret_cast<int*>(smem + layout.kpos_offset(stages));  // [stages][TILE]
  float* p_s = reinterpret_cast<float*>(smem + layout.p_offset(stages));    // float32 path
  T* q_s = reinterpret_cast<T*>(smem + layout.q_offset(stages));            // [16 * mt][LD]
  auto k_stage = [&](int s) { return kv_s + size_t(s) * 2 * TILE * LD; };

  const Work w = locate<TILE>(a);
  for (int s = 0; s < stages - 1; ++s) {
    if (s < w.ntiles)
      load_kv_tile<T, DMAX, EXACT>(a, w, s, k_stage(s), k_stage(s) + TILE * LD, kpos_s + s * TILE);
    cp_async_commit();
  }
  const int rows = 16 * a.mt, row0 = w.qt * rows;
  load_queries<T, DMAX, EXACT>(a, w, row0, rows, q_s);
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int mt = warp % a.mt, kg = warp / a.mt, n_kg = kWarps / a.mt;
  const bool has_suffix = p.suffix_k != nullptr;
  // This thread's two rows (mma layout): r = mt * 16 + lane / 4 + 8 * i.
  int qpos[2], qlo[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int R = row0 + mt * 16 + (lane >> 2) + 8 * i;
    qpos[i] =
        R < a.GS ? (has_suffix ? w.L + R / a.G : w.L - 1) : -1;  // -1: padding row, sees nothing
    qlo[i] = p.window > 0 ? static_cast<int>(max64(0, int64_t(qpos[i]) - p.window + 1)) : 0;
  }

  float acc[DMAX / 8][4];
#pragma unroll
  for (int n = 0; n < DMAX / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
  State st[2] = {State::empty(), State::empty()};
  const T* q_warp = q_s + mt * 16 * LD;
  QFrags<T, DMAX> qf;
  load_q_frags<T, DMAX, EXACT>(qf, q_warp, D, lane);

  int stage = 0, fill = stages - 1;  // stage of tile `it`; stage that tile it + stages - 1 fills
  for (int it = 0; it < w.ntiles; ++it) {
    cp_async_wait_dynamic(stages - 2);
    __syncthreads();  // tile `it` is in shared memory; stage `fill` (read at it - 1) is free again
    if (it + stages - 1 < w.ntiles) {
      load_kv_tile<T, DMAX, EXACT>(a, w, it + stages - 1, k_stage(fill), k_stage(fill) + TILE * LD,
                                   kpos_s + fill * TILE);
    }
    cp_async_commit();

    const T* ks = k_stage(stage);
    const T* vs = ks + TILE * LD;
    const int* kp = kpos_s + stage * TILE;
    for (int ch = kg; ch < TILE / 16; ch += n_kg) {
      if (it * TILE + ch * 16 >= w.nk) break;  // warp-uniform: the rest of the tile is padding
      float sc[2][4];
      qk_chunk<T, DMAX, EXACT>(sc, qf, q_warp, ks, ch, D, lane);
      float alpha[2];
      softmax_step(sc, kp + ch * 16, qpos, qlo, a.scale2, st, alpha, lane);
      scale_rows<DMAX>(acc, alpha);
      pv_chunk<T, DMAX, EXACT>(acc, sc, vs, ch, D, p_s + warp * 16 * C::kPLd, lane);
    }
    stage = stage + 1 == stages ? 0 : stage + 1;
    fill = fill + 1 == stages ? 0 : fill + 1;
  }

  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the pipeline's shared memory
  epilogue<T, DMAX, EXACT>(a, w, row0, rows, acc, st, smem);
}

// Merges the splits of each output row (one warp per row) by their log2-sum-exp, with the sink.
// No __launch_bounds__: under one, ptxas holds the sm_90 build to 32 registers and spills.
template <typename T>
__global__ void merge_splits_kernel(const Launch a) {
  const PagedAttentionParams& p = a.p;
  __shared__ float w_s[kWarps][kMaxSplits];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t nrows = p.batch * p.q_len * p.num_heads;
  const int64_t row = int64_t(blockIdx.x) * kWarps + warp;
  if (row >= nrows) return;  // warp-uniform
  const int D = static_cast<int>(p.head_dim), n = a.nsplit;
  // Lane i holds splits i and i + 32; the butterfly leaves every lane with the whole row's state.
  const float l0 = lane < n ? a.ws_lse[int64_t(lane) * nrows + row] : -INFINITY;
  const float l1 = lane + 32 < n ? a.ws_lse[int64_t(lane + 32) * nrows + row] : -INFINITY;
  State st = State::from_lse(l0);
  st.merge(State::from_lse(l1));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    st.merge({__shfl_xor_sync(0xffffffffu, st.m, o), __shfl_xor_sync(0xffffffffu, st.l, o)});
  }
  w_s[warp][lane] = State::rescale(l0, st.m);  // 0 for empty splits
  w_s[warp][lane + 32] = State::rescale(l1, st.m);
  __syncwarp();
  const int64_t h = row % p.num_heads;
  const float scale = finish_row(st, p.sinks, h);
  T* out = static_cast<T*>(p.out) + row * D;
  for (int d = lane * 4; d < D; d += 128) {
    float o[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int i = 0; i < n; ++i) {
      const float wi = w_s[warp][i];
      if (wi == 0.0f) continue;
      const float4 v =
          *reinterpret_cast<const float4*>(a.ws_o + (int64_t(i) * nrows + row) * D + d);
      o[0] += wi * v.x;
      o[1] += wi * v.y;
      o[2] += wi * v.z;
      o[3] += wi * v.w;
    }
    store4(out + d, o[0] * scale, o[1] * scale, o[2] * scale, o[3] * scale);
  }
  if (p.lse && lane == 0) p.lse[row] = st.natural_lse();
}

// Raises the kernel instance's dynamic shared-memory limit once per device, to the most that any
// of its plans uses there: no per-call cudaFuncSetAttribute that a thread launching a smaller
// plan could lower between another thread's set and launch.
template <typename T, int DMAX, bool EXACT>
void allow_shared_memory(int device, int64_t max_smem_optin) {
  static std::once_flag once[kMaxDevices];
  std::call_once(once[device], [&] {
    constexpr TileLayout t = Cfg<T, DMAX>::kLayout;
    int64_t most = 0;
    for (int slices = 1; slices <= 4; slices *= 2) {
      for (int stages = kMinStages; stages <= kMaxStages; ++stages) {
        const int64_t smem = t.smem_bytes(stages, slices);
        if (smem <= max_smem_optin) most = std::max(most, smem);
      }
    }
    check(cudaFuncSetAttribute(&paged_attention_kernel<T, DMAX, EXACT>,
                               cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(most)),
          "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  });
}

int64_t plan_limit(const DeviceInfo& info) {
  const int64_t forced = g_smem_limit.load(std::memory_order_relaxed);
  return forced > 0 ? std::min<int64_t>(forced, info.max_smem_optin) : info.max_smem_optin;
}

int elem_bytes(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// Everything about a launch that the host decides: the plan, the query tiles and the splits.
struct Shape {
  AttentionPlan plan;
  int64_t G, GS, qtiles, nsplit;
};

Shape shape_of(const PagedAttentionParams& p, const DeviceInfo& info) {
  Shape s{};
  s.G = p.num_heads / p.num_kv_heads;
  s.GS = s.G * p.q_len;
  s.plan = plan_paged_attention(elem_bytes(p.dtype), p.head_dim, s.GS, plan_limit(info));
  if (s.plan.blocks_per_sm == 0) {
    throw std::runtime_error(
        "stopkit CUDA: paged_attention needs " +
        std::to_string(TileLayout{elem_bytes(p.dtype), s.plan.dmax}.smem_bytes(kMinStages, 1)) +
        " bytes of shared memory per block; the device allows " + std::to_string(plan_limit(info)));
  }
  s.qtiles = (s.GS + 16 * s.plan.query_slices - 1) / (16 * s.plan.query_slices);
  const int forced = g_num_splits.load(std::memory_order_relaxed);
  if (forced > 0) {
    s.nsplit = std::min(forced, kMaxSplits);
  } else {
    // Keys of the longest row: the caller's bound, else what the block table holds; a window
    // caps them.
    int64_t max_keys = p.max_blocks_per_row * p.block_size;
    if (p.max_seq_len >= 0) max_keys = std::min(max_keys, p.max_seq_len);
    if (p.window > 0) max_keys = std::min<int64_t>(max_keys, p.window);
    s.nsplit = num_splits(p.batch * p.num_kv_heads * s.qtiles, max_keys, info.num_sms,
                          s.plan.blocks_per_sm);
  }
  return s;
}

int64_t workspace_bytes(const PagedAttentionParams& p, const Shape& s) {
  if (s.nsplit == 1) return 0;
  return s.nsplit * p.batch * p.q_len * p.num_heads * (p.head_dim + 1) * int64_t(sizeof(float));
}

template <typename T, int DMAX, bool EXACT>
void run(const PagedAttentionParams& p, const Shape& s, const CallContext& ctx, int device,
         const DeviceInfo& info) {
  allow_shared_memory<T, DMAX, EXACT>(device, info.max_smem_optin);
  const int64_t grid = p.batch * p.num_kv_heads * s.qtiles * s.nsplit;
  STOPKIT_CHECK(grid <= INT_MAX, "paged_attention: batch * num_kv_heads * query tiles * splits = " +
                                     std::to_string(grid) + " blocks exceeds the grid limit");
  Launch a{p,
           static_cast<int>(s.G),
           static_cast<int>(s.GS),
           s.plan.query_slices,
           s.plan.stages,
           static_cast<int>(s.qtiles),
           static_cast<int>(s.nsplit),
           __builtin_ctzll(static_cast<unsigned long long>(p.block_size)),
           p.scale * Log2::kFromNatural,
           nullptr,
           nullptr};
  const cudaStream_t stream = to_stream(ctx.stream);
  const size_t smem = static_cast<size_t>(s.plan.smem_bytes);
  if (s.nsplit > 1) {
    const int64_t nrows = p.batch * p.q_len * p.num_heads;
    a.ws_o = reinterpret_cast<float*>(ctx.workspace);
    a.ws_lse = a.ws_o + s.nsplit * nrows * p.head_dim;
    paged_attention_kernel<T, DMAX, EXACT>
        <<<static_cast<unsigned>(grid), kThreads, smem, stream>>>(a);
    check_launch("paged_attention_kernel");
    const int64_t merge_blocks = (nrows + kWarps - 1) / kWarps;
    STOPKIT_CHECK(merge_blocks <= INT_MAX, "paged_attention: too many output rows");
    merge_splits_kernel<T><<<static_cast<unsigned>(merge_blocks), kThreads, 0, stream>>>(a);
    check_launch("merge_splits_kernel");
  } else {
    paged_attention_kernel<T, DMAX, EXACT>
        <<<static_cast<unsigned>(grid), kThreads, smem, stream>>>(a);
    check_launch("paged_attention_kernel");
  }
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

void check_params(const PagedAttentionParams& p) {
  STOPKIT_CHECK(p.batch >= 0, "paged_attention: batch must be >= 0");
  STOPKIT_CHECK(p.q_len >= 1, "paged_attention: q_len must be >= 1");
  STOPKIT_CHECK(p.num_kv_heads > 0 && p.num_heads % p.num_kv_heads == 0,
                "paged_attention: num_heads must be a multiple of num_kv_heads");
  STOPKIT_CHECK(p.head_dim % 16 == 0 && p.head_dim >= 32 && p.head_dim <= 256,
                "paged_attention: head_dim must be a multiple of 16 in 32..256");
  STOPKIT_CHECK(
      p.block_size >= 1 && p.block_size <= 256 && (p.block_size & (p.block_size - 1)) == 0,
      "paged_attention: block_size must be a power of two <= 256");
  STOPKIT_CHECK(p.num_blocks >= 0 && p.max_blocks_per_row >= 0, "paged_attention: bad cache shape");
  STOPKIT_CHECK(p.max_blocks_per_row * p.block_size + p.q_len < INT_MAX,
                "paged_attention: max_blocks_per_row * block_size + q_len must stay below 2^31");
  STOPKIT_CHECK((p.suffix_k == nullptr) == (p.suffix_v == nullptr),
                "paged_attention: suffix_k and suffix_v must be given together");
}

}  // namespace

void set_num_splits(int n) {
  STOPKIT_CHECK(n >= 0, "num_splits must be >= 0 (0 = automatic)");
  g_num_splits.store(n, std::memory_order_relaxed);
}

int get_num_splits() { return g_num_splits.load(std::memory_order_relaxed); }

void set_smem_limit(int64_t bytes) {
  STOPKIT_CHECK(bytes >= 0, "smem_limit must be >= 0 (0 = the device's)");
  g_smem_limit.store(bytes, std::memory_order_relaxed);
}

int64_t get_smem_limit() { return g_smem_limit.load(std::memory_order_relaxed); }

AttentionPlan paged_attention_plan(DType dtype, int64_t head_dim, int64_t rows, int device) {
  DeviceGuard guard(device);
  return plan_paged_attention(elem_bytes(dtype), head_dim, rows,
                              plan_limit(device_info(guard.device())));
}

int paged_attention_occupancy(DType dtype, int64_t head_dim, int64_t rows, int device) {
  DeviceGuard guard(device);
  const DeviceInfo& info = device_info(guard.device());
  const AttentionPlan plan =
      plan_paged_attention(elem_bytes(dtype), head_dim, rows, plan_limit(info));
  STOPKIT_CHECK(plan.blocks_per_sm > 0, "paged_attention_occupancy: no plan fits this device");
  int blocks = 0;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto query = [&](auto kernel, auto allow) {
      allow(guard.device(), info.max_smem_optin);
      check(
          cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, plan.smem_bytes),
          "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    };
    const bool exact = head_dim == plan.dmax;
    switch (plan.dmax) {
      case 64:
        exact ? query(&paged_attention_kernel<T, 64, true>, allow_shared_memory<T, 64, true>)
              : query(&paged_attention_kernel<T, 64, false>, allow_shared_memory<T, 64, false>);
        break;
      case 128:
        exact ? query(&paged_attention_kernel<T, 128, true>, allow_shared_memory<T, 128, true>)
              : query(&paged_attention_kernel<T, 128, false>, allow_shared_memory<T, 128, false>);
        break;
      default:
        exact ? query(&paged_attention_kernel<T, 256, true>, allow_shared_memory<T, 256, true>)
              : query(&paged_attention_kernel<T, 256, false>, allow_shared_memory<T, 256, false>);
    }
  });
  return blocks;
}

int64_t paged_attention_workspace_bytes(const PagedAttentionParams& p, int device) {
  check_params(p);
  if (p.batch == 0) return 0;
  DeviceGuard guard(device);
  return workspace_bytes(p, shape_of(p, device_info(guard.device())));
}

void paged_attention(const PagedAttentionParams& p, const CallContext& ctx) {
  check_params(p);
  STOPKIT_CHECK(aligned16(p.q) && aligned16(p.out) && aligned16(p.k_cache) &&
                    aligned16(p.v_cache) && aligned16(p.suffix_k) && aligned16(p.suffix_v),
                "paged_attention: q, out, caches and suffix must be 16-byte aligned");
  if (p.batch == 0) return;
  DeviceGuard guard(ctx.device);
  const DeviceInfo& info = device_info(guard.device());
  const Shape s = shape_of(p, info);
  const int64_t need = workspace_bytes(p, s);
  STOPKIT_CHECK(need == 0 || (ctx.workspace != 0 && ctx.workspace_bytes >= need &&
                              aligned16(reinterpret_cast<void*>(ctx.workspace))),
                "paged_attention: the split-KV workspace must be 16-byte aligned and hold " +
                    std::to_string(need) + " bytes (paged_attention_workspace_bytes), got " +
                    std::to_string(ctx.workspace_bytes));
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int dev = guard.device();
    switch (p.head_dim) {
      case 64: run<T, 64, true>(p, s, ctx, dev, info); break;
      case 128: run<T, 128, true>(p, s, ctx, dev, info); break;
      case 256: run<T, 256, true>(p, s, ctx, dev, info); break;
      default:
        if (p.head_dim < 64) run<T, 64, false>(p, s, ctx, dev, info);
        else if (p.head_dim < 128) run<T, 128, false>(p, s, ctx, dev, info);
        else run<T, 256, false>(p, s, ctx, dev, info);
    }
  });
}

}  // namespace stopkit::cuda
