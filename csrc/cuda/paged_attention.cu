// paged_attention on CUDA (sm_80+): split-KV flash decoding over a paged cache.
//
// One block of 4 warps per (row, kv head, context split, query tile). The block streams its keys
// and values through shared memory once, 16-byte cp.async copies kStages tiles deep, and every
// query row of the tile (G query heads x q_len queries, up to 64) reads them there. Warps split a
// tile two ways: by 16-row query slices (mt) and by 16-key chunks (kg); each warp keeps its own
// online softmax (float32) and the block merges its warps at the end. Half types run QK^T and PV
// on the tensor cores (mma.sync m16n8k16, float32 accumulators, P rounded to the input type as
// in FlashAttention); float32 runs the same data layout with scalar FMAs, for exact results.
//
// Keys of a block form one list: its share of the cached positions [lo, seq_len) (lo > 0 only
// under a window), then, in the last split, the q_len suffix keys at positions seq_len + j. Each
// key's absolute position sits in shared memory beside the tile (-1 for a masked key: past the
// list, or on a block id outside [0, num_blocks)), so one test does causal, window and padding:
// query row at position qp sees key position kp iff max(0, qp - window + 1) <= kp <= qp.
//
// With more than one split, each block writes (out / l, log2-sum-exp) per row to a float32
// workspace and a second kernel merges the splits by their LSE; sinks join there. The workspace
// comes from a private stream-ordered pool (cudaMallocFromPoolAsync / cudaFreeAsync on the call's
// stream, release threshold unlimited): no allocation after warm-up, safe across streams, and
// capturable in CUDA graphs.
#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <map>
#include <mutex>
#include <tuple>

#include "stopkit/cuda/common.cuh"
#include "stopkit/cuda/kernels.cuh"

namespace stopkit::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kStages = 3;
constexpr int kMinSplitKeys = 256;  // fewer keys per split than this are not worth a merge
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

std::atomic<int> g_num_splits{0};

// Compile-time shape of one kernel instance: element type T, head_dim bucket DMAX.
template <typename T, int DMAX>
struct Cfg {
  static constexpr int kElems16 = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte chunk
  static constexpr int LD = DMAX + kElems16;  // shared row stride (+16 bytes: no bank conflicts)
  static constexpr int TILE = 16384 / (DMAX * static_cast<int>(sizeof(T)));  // keys per stage: 32 KiB of K+V
  static constexpr int kChunksPerThread = TILE * DMAX * static_cast<int>(sizeof(T)) / 16 / kThreads;
  static constexpr bool kMma = sizeof(T) == 2;
  static constexpr bool kQInRegs = kMma && DMAX <= 128;
  static constexpr int kPLd = 17;            // float32 path: P staging row stride (conflict-free)
  static constexpr int kRedLd = DMAX + 4;    // epilogue: float row stride
  static constexpr size_t kv_bytes = size_t(kStages) * 2 * TILE * LD * sizeof(T);
  static constexpr size_t kpos_bytes = size_t(kStages) * TILE * sizeof(int);
  static constexpr size_t p_bytes = kMma ? 0 : size_t(kWarps) * 16 * kPLd * sizeof(float);
  static constexpr size_t red_bytes = size_t(kWarps) * 16 * (kRedLd + 2) * sizeof(float);
  static size_t smem_bytes(int mt) {
    return kv_bytes + kpos_bytes + ((p_bytes + 15) / 16) * 16 + size_t(16 * mt) * LD * sizeof(T);
  }
  static_assert(TILE % 16 == 0 && TILE >= 16, "a tile holds whole 16-key chunks");
  static_assert(kChunksPerThread * kThreads * 16 == TILE * DMAX * static_cast<int>(sizeof(T)), "");
  static_assert(red_bytes <= kv_bytes, "the epilogue reuses the pipeline's shared memory");
};

struct Launch {
  PagedAttentionParams p;
  int G, GS;          // query heads per kv head; query rows per (row, kv head) = G * q_len
  int mt;             // 16-row query slices per block (1, 2 or 4); key groups = kWarps / mt
  int qtiles, nsplit;
  int log2_bs;
  float scale2;       // softmax scale * log2(e): scores live in the log2 domain
  float* ws_o;        // [nsplit][B*S*H][D] or null when nsplit == 1
  float* ws_lse;      // [nsplit][B*S*H], log2 domain
};

