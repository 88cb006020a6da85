// stop_score on CUDA, one warp per row, one launch: RMSNorm (float32) -> optional hidden layer +
// activation -> Linear(., 2) -> softmax[1]. Dot products run 8 output rows at a time so that each
// pass reads the input row once and the weight rows with coalesced loads.
#include <algorithm>

#include "stopkit/cuda/common.cuh"
#include "stopkit/cuda/kernels.cuh"

namespace stopkit::cuda {
namespace {

constexpr int kRowsPerBlock = 4;  // warps per block
constexpr int kOutTile = 8;       // hidden-layer outputs per pass

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

template <typename TH, typename TW>
__global__ void __launch_bounds__(kRowsPerBlock * 32) stop_score_kernel(const StopScoreParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (row >= p.batch) return;  // warp-uniform
  const int64_t d = p.dim, h = p.hidden_dim;
  const TH* x = static_cast<const TH*>(p.hidden) + row * d;
  const TW* norm = static_cast<const TW*>(p.norm_weight);
  const TW* hw = static_cast<const TW*>(p.hidden_weight);
  const TW* hb = static_cast<const TW*>(p.hidden_bias);
  const TW* w = static_cast<const TW*>(p.head_weight);
  const TW* wb = static_cast<const TW*>(p.head_bias);

  float inv = 1.0f;
  if (norm) {
    float ss = 0.0f;
    for (int64_t i = lane; i < d; i += 32) {
      const float v = to_float(x[i]);
      ss += v * v;
    }
    inv = 1.0f / sqrtf(warp_sum(ss) / static_cast<float>(d) + p.eps);
  }
  auto feature = [&](int64_t i) {
    const float v = to_float(x[i]);
    return norm ? v * inv * to_float(norm[i]) : v;
  };

  float logit0 = wb ? to_float(wb[0]) : 0.0f, logit1 = wb ? to_float(wb[1]) : 0.0f;
  if (h == 0) {
    float a0 = 0.0f, a1 = 0.0f;
    for (int64_t i = lane; i < d; i += 32) {
      const float f = feature(i);
      a0 += f * to_float(w[i]);
      a1 += f * to_float(w[d + i]);
    }
    logit0 += warp_sum(a0);
    logit1 += warp_sum(a1);
  } else {
    for (int64_t j0 = 0; j0 < h; j0 += kOutTile) {
      const int nj = static_cast<int>(std::min<int64_t>(kOutTile, h - j0));
      float acc[kOutTile] = {};
      for (int64_t i = lane; i < d; i += 32) {
        const float f = feature(i);
#pragma unroll
        for (int j = 0; j < kOutTile; ++j) {
          if (j < nj) acc[j] += f * to_float(hw[(j0 + j) * d + i]);
        }
      }
#pragma unroll
      for (int j = 0; j < kOutTile; ++j) {
        if (j < nj) {  // nj is warp-uniform: every lane joins the reduction
          float y = warp_sum(acc[j]) + (hb ? to_float(hb[j0 + j]) : 0.0f);
          y = activate(y, p.activation);
          logit0 += y * to_float(w[j0 + j]);
          logit1 += y * to_float(w[h + j0 + j]);
        }
      }
    }
  }
  // softmax(logits)[1] = sigmoid(l1 - l0)
  if (lane == 0) p.out[row] = 1.0f / (1.0f + expf(logit0 - logit1));
}

}  // namespace

void stop_score(const StopScoreParams& p, cudaStream_t stream) {
  STOPKIT_CHECK(p.batch >= 0 && p.dim > 0 && p.hidden_dim >= 0, "stop_score: bad sizes");
  STOPKIT_CHECK(p.hidden_dim == 0 || p.hidden_weight != nullptr, "stop_score: hidden_dim needs hidden_weight");
  STOPKIT_CHECK(static_cast<int32_t>(p.activation) >= 0 && static_cast<int32_t>(p.activation) <= 4,
                "stop_score: activation code must be in 0..4");
  if (p.batch == 0) return;
  const int64_t blocks = (p.batch + kRowsPerBlock - 1) / kRowsPerBlock;
  STOPKIT_CHECK(blocks <= INT32_MAX, "stop_score: batch too large");
  DeviceGuard guard(stream);
  dispatch_dtype(p.hidden_dtype, [&](auto hidden_tag) {
    dispatch_dtype(p.weight_dtype, [&](auto weight_tag) {
      using TH = decltype(hidden_tag);
      using TW = decltype(weight_tag);
      stop_score_kernel<TH, TW><<<static_cast<unsigned>(blocks), kRowsPerBlock * 32, 0, stream>>>(p);
      check_launch("stop_score_kernel");
    });
  });
}

}  // namespace stopkit::cuda
