// stop_score on CUDA, one launch: RMSNorm (float32) -> optional hidden layer + activation ->
// Linear(., 2) -> softmax[1].
//
// Without a hidden layer: one warp per row. With one: blocks tile the outputs and the rows
// (kOutTile outputs x kRowTile rows each), so the weight matrix is read by every row tile once
// and the work spreads over the GPU. Each block stages its rows' normalised features in shared
// memory a chunk at a time, writes its outputs' share of the two logits to a workspace, and the
// last block of a row tile to finish (an atomic ticket, reset by a memset before the launch)
// adds the shares in a fixed order: deterministic, and a single kernel.
#include <algorithm>
#include <climits>

#include "stopkit/cuda/common.cuh"
#include "stopkit/cuda/kernels.cuh"

namespace stopkit::cuda {
namespace {

constexpr int kRowsPerBlock = 4;  // head-only kernel: warps (one row each) per block

constexpr int kLayerWarps = 8;  // hidden-layer kernel
constexpr int kLayerThreads = kLayerWarps * 32;
constexpr int kOutPerWarp = 4;                       // hidden outputs per warp
constexpr int kOutTile = kLayerWarps * kOutPerWarp;  // hidden outputs per block
constexpr int kRowTile = 8;                          // rows per block
constexpr int kChunk = 512;                          // features per row staged at a time
static_assert(kRowTile == kLayerWarps, "one warp computes each row's RMS");
static_assert(kOutPerWarp * kRowTile == 32, "a lane per (output, row) of a warp");

__device__ __forceinline__ float activate(float x, Activation a) {
  switch (a) {
    case Activation::kGelu: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    case Activation::kRelu: return x > 0.0f ? x : 0.0f;
    case Activation::kSilu: return x / (1.0f + expf(-x));
    case Activation::kTanh: return tanhf(x);
    case Activation::kNone: break;
  }
  return x;
}

// 1 / RMS of a row of d features, reduced over the warp (every lane gets it).
template <typename TH>
__device__ __forceinline__ float inv_rms(const TH* x, int64_t d, float eps, int lane) {
  float ss = 0.0f;
  for (int64_t i = lane; i < d; i += 32) {
    const float v = to_float(x[i]);
    ss += v * v;
  }
  return 1.0f / sqrtf(warp_sum(ss) / static_cast<float>(d) + eps);
}

// softmax(logits)[1] = sigmoid(l1 - l0)
__device__ __forceinline__ float prob1(float logit0, float logit1) {
  return 1.0f / (1.0f + expf(logit0 - logit1));
}

// No hidden layer: one warp per row.
template <typename TH, typename TW>
__global__ void __launch_bounds__(kRowsPerBlock * 32)
    stop_score_head_kernel(const StopScoreParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (row >= p.batch) return;  // warp-uniform
  const int64_t d = p.dim;
  const TH* x = static_cast<const TH*>(p.hidden) + row * d;
  const TW* norm = static_cast<const TW*>(p.norm_weight);
  const TW* w = static_cast<const TW*>(p.head_weight);
  const TW* wb = static_cast<const TW*>(p.head_bias);
  const float inv = norm ? inv_rms(x, d, p.eps, lane) : 1.0f;
  float a0 = 0.0f, a1 = 0.0f;
  for (int64_t i = lane; i < d; i += 32) {
    const float v = to_float(x[i]);
    const float f = norm ? v * inv * to_float(norm[i]) : v;
    a0 += f * to_float(w[i]);
    a1 += f * to_float(w[d + i]);
  }
  const float logit0 = warp_sum(a0) + (wb ? to_float(wb[0]) : 0.0f);
  const float logit1 = warp_sum(a1) + (wb ? to_float(wb[1]) : 0.0f);
  if (lane == 0) p.out[row] = prob1(logit0, logit1);
}

// Hidden layer: block (row tile blockIdx.x, output tile blockIdx.y). partial: [out tiles][batch][2]
// shares of the logits; tickets: [row tiles], zero at launch.
template <typename TH, typename TW>
__global__ void __launch_bounds__(kLayerThreads)
    stop_score_layer_kernel(const StopScoreParams p, float* partial, unsigned* tickets) {
  __shared__ float x_s[kRowTile][kChunk];
  __shared__ float inv_s[kRowTile];
  __shared__ float part_s[kLayerWarps][kRowTile][2];
  __shared__ bool last_s;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t d = p.dim, h = p.hidden_dim, B = p.batch;
  const int64_t row0 = int64_t(blockIdx.x) * kRowTile;
  const int rows = static_cast<int>(std::min<int64_t>(kRowTile, B - row0));
  const TH* x = static_cast<const TH*>(p.hidden) + row0 * d;
  const TW* norm = static_cast<const TW*>(p.norm_weight);
  const TW* hw = static_cast<const TW*>(p.hidden_weight);
  const TW* hb = static_cast<const TW*>(p.hidden_bias);
  const TW* w = static_cast<const TW*>(p.head_weight);
  const TW* wb = static_cast<const TW*>(p.head_bias);

  {
    const float inv = (norm && warp < rows) ? inv_rms(x + warp * d, d, p.eps, lane) : 1.0f;
    if (lane == 0) inv_s[warp] = inv;
  }

  // This warp's outputs j0 .. j0 + nj - 1 (nj is warp-uniform, 0 past h).
  const int64_t j0 = int64_t(blockIdx.y) * kOutTile + warp * kOutPerWarp;
  const int nj = static_cast<int>(std::clamp<int64_t>(h - j0, 0, kOutPerWarp));
  float acc[kOutPerWarp][kRowTile];
#pragma unroll
  for (int jj = 0; jj < kOutPerWarp; ++jj) {
#pragma unroll
    for (int r = 0; r < kRowTile; ++r) acc[jj][r] = 0.0f;
  }
  for (int64_t c0 = 0; c0 < d; c0 += kChunk) {
    const int n = static_cast<int>(std::min<int64_t>(kChunk, d - c0));
    __syncthreads();  // inv_s is written; every warp is done with the previous chunk
    for (int e = threadIdx.x; e < kRowTile * kChunk; e += kLayerThreads) {
      const int r = e / kChunk, i = e % kChunk;
      float f = 0.0f;
      if (r < rows && i < n) {
        f = to_float(x[r * d + c0 + i]);
        if (norm) f *= inv_s[r] * to_float(norm[c0 + i]);
      }
      x_s[r][i] = f;
    }
    __syncthreads();
    if (nj == 0) continue;
    for (int i = lane; i < n; i += 32) {
      float wv[kOutPerWarp];
#pragma unroll
      for (int jj = 0; jj < kOutPerWarp; ++jj)
        wv[jj] = jj < nj ? to_float(hw[(j0 + jj) * d + c0 + i]) : 0.0f;
#pragma unroll
      for (int r = 0; r < kRowTile; ++r) {
        const float f = x_s[r][i];
#pragma unroll
        for (int jj = 0; jj < kOutPerWarp; ++jj) acc[jj][r] += f * wv[jj];
      }
    }
  }

  // Lane jj * kRowTile + r takes output j0 + jj of row r through the activation and the head
  // (one activation per lane), then the lanes of a row add their outputs' shares.
  float y = 0.0f;
#pragma unroll
  for (int jj = 0; jj < kOutPerWarp; ++jj) {
#pragma unroll
    for (int r = 0; r < kRowTile; ++r) {
      const float t = warp_sum(acc[jj][r]);
      if (lane == jj * kRowTile + r) y = t;
    }
  }
  float share0 = 0.0f, share1 = 0.0f;
  if (const int jj = lane / kRowTile; jj < nj) {
    const int64_t j = j0 + jj;
    y = activate(y + (hb ? to_float(hb[j]) : 0.0f), p.activation);
    share0 = y * to_float(w[j]);
    share1 = y * to_float(w[h + j]);
  }
#pragma unroll
  for (int o = kRowTile; o < 32; o *= 2) {
    share0 += __shfl_xor_sync(0xffffffffu, share0, o);
    share1 += __shfl_xor_sync(0xffffffffu, share1, o);
  }
  if (lane < kRowTile) {
    part_s[warp][lane][0] = share0;
    part_s[warp][lane][1] = share1;
  }
  __syncthreads();
  if (threadIdx.x < kRowTile * 2) {
    const int r = threadIdx.x >> 1, c = threadIdx.x & 1;
    float s = 0.0f;
    for (int k = 0; k < kLayerWarps; ++k) s += part_s[k][r][c];
    if (r < rows) partial[(int64_t(blockIdx.y) * B + row0 + r) * 2 + c] = s;
    __threadfence();  // the share is visible device-wide before the ticket is taken
  }
  __syncthreads();
  if (threadIdx.x == 0) last_s = atomicAdd(tickets + blockIdx.x, 1u) == gridDim.y - 1;
  __syncthreads();
  if (!last_s) return;

  // The row tile's last block: add the output tiles' shares in order.
  __threadfence();
  if (threadIdx.x < rows) {
    const int64_t row = row0 + threadIdx.x;
    float logit0 = wb ? to_float(wb[0]) : 0.0f, logit1 = wb ? to_float(wb[1]) : 0.0f;
    for (unsigned t = 0; t < gridDim.y; ++t) {
      logit0 += __ldcg(partial + (int64_t(t) * B + row) * 2);
      logit1 += __ldcg(partial + (int64_t(t) * B + row) * 2 + 1);
    }
    p.out[row] = prob1(logit0, logit1);
  }
}

struct LayerGrid {
  int64_t row_tiles, out_tiles, ticket_bytes;
};

LayerGrid layer_grid(int64_t batch, int64_t hidden_dim) {
  LayerGrid g;
  g.row_tiles = (batch + kRowTile - 1) / kRowTile;
  g.out_tiles = (hidden_dim + kOutTile - 1) / kOutTile;
  g.ticket_bytes = (g.row_tiles * int64_t(sizeof(unsigned)) + 15) / 16 * 16;
  return g;
}

}  // namespace

int64_t stop_score_workspace_bytes(int64_t batch, int64_t hidden_dim) {
  STOPKIT_CHECK(batch >= 0 && hidden_dim >= 0, "stop_score_workspace_bytes: sizes must be >= 0");
  if (batch == 0 || hidden_dim == 0) return 0;
  const LayerGrid g = layer_grid(batch, hidden_dim);
  return g.ticket_bytes + g.out_tiles * batch * 2 * int64_t(sizeof(float));
}

void stop_score(const StopScoreParams& p, const CallContext& ctx) {
  STOPKIT_CHECK(p.batch >= 0 && p.dim > 0 && p.hidden_dim >= 0, "stop_score: bad sizes");
  STOPKIT_CHECK(p.hidden_dim == 0 || p.hidden_weight != nullptr,
                "stop_score: hidden_dim needs hidden_weight");
  STOPKIT_CHECK(static_cast<int32_t>(p.activation) >= 0 && static_cast<int32_t>(p.activation) <= 4,
                "stop_score: activation code must be in 0..4");
  if (p.batch == 0) return;
  const int64_t need = stop_score_workspace_bytes(p.batch, p.hidden_dim);
  STOPKIT_CHECK(
      need == 0 || (ctx.workspace != 0 && ctx.workspace_bytes >= need && ctx.workspace % 16 == 0),
      "stop_score: the workspace must be 16-byte aligned and hold " + std::to_string(need) +
          " bytes (stop_score_workspace_bytes), got " + std::to_string(ctx.workspace_bytes));
  const LayerGrid g = layer_grid(p.batch, p.hidden_dim);
  if (p.hidden_dim > 0) {
    STOPKIT_CHECK(g.row_tiles <= INT_MAX && g.out_tiles <= 65535,
                  "stop_score: batch or hidden_dim too large for one launch");
  } else {
    STOPKIT_CHECK((p.batch + kRowsPerBlock - 1) / kRowsPerBlock <= INT_MAX,
                  "stop_score: batch too large");
  }
  DeviceGuard guard(ctx.device);
  const cudaStream_t stream = to_stream(ctx.stream);
  dispatch_dtype(p.hidden_dtype, [&](auto hidden_tag) {
    dispatch_dtype(p.weight_dtype, [&](auto weight_tag) {
      using TH = decltype(hidden_tag);
      using TW = decltype(weight_tag);
      if (p.hidden_dim == 0) {
        const int64_t blocks = (p.batch + kRowsPerBlock - 1) / kRowsPerBlock;
        stop_score_head_kernel<TH, TW>
            <<<static_cast<unsigned>(blocks), kRowsPerBlock * 32, 0, stream>>>(p);
        check_launch("stop_score_head_kernel");
        return;
      }
      auto* tickets = reinterpret_cast<unsigned*>(ctx.workspace);
      auto* partial = reinterpret_cast<float*>(ctx.workspace + g.ticket_bytes);
      check(cudaMemsetAsync(tickets, 0, static_cast<size_t>(g.ticket_bytes), stream),
            "cudaMemsetAsync");
      const dim3 grid(static_cast<unsigned>(g.row_tiles), static_cast<unsigned>(g.out_tiles));
      stop_score_layer_kernel<TH, TW><<<grid, kLayerThreads, 0, stream>>>(p, partial, tickets);
      check_launch("stop_score_layer_kernel");
    });
  });
}

}  // namespace stopkit::cuda