// Final normalisation of one output row: o = out / l of the keys, lse2 their log2-sum-exp
// (-inf: none seen). Folds in the sink, writes 4 outputs (and the natural-log LSE at d == 0).
template <typename T>
__device__ __forceinline__ void finish4(float (&o)[4], float lse2, const float* sinks, int64_t h,
                                        T* out, float* lse, int d) {
  float m = lse2;
  float sink2 = -INFINITY;
  if (sinks) {
    sink2 = sinks[h] * kLog2e;
    m = fmaxf(m, sink2);
  }
  float lse_nat = -INFINITY;
  if (m == -INFINITY) {
    o[0] = o[1] = o[2] = o[3] = 0.0f;
  } else {
    const float w = exp2f(lse2 - m);
    const float denom = w + (sinks ? exp2f(sink2 - m) : 0.0f);
    const float c = w / denom;
#pragma unroll
    for (int i = 0; i < 4; ++i) o[i] *= c;
    lse_nat = (m + log2f(denom)) * kLn2;
  }
  store4(out + d, o[0], o[1], o[2], o[3]);
  if (lse && d == 0) *lse = lse_nat;
}

template <typename T, int DMAX, bool EXACT>
__global__ void __launch_bounds__(kThreads, 2) paged_attention_kernel(const Launch a) {
  using C = Cfg<T, DMAX>;
  constexpr int TILE = C::TILE, LD = C::LD, E16 = C::kElems16;
  constexpr int KSTEPS = DMAX / 16;
  const PagedAttentionParams& p = a.p;
  const int D = EXACT ? DMAX : static_cast<int>(p.head_dim);
  const int cpr = D / E16;  // 16-byte chunks per key row

  extern __shared__ __align__(16) unsigned char smem[];
  T* kv_s = reinterpret_cast<T*>(smem);                                  // [kStages][K|V][TILE][LD]
  int* kpos_s = reinterpret_cast<int*>(smem + C::kv_bytes);               // [kStages][TILE]
  float* p_s = reinterpret_cast<float*>(smem + C::kv_bytes + C::kpos_bytes);  // float32 path
  T* q_s = reinterpret_cast<T*>(smem + C::kv_bytes + C::kpos_bytes + ((C::p_bytes + 15) / 16) * 16);

  // Work item; the query tile varies fastest so blocks that share keys run together.
  int64_t item = blockIdx.x;
  const int qt = static_cast<int>(item % a.qtiles);
  item /= a.qtiles;
  const int sp = static_cast<int>(item % a.nsplit);
  item /= a.nsplit;
  const int kvh = static_cast<int>(item % p.num_kv_heads);
  const int64_t b = item / p.num_kv_heads;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int S = static_cast<int>(p.q_len);
  const bool has_suffix = p.suffix_k != nullptr;
  const int64_t max_len = p.max_blocks_per_row << a.log2_bs;
  const int L = static_cast<int>(min64(max64(p.seq_lens[b], 0), max_len));

  // Cached keys [lo, L): lo > 0 only when a window hides the oldest positions from every query.
  int lo = 0;
  if (p.window > 0) lo = static_cast<int>(max64(0, (has_suffix ? L : L - 1) - p.window + 1));
  lo = min(lo, L);
  const int n_cached = L - lo;
  int per = (n_cached + a.nsplit - 1) / a.nsplit;
  per = (per + 15) & ~15;
  const int c_begin = lo + static_cast<int>(min64(n_cached, int64_t(sp) * per));
  const int c_end = lo + static_cast<int>(min64(n_cached, int64_t(sp + 1) * per));
  const int nc = c_end - c_begin;                                          // cached keys here
  const int nk = nc + ((has_suffix && sp == a.nsplit - 1) ? S : 0);        // + suffix keys
  const int ntiles = (nk + TILE - 1) / TILE;

  const T* kc = static_cast<const T*>(p.k_cache);
  const T* vc = static_cast<const T*>(p.v_cache);
  const T* sk = static_cast<const T*>(p.suffix_k);
  const T* sv = static_cast<const T*>(p.suffix_v);
  const int32_t* bt = p.block_table + b * p.max_blocks_per_row;
  const int64_t tok_stride = p.num_kv_heads * D;  // elements between consecutive tokens

  // Issues the cp.async copies of key tile `tile` into `stage` (zero-fill for masked keys). The
  // block-table reads of all chunks go out first and the rest is branch-free, so one thread waits
  // for one table read per tile, not one per chunk.
  auto load_tile = [&](int tile, int stage) {
    T* ks = kv_s + size_t(stage) * 2 * TILE * LD;
    T* vs = ks + TILE * LD;
    int page[C::kChunksPerThread];
#pragma unroll
    for (int i = 0; i < C::kChunksPerThread; ++i) {
      const int c = tid + i * kThreads;
      const int key = tile * TILE + c / cpr;
      const bool cached = (EXACT || c < TILE * cpr) && key < nc;
      page[i] = cached ? __ldg(bt + ((c_begin + key) >> a.log2_bs)) : -1;
    }
#pragma unroll
    for (int i = 0; i < C::kChunksPerThread; ++i) {
      const int c = tid + i * kThreads;
      if (!EXACT && c >= TILE * cpr) break;  // generic head_dim: fewer chunks per tile
      const int r = c / cpr, cc = c - r * cpr;
      const int key = tile * TILE + r;
      const int t = c_begin + key, j = key - nc;  // cached position / suffix index
      const bool cached = key < nc;
      const bool ok = cached ? (page[i] >= 0 && page[i] < p.num_blocks) : key < nk;
      if (cached) debug_trap_if(!ok);
      const int64_t off = cached ? (int64_t(page[i]) * p.block_size + (t & (p.block_size - 1))) * tok_stride
                                 : ((b * S + j) * p.num_kv_heads) * D;
      const int64_t col = int64_t(kvh) * D + cc * E16;
      const T* ksrc = ok ? (cached ? kc : sk) + off + col : kc;  // a valid address even when unused
      const T* vsrc = ok ? (cached ? vc : sv) + off + col : vc;
      cp_async_16(ks + r * LD + cc * E16, ksrc, ok);
      cp_async_16(vs + r * LD + cc * E16, vsrc, ok);
      if (cc == 0) kpos_s[stage * TILE + r] = ok ? (cached ? t : L + j) : -1;
    }
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ntiles) load_tile(s, s);
    cp_async_commit();
  }

  // Query rows of this block: R = row0 + r, R = s * G + g (query s, head kvh * G + g).
  const int rows = 16 * a.mt, row0 = qt * rows;
  {
    const T* qg = static_cast<const T*>(p.q);
    for (int c = tid; c < rows * cpr; c += kThreads) {
      const int r = c / cpr, cc = c - r * cpr;
      const int R = row0 + r;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (R < a.GS) {
        const int s = R / a.G, g = R - s * a.G;
        v = *reinterpret_cast<const uint4*>(qg + ((b * S + s) * p.num_heads + int64_t(kvh) * a.G + g) * D + cc * E16);
      }
      *reinterpret_cast<uint4*>(q_s + r * LD + cc * E16) = v;
    }
  }
  __syncthreads();

  const int mt = warp % a.mt, kg = warp / a.mt, n_kg = kWarps / a.mt;
  const int g = lane >> 2, t4 = lane & 3;
  // This thread's two rows (mma layout): r = mt * 16 + g + 8 * i.
  int qpos[2], qlo[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int R = row0 + mt * 16 + g + 8 * i;
    qpos[i] = R < a.GS ? (has_suffix ? L + R / a.G : L - 1) : -1;  // -1: padding row, sees nothing
    qlo[i] = p.window > 0 ? static_cast<int>(max64(0, int64_t(qpos[i]) - p.window + 1)) : 0;
  }

  float acc[DMAX / 8][4];
