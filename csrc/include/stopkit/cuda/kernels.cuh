// Host entry points of stopkit's CUDA ops (csrc/cuda/*.cu); module.cu binds them to Python.
// Each launches on `stream` (on that stream's device) and returns without synchronising;
// argument errors throw std::invalid_argument, CUDA errors std::runtime_error.
#pragma once

#include <cuda_runtime.h>

#include "stopkit/params.h"

namespace stopkit::cuda {

void paged_attention(const PagedAttentionParams& p, cudaStream_t stream);
void write_kv(const WriteKVParams& p, cudaStream_t stream);
void copy_blocks(const CopyBlocksParams& p, cudaStream_t stream);
void stop_score(const StopScoreParams& p, cudaStream_t stream);

// Context splits of paged_attention: 0 (default) picks them to fill the GPU; n >= 1 forces n
// (capped at kMaxSplits) so tests can reach the split-and-merge path on small inputs.
constexpr int kMaxSplits = 64;
void set_num_splits(int n);
int get_num_splits();

}  // namespace stopkit::cuda
