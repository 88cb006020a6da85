// Argument structs of stopkit's native ops, shared by the CPU and CUDA backends.
// All tensors are dense and row-major (stopkit/ops.py guarantees it); pointers are raw device or
// host addresses. Shapes follow docs/DESIGN.md section 3, "Data layouts".
#pragma once

#include <cstddef>
#include <cstdint>
#include <iterator>

#include "stopkit/common.h"

namespace stopkit {

// Where a CUDA call runs and its scratch memory: a cudaStream_t address (0 = the legacy default
// stream), the device index (-1 = the current one), and device memory from the caller's allocator
// (torch's, so CUDA graphs and torch.cuda.memory_* see it) of the size the op asked for.
struct CallContext {
  uintptr_t stream = 0;
  int device = -1;
  uintptr_t workspace = 0;
  int64_t workspace_bytes = 0;
};

struct PagedAttentionParams {
  void* out;                   // [batch, q_len, num_heads, head_dim], dtype
  float* lse;                  // [batch, q_len, num_heads] or nullptr
  const void* q;               // [batch, q_len, num_heads, head_dim], dtype
  const void* k_cache;         // [num_blocks, block_size, num_kv_heads, head_dim], dtype
  const void* v_cache;         // same
  const int32_t* block_table;  // [batch, max_blocks_per_row]
  const int32_t* seq_lens;     // [batch]
  const void* suffix_k;  // [batch, q_len, num_kv_heads, head_dim] or nullptr (then suffix_v too)
  const void* suffix_v;
  const float* sinks;  // [num_heads] or nullptr
  int64_t batch, q_len, num_heads, num_kv_heads, head_dim;
  int64_t block_size, num_blocks, max_blocks_per_row;
  float scale;     // softmax scale applied to q.k
  int64_t window;  // <= 0: no window; else attend to the last `window` positions
  DType dtype;
  int64_t max_seq_len;  // an upper bound of seq_lens (< 0: unknown); plans CUDA's splits
};

// Query s of row b sits at absolute position seq_lens[b] + s when a suffix is given and sees
// positions [0, seq_lens[b] + s]; without a suffix every query sits at seq_lens[b] - 1 and sees
// [0, seq_lens[b]). A window W keeps positions p > query_pos - W.
STOPKIT_HOST_DEVICE int64_t query_position(int64_t seq_len, int64_t s, bool has_suffix) {
  return has_suffix ? seq_len + s : seq_len - 1;
}

struct WriteKVParams {
  const void* k;  // [num_tokens, num_kv_heads, head_dim]
  const void* v;
  void* k_cache;  // [num_blocks, block_size, num_kv_heads, head_dim]
  void* v_cache;
  const int64_t* slot_mapping;  // [num_tokens], -1 skips the token
  int64_t num_tokens, num_kv_heads, head_dim, block_size, num_blocks;
  DType dtype;
};

// Copies block src[i] to dst[i] in every plane of a cache viewed as [planes, num_blocks, block_elems].
struct CopyBlocksParams {
  void* cache;
  const int64_t* src;
  const int64_t* dst;
  int64_t num_pairs, num_planes, num_blocks, block_bytes;
};

// stop_score's activation, passed as its code; stopkit/ops.py reads the codes from
// activation_codes() (bindings.h).
enum class Activation : int32_t { kNone = 0, kGelu = 1, kRelu = 2, kSilu = 3, kTanh = 4 };
// The name of each code (stop_score's `activation` argument), indexed by code.
inline constexpr const char* kActivationNames[] = {"none", "gelu", "relu", "silu", "tanh"};
static_assert(std::size(kActivationNames) == static_cast<size_t>(Activation::kTanh) + 1);

// RMSNorm (optional) -> hidden layer + activation (optional) -> Linear(., 2) -> softmax[1].
struct StopScoreParams {
  float* out;                      // [batch] float32
  const void* hidden;              // [batch, d], hidden_dtype
  const void* norm_weight;         // [d] or nullptr, weight_dtype
  const void* hidden_weight;       // [h, d] or nullptr
  const void* hidden_bias;         // [h] or nullptr
  const void* head_weight;         // [2, h or d]
  const void* head_bias;           // [2] or nullptr
  int64_t batch, dim, hidden_dim;  // hidden_dim = 0 without a hidden layer
  float eps;
  Activation activation;
  DType hidden_dtype, weight_dtype;
};

}  // namespace stopkit