#pragma unroll
  for (int n = 0; n < DMAX / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
  float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.0f, 0.0f};

  [[maybe_unused]] uint32_t qf[C::kQInRegs ? KSTEPS : 1][4];
  const T* q_warp = q_s + mt * 16 * LD;
  if constexpr (C::kQInRegs) {
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
      if (EXACT || kk < D / 16)
        ldmatrix_x4(qf[kk], q_warp + ((lane & 7) + ((lane >> 3) & 1) * 8) * LD + kk * 16 + (lane >> 4) * 8);
    }
  }

  for (int it = 0; it < ntiles; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile `it` is in shared memory; stage (it - 1) % kStages is free again
    if (it + kStages - 1 < ntiles) load_tile(it + kStages - 1, (it + kStages - 1) % kStages);
    cp_async_commit();

    const int stage = it % kStages;
    const T* ks = kv_s + size_t(stage) * 2 * TILE * LD;
    const T* vs = ks + TILE * LD;
    const int* kp = kpos_s + stage * TILE;

    for (int ch = kg; ch < TILE / 16; ch += n_kg) {
      if (it * TILE + ch * 16 >= nk) break;  // warp-uniform: the rest of the tile is padding

      // Scores of 16 keys: sc[j][e] row g, key ch*16 + j*8 + 2*t4 + e; sc[j][2 + e] row g + 8.
      float sc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
      if constexpr (C::kMma) {
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
          if (EXACT || kk < D / 16) {
            uint32_t qa[4];
            if constexpr (C::kQInRegs) {
              qa[0] = qf[kk][0]; qa[1] = qf[kk][1]; qa[2] = qf[kk][2]; qa[3] = qf[kk][3];
            } else {
              ldmatrix_x4(qa, q_warp + ((lane & 7) + ((lane >> 3) & 1) * 8) * LD + kk * 16 + (lane >> 4) * 8);
            }
            uint32_t kb[4];
            ldmatrix_x4(kb, ks + (ch * 16 + (lane & 7) + (lane >> 4) * 8) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
            mma_16816<T>(sc[0], qa, kb[0], kb[1]);
            mma_16816<T>(sc[1], qa, kb[2], kb[3]);
          }
        }
      } else {
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

      // Mask, then the online softmax update (log2 domain).
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int kpos = kp[ch * 16 + j * 8 + 2 * t4 + e];
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            float& s = sc[j][2 * i + e];
            s = (kpos >= qlo[i] && kpos <= qpos[i]) ? s * a.scale2 : -INFINITY;
            mx[i] = fmaxf(mx[i], s);
          }
        }
      }
      float alpha[2], m_use[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
        const float m_new = fmaxf(m_r[i], mx[i]);
        m_use[i] = m_new == -INFINITY ? 0.0f : m_new;  // nothing seen yet: keep exp2 finite
        alpha[i] = exp2f(m_r[i] - m_use[i]);
        m_r[i] = m_new;
      }
      float psum[2] = {0.0f, 0.0f};
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          sc[j][e] = exp2f(sc[j][e] - m_use[e >> 1]);
          psum[e >> 1] += sc[j][e];
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) l_r[i] = l_r[i] * alpha[i] + psum[i];
#pragma unroll
      for (int n = 0; n < DMAX / 8; ++n) {
        acc[n][0] *= alpha[0];
        acc[n][1] *= alpha[0];
        acc[n][2] *= alpha[1];
        acc[n][3] *= alpha[1];
      }

      // acc += P V over the 16 keys.
      if constexpr (C::kMma) {
        const uint32_t pa[4] = {pack2<T>(sc[0][0], sc[0][1]), pack2<T>(sc[0][2], sc[0][3]),
                                pack2<T>(sc[1][0], sc[1][1]), pack2<T>(sc[1][2], sc[1][3])};
#pragma unroll
        for (int np = 0; np < DMAX / 16; ++np) {
          if (EXACT || np < D / 16) {
            uint32_t vb[4];
            ldmatrix_x4_trans(vb, vs + (ch * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + np * 16 + (lane >> 4) * 8);
            mma_16816<T>(acc[2 * np], pa, vb[0], vb[1]);
            mma_16816<T>(acc[2 * np + 1], pa, vb[2], vb[3]);
          }
        }
      } else {
        float* ps = p_s + warp * 16 * C::kPLd;
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
  }

  // Epilogue: merge the key groups of each query slice through shared memory.
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l_r[i] += __shfl_xor_sync(0xffffffffu, l_r[i], 1);
    l_r[i] += __shfl_xor_sync(0xffffffffu, l_r[i], 2);
  }
  float* red = reinterpret_cast<float*>(smem);       // [kWarps][16][kRedLd]
  float* red_ml = red + kWarps * 16 * C::kRedLd;      // [kWarps][16][2]: m, l
  {
    float* ro = red + warp * 16 * C::kRedLd;
#pragma unroll
    for (int n = 0; n < DMAX / 8; ++n) {
      if (EXACT || n < D / 8) {
        *reinterpret_cast<float2*>(ro + g * C::kRedLd + n * 8 + 2 * t4) = make_float2(acc[n][0], acc[n][1]);
        *reinterpret_cast<float2*>(ro + (g + 8) * C::kRedLd + n * 8 + 2 * t4) = make_float2(acc[n][2], acc[n][3]);
      }
    }
    if (t4 == 0) {
      red_ml[(warp * 16 + g) * 2] = m_r[0];
      red_ml[(warp * 16 + g) * 2 + 1] = l_r[0];
      red_ml[(warp * 16 + g + 8) * 2] = m_r[1];
      red_ml[(warp * 16 + g + 8) * 2 + 1] = l_r[1];
    }
  }
  __syncthreads();

  const int64_t nrows = p.batch * S * p.num_heads;
  const int d4n = D / 4;
  for (int e = tid; e < rows * d4n; e += kThreads) {
    const int r = e / d4n, d = (e - r * d4n) * 4;
    const int R = row0 + r;
    if (R >= a.GS) break;  // rows only grow with e
    const int slice = r >> 4, rr = r & 15;
    float m = -INFINITY;
    for (int k = 0; k < n_kg; ++k) m = fmaxf(m, red_ml[((k * a.mt + slice) * 16 + rr) * 2]);
    float l = 0.0f, o[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (m != -INFINITY) {
      for (int k = 0; k < n_kg; ++k) {
        const int w = k * a.mt + slice;
        const float mw = red_ml[(w * 16 + rr) * 2];
        if (mw == -INFINITY) continue;
        const float c = exp2f(mw - m);
        l += c * red_ml[(w * 16 + rr) * 2 + 1];
        const float4 v = *reinterpret_cast<const float4*>(red + (w * 16 + rr) * C::kRedLd + d);
        o[0] += c * v.x;
        o[1] += c * v.y;
        o[2] += c * v.z;
        o[3] += c * v.w;
      }
    }
    const float lse2 = l > 0.0f ? m + log2f(l) : -INFINITY;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) o[i] *= inv;
    const int s = R / a.G, gq = R - s * a.G;
    const int64_t h = int64_t(kvh) * a.G + gq;
    const int64_t orow = (b * S + s) * p.num_heads + h;
    if (a.ws_o == nullptr) {
      finish4(o, lse2, p.sinks, h, static_cast<T*>(p.out) + orow * D, p.lse ? p.lse + orow : nullptr, d);
    } else {
      const int64_t wrow = int64_t(sp) * nrows + orow;
      *reinterpret_cast<float4*>(a.ws_o + wrow * D + d) = make_float4(o[0], o[1], o[2], o[3]);
      if (d == 0) a.ws_lse[wrow] = lse2;
    }
  }
}

