// The online-softmax state of one query row and its merges, written once for the CPU and CUDA
// kernels (FlashInfer's attention/state.cuh is the model). A state summarises the logits x_i seen
// so far by m = max x_i and l = sum exp(x_i - m); the kernels keep the matching value
// accumulator acc = sum exp(x_i - m) v_i beside it, and the output row is acc / l.
//
// Base is the log base the logits live in: NaturalLog (the CPU kernels) or Log2 (the CUDA kernel,
// whose scores are pre-multiplied by log2(e) so that each exp is one ex2). The natural-log LSE that
// ops.py returns is lse() * Base::kToNatural.
#pragma once

#include <math.h>

#include "stopkit/common.h"

namespace stopkit {

struct NaturalLog {
  static constexpr float kToNatural = 1.0f;
  static constexpr float kFromNatural = 1.0f;
  static STOPKIT_HOST_DEVICE float exp(float x) { return ::expf(x); }
  static STOPKIT_HOST_DEVICE float log(float x) { return ::logf(x); }
};

struct Log2 {
  static constexpr float kToNatural = 0.6931471805599453f;    // ln 2
  static constexpr float kFromNatural = 1.4426950408889634f;  // log2 e
  static STOPKIT_HOST_DEVICE float exp(float x) { return ::exp2f(x); }
  static STOPKIT_HOST_DEVICE float log(float x) { return ::log2f(x); }
};

template <typename Base>
struct SoftmaxState {
  float m;  // largest logit seen; -inf: none
  float l;  // sum over the logits seen of Base::exp(x - m)

  // The scales that a merge applies to the two accumulators.
  struct Scales {
    float self, other;
  };

  static STOPKIT_HOST_DEVICE SoftmaxState empty() { return {-INFINITY, 0.0f}; }

  // The state of a part already normalised (acc = out, so l = 1) with log-sum-exp `lse` (-inf:
  // the part saw nothing): merging such parts is the split-K merge of (out, lse) pairs.
  static STOPKIT_HOST_DEVICE SoftmaxState from_lse(float lse) {
    return {lse, lse == -INFINITY ? 0.0f : 1.0f};
  }

  // Base::exp(from - to) for from <= to: what sums taken against max `from` are multiplied by when
  // the max becomes `to`, and the weight of a logit `from` against max `to`. 0 for from = -inf,
  // also where `to` is -inf (an empty part weighs nothing; -inf - -inf would be NaN).
  static STOPKIT_HOST_DEVICE float rescale(float from, float to) {
    return from == -INFINITY ? 0.0f : Base::exp(from - to);
  }

  // Raises the running max to at least x (a new tile's max) and returns the factor that l (done
  // here) and the accumulator (the caller's) are multiplied by; the caller then adds the tile's
  // Base::exp(x_i - m) to l.
  STOPKIT_HOST_DEVICE float raise_max(float x) {
    const float m_new = m < x ? x : m;
    const float c = rescale(m, m_new);
    l *= c;
    m = m_new;
    return c;
  }

  // Merges another part's state into this one: acc = acc * scales.self + other_acc * scales.other.
  STOPKIT_HOST_DEVICE Scales merge(const SoftmaxState& o) {
    const float m_new = m < o.m ? o.m : m;
    const Scales s{rescale(m, m_new), rescale(o.m, m_new)};
    l = l * s.self + o.l * s.other;
    m = m_new;
    return s;
  }

  // Folds in an attention-sink logit (a key with no value, gpt-oss) and returns the factor for
  // the accumulator.
  STOPKIT_HOST_DEVICE float add_sink(float sink) {
    const float m_new = m < sink ? sink : m;
    const float c = rescale(m, m_new);
    l = l * c + rescale(sink, m_new);
    m = m_new;
    return c;
  }

  // The factor that turns the accumulator, scaled by `acc_scale`, into the output row: 0 where
  // nothing was seen.
  STOPKIT_HOST_DEVICE float output_scale(float acc_scale = 1.0f) const {
    return l > 0.0f ? acc_scale / l : 0.0f;
  }

  // log-sum-exp of the logits seen, in Base units (-inf: none).
  STOPKIT_HOST_DEVICE float lse() const { return l > 0.0f ? m + Base::log(l) : -INFINITY; }
  STOPKIT_HOST_DEVICE float natural_lse() const { return lse() * Base::kToNatural; }
};

}  // namespace stopkit
