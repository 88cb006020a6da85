// Host entry points of stopkit's CUDA ops (csrc/cuda/*.cu); module.cu binds them to Python.
// Each makes the context's device current, launches on its stream and returns without
// synchronising; argument errors throw std::invalid_argument, CUDA errors std::runtime_error.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "stopkit/cuda/launch_plan.h"
#include "stopkit/params.h"

namespace stopkit::cuda {

void paged_attention(const PagedAttentionParams& p, const CallContext& ctx);
void write_kv(const WriteKVParams& p, const CallContext& ctx);
void copy_blocks(const CopyBlocksParams& p, const CallContext& ctx);
void stop_score(const StopScoreParams& p, const CallContext& ctx);

// Workspace bytes that paged_attention / stop_score need in ctx.workspace for these arguments on
// `device` (pointers are not read; 0: none).
int64_t paged_attention_workspace_bytes(const PagedAttentionParams& p, int device);
int64_t stop_score_workspace_bytes(int64_t batch, int64_t hidden_dim);

// The launch plan paged_attention uses for these arguments on `device` (see launch_plan.h), and
// the blocks per multiprocessor that the CUDA runtime reports for its kernel instance and shared
// memory (the plan's blocks_per_sm is a lower bound of it).
AttentionPlan paged_attention_plan(DType dtype, int64_t head_dim, int64_t rows, int device);
int paged_attention_occupancy(DType dtype, int64_t head_dim, int64_t rows, int device);

// Context splits of paged_attention: 0 (default) plans them from waves; n >= 1 forces n (capped
// at kMaxSplits) so tests reach the split-and-merge path on small inputs.
void set_num_splits(int n);
int get_num_splits();

// The shared memory per block that plans assume: 0 (default) the device's opt-in limit, else
// min(limit, the device's), so one GPU runs the plans of a smaller one (e.g. 99 KB parts).
void set_smem_limit(int64_t bytes);
int64_t get_smem_limit();

}  // namespace stopkit::cuda