// Merges the splits of each output row (one warp per row) by their log2-sum-exp, with the sink.
template <typename T>
__global__ void __launch_bounds__(kThreads) merge_splits_kernel(const Launch a) {
  const PagedAttentionParams& p = a.p;
  __shared__ float w_s[kWarps][kMaxSplits];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t nrows = p.batch * p.q_len * p.num_heads;
  const int64_t row = int64_t(blockIdx.x) * kWarps + warp;
  if (row >= nrows) return;  // warp-uniform
  const int D = static_cast<int>(p.head_dim), n = a.nsplit;
  const float l0 = lane < n ? a.ws_lse[int64_t(lane) * nrows + row] : -INFINITY;
  const float l1 = lane + 32 < n ? a.ws_lse[int64_t(lane + 32) * nrows + row] : -INFINITY;
  const float m = warp_max(fmaxf(l0, l1));
  float lse2 = -INFINITY, inv = 0.0f;
  if (m != -INFINITY) {
    const float w0 = exp2f(l0 - m), w1 = exp2f(l1 - m);  // 0 for empty splits
    w_s[warp][lane] = w0;
    w_s[warp][lane + 32] = w1;
    const float total = warp_sum(w0 + w1);  // >= 1: the largest split has weight 1
    lse2 = m + log2f(total);
    inv = 1.0f / total;
  }
  __syncwarp();
  const int64_t h = row % p.num_heads;
  T* out = static_cast<T*>(p.out) + row * D;
  float* lse = p.lse ? p.lse + row : nullptr;
  for (int d = lane * 4; d < D; d += 128) {
    float o[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (m != -INFINITY) {
      for (int i = 0; i < n; ++i) {
        const float w = w_s[warp][i] * inv;
        if (w == 0.0f) continue;
        const float4 v = *reinterpret_cast<const float4*>(a.ws_o + (int64_t(i) * nrows + row) * D + d);
        o[0] += w * v.x;
        o[1] += w * v.y;
        o[2] += w * v.z;
        o[3] += w * v.w;
      }
    }
    finish4(o, lse2, p.sinks, h, out, lse, d);
  }
}

// Blocks of one kernel instance that fit on a multiprocessor, per device (cached).
int blocks_per_sm(int device, const void* kernel, size_t smem) {
  static std::mutex mu;
  static std::map<std::tuple<int, const void*, size_t>, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(device, kernel, smem);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int n = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, smem),
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  n = std::max(n, 1);
  cache.emplace(key, n);
  return n;
}

