// stop_score on the CPU: RMSNorm -> [hidden layer + activation] -> Linear(., 2) -> softmax[1].
#include <omp.h>

#include <cmath>
#include <vector>

#include "stopkit/cpu/convert.h"
#include "stopkit/cpu/kernels.h"

namespace stopkit::cpu {
namespace {

inline float activate(float x, Activation a) {
  switch (a) {
    case Activation::kGelu: return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f));
    case Activation::kRelu: return x > 0.0f ? x : 0.0f;
    case Activation::kSilu: return x / (1.0f + std::exp(-x));
    case Activation::kTanh: return std::tanh(x);
    case Activation::kNone: break;
  }
  return x;
}

template <DType HD, DType WD>
void run(const StopScoreParams& p) {
  using H = Elem<HD>;
  using W = Elem<WD>;
  const auto* hidden = static_cast<const typename H::T*>(p.hidden);
  const auto* norm = static_cast<const typename W::T*>(p.norm_weight);
  const auto* hw = static_cast<const typename W::T*>(p.hidden_weight);
  const auto* hb = static_cast<const typename W::T*>(p.hidden_bias);
  const auto* w = static_cast<const typename W::T*>(p.head_weight);
  const auto* b = static_cast<const typename W::T*>(p.head_bias);
  const int64_t d = p.dim, h = p.hidden_dim, in = h > 0 ? h : d;
#pragma omp parallel if (p.batch * p.dim * (p.hidden_dim + 2) > (1 << 18))
  {
    std::vector<float> x(d), y(h);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < p.batch; ++r) {
      const auto* row = hidden + r * d;
      for (int64_t i = 0; i < d; ++i) x[i] = H::load(row[i]);
      if (norm) {
        double ss = 0.0;
        for (int64_t i = 0; i < d; ++i) ss += static_cast<double>(x[i]) * x[i];
        const float inv = 1.0f / std::sqrt(static_cast<float>(ss / d) + p.eps);
        for (int64_t i = 0; i < d; ++i) x[i] = x[i] * inv * W::load(norm[i]);
      }
      const float* feat = x.data();
      if (h > 0) {
        for (int64_t j = 0; j < h; ++j) {
          float acc = hb ? W::load(hb[j]) : 0.0f;
          const auto* wr = hw + j * d;
          for (int64_t i = 0; i < d; ++i) acc += W::load(wr[i]) * x[i];
          y[j] = activate(acc, p.activation);
        }
        feat = y.data();
      }
      float logit[2];
      for (int c = 0; c < 2; ++c) {
        float acc = b ? W::load(b[c]) : 0.0f;
        for (int64_t i = 0; i < in; ++i) acc += W::load(w[c * in + i]) * feat[i];
        logit[c] = acc;
      }
      // softmax(logits)[1] = sigmoid(l1 - l0)
      p.out[r] = 1.0f / (1.0f + std::exp(logit[0] - logit[1]));
    }
  }
}

}  // namespace

void stop_score(const StopScoreParams& p) {
  dispatch_dtype(p.hidden_dtype, [&](auto hd) {
    dispatch_dtype(p.weight_dtype,
                   [&](auto wd) { run<decltype(hd)::value, decltype(wd)::value>(p); });
  });
}

}  // namespace stopkit::cpu