// The fewest splits whose block count fills the GPU's block slots nearly as evenly as any
// (FlashAttention's rule: efficiency within 85% of the best), at least kMinSplitKeys keys each.
int choose_splits(int64_t base, int64_t max_keys, int64_t slots) {
  const int forced = g_num_splits.load(std::memory_order_relaxed);
  if (forced > 0) return std::min(forced, kMaxSplits);
  const int n_max = static_cast<int>(std::clamp<int64_t>(max_keys / kMinSplitKeys, 1, kMaxSplits));
  if (base >= slots || n_max == 1) return 1;
  auto efficiency = [&](int n) {
    const int64_t blocks = base * n;
    const int64_t waves = (blocks + slots - 1) / slots;
    return double(blocks) / double(waves * slots);
  };
  double best = 0.0;
  for (int n = 1; n <= n_max; ++n) best = std::max(best, efficiency(n));
  for (int n = 1; n <= n_max; ++n) {
    if (efficiency(n) >= 0.85 * best) return n;
  }
  return 1;
}

cudaMemPool_t workspace_pool(int device) {
  static std::mutex mu;
  static std::map<int, cudaMemPool_t> pools;
  std::lock_guard<std::mutex> lock(mu);
  auto it = pools.find(device);
  if (it != pools.end()) return it->second;
  cudaMemPoolProps props{};
  props.allocType = cudaMemAllocationTypePinned;
  props.location.type = cudaMemLocationTypeDevice;
  props.location.id = device;
  cudaMemPool_t pool;
  check(cudaMemPoolCreate(&pool, &props), "cudaMemPoolCreate");
  uint64_t keep = UINT64_MAX;  // keep freed workspace for the next call instead of unmapping it
  check(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep), "cudaMemPoolSetAttribute");
  pools.emplace(device, pool);
  return pool;
}

// Stream-ordered workspace, freed on the stream when the call returns or throws.
class Workspace {
 public:
  Workspace(size_t bytes, int device, cudaStream_t stream) : stream_(stream) {
    check(cudaMallocFromPoolAsync(&ptr_, bytes, workspace_pool(device), stream), "cudaMallocFromPoolAsync");
  }
  ~Workspace() { cudaFreeAsync(ptr_, stream_); }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  float* data() const { return static_cast<float*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

template <typename T, int DMAX, bool EXACT>
void run(const PagedAttentionParams& p, cudaStream_t stream, int device) {
  using C = Cfg<T, DMAX>;
  const DeviceInfo& info = device_info(device);
  const int64_t G = p.num_heads / p.num_kv_heads, GS = G * p.q_len;
  int mt = GS <= 16 ? 1 : GS <= 32 ? 2 : 4;
  while (mt > 1 && C::smem_bytes(mt) > size_t(info.max_smem_optin)) mt /= 2;
  const size_t smem = C::smem_bytes(mt);
  if (smem > size_t(info.max_smem_optin)) {
    throw std::runtime_error("stopkit CUDA: paged_attention needs " + std::to_string(smem) +
                             " bytes of shared memory per block; the device allows " +
                             std::to_string(info.max_smem_optin));
  }
  const int64_t qtiles = (GS + 16 * mt - 1) / (16 * mt);
  const int64_t base = p.batch * p.num_kv_heads * qtiles;

  auto* kernel = &paged_attention_kernel<T, DMAX, EXACT>;
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
        "cudaFuncSetAttribute");
  int64_t max_keys = p.max_blocks_per_row * p.block_size;
  if (p.window > 0) max_keys = std::min<int64_t>(max_keys, p.window);
  const int64_t slots = int64_t(info.num_sms) * blocks_per_sm(device, reinterpret_cast<const void*>(kernel), smem);
  const int nsplit = choose_splits(base, max_keys, slots);
  const int64_t grid = base * nsplit;
  STOPKIT_CHECK(grid <= INT_MAX, "paged_attention: batch * num_kv_heads * query tiles * splits = " +
                                     std::to_string(grid) + " blocks exceeds the grid limit");

  Launch a{p, static_cast<int>(G), static_cast<int>(GS), mt, static_cast<int>(qtiles), nsplit,
           __builtin_ctzll(static_cast<unsigned long long>(p.block_size)),
           p.scale * kLog2e, nullptr, nullptr};
  if (nsplit == 1) {
    kernel<<<static_cast<unsigned>(grid), kThreads, smem, stream>>>(a);
    check_launch("paged_attention_kernel");
    return;
  }
  const int64_t nrows = p.batch * p.q_len * p.num_heads;
  Workspace ws(size_t(nsplit) * nrows * (p.head_dim + 1) * sizeof(float), device, stream);
  a.ws_o = ws.data();
  a.ws_lse = ws.data() + size_t(nsplit) * nrows * p.head_dim;
  kernel<<<static_cast<unsigned>(grid), kThreads, smem, stream>>>(a);
  check_launch("paged_attention_kernel");
  const int64_t merge_blocks = (nrows + kWarps - 1) / kWarps;
  STOPKIT_CHECK(merge_blocks <= INT_MAX, "paged_attention: too many output rows");
  merge_splits_kernel<T><<<static_cast<unsigned>(merge_blocks), kThreads, 0, stream>>>(a);
  check_launch("merge_splits_kernel");
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

}  // namespace

void set_num_splits(int n) {
  STOPKIT_CHECK(n >= 0, "num_splits must be >= 0 (0 = automatic)");
  g_num_splits.store(n, std::memory_order_relaxed);
}

int get_num_splits() { return g_num_splits.load(std::memory_order_relaxed); }

void paged_attention(const PagedAttentionParams& p, cudaStream_t stream) {
  STOPKIT_CHECK(p.batch >= 0, "paged_attention: batch must be >= 0");
  STOPKIT_CHECK(p.q_len >= 1, "paged_attention: q_len must be >= 1");
  STOPKIT_CHECK(p.num_kv_heads > 0 && p.num_heads % p.num_kv_heads == 0,
                "paged_attention: num_heads must be a multiple of num_kv_heads");
  STOPKIT_CHECK(p.head_dim % 16 == 0 && p.head_dim >= 32 && p.head_dim <= 256,
                "paged_attention: head_dim must be a multiple of 16 in 32..256");
  STOPKIT_CHECK(p.block_size >= 1 && p.block_size <= 256 && (p.block_size & (p.block_size - 1)) == 0,
                "paged_attention: block_size must be a power of two <= 256");
  STOPKIT_CHECK(p.num_blocks >= 0 && p.max_blocks_per_row >= 0, "paged_attention: bad cache shape");
  STOPKIT_CHECK(p.max_blocks_per_row * p.block_size + p.q_len < INT_MAX,
                "paged_attention: max_blocks_per_row * block_size + q_len must stay below 2^31");
  STOPKIT_CHECK((p.suffix_k == nullptr) == (p.suffix_v == nullptr),
                "paged_attention: suffix_k and suffix_v must be given together");
  STOPKIT_CHECK(aligned16(p.q) && aligned16(p.out) && aligned16(p.k_cache) && aligned16(p.v_cache) &&
                    aligned16(p.suffix_k) && aligned16(p.suffix_v),
                "paged_attention: q, out, caches and suffix must be 16-byte aligned");
  if (p.batch == 0) return;
  DeviceGuard guard(stream);
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    switch (p.head_dim) {
      case 64: run<T, 64, true>(p, stream, guard.device()); break;
      case 128: run<T, 128, true>(p, stream, guard.device()); break;
      case 256: run<T, 256, true>(p, stream, guard.device()); break;
      default:
        if (p.head_dim < 64) run<T, 64, false>(p, stream, guard.device());
        else if (p.head_dim < 128) run<T, 128, false>(p, stream, guard.device());
        else run<T, 256, false>(p, stream, guard.device());
    }
  });
}

}  // namespace stopkit::cuda
