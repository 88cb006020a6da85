// write_kv on CUDA: scatter [T, Hkv, D] keys and values into their cache slots.
// A slot's [Hkv, D] row is contiguous in the cache, so each token is one row copy; the widest
// vector (16 bytes down to 2) that the row size and every pointer's alignment allow is used.
// Two tokens for one slot race (the row may end up with pieces of both): ops.py rejects
// duplicate slots when it checks indices, and callers that skip the check must not pass any.
#include <algorithm>

#include "stopkit/cuda/common.cuh"
#include "stopkit/cuda/kernels.cuh"

namespace stopkit::cuda {
namespace {

// One element i of the flattened [T, row_vecs] input per thread (grid-stride).
template <typename V>
__global__ void write_kv_kernel(const V* __restrict__ k, const V* __restrict__ v,
                                V* __restrict__ k_cache, V* __restrict__ v_cache,
                                const int64_t* __restrict__ slots, int64_t total, int64_t row_vecs,
                                int64_t num_slots) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / row_vecs, c = i - t * row_vecs;
    const int64_t slot = __ldg(slots + t);
    if (slot < 0 || slot >= num_slots) {  // -1 skips the token; anything else out of range is a bug
      debug_trap_if(slot != -1);
      continue;
    }
    k_cache[slot * row_vecs + c] = k[i];
    v_cache[slot * row_vecs + c] = v[i];
  }
}

template <typename V>
void launch(const WriteKVParams& p, int64_t row_bytes, cudaStream_t stream) {
  const int64_t row_vecs = row_bytes / int64_t(sizeof(V));
  const int64_t total = p.num_tokens * row_vecs;
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 20);
  write_kv_kernel<V><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const V*>(p.k), static_cast<const V*>(p.v), static_cast<V*>(p.k_cache),
      static_cast<V*>(p.v_cache), p.slot_mapping, total, row_vecs, p.num_blocks * p.block_size);
  check_launch("write_kv_kernel");
}

}  // namespace

void write_kv(const WriteKVParams& p, const CallContext& ctx) {
  STOPKIT_CHECK(p.num_tokens >= 0 && p.num_kv_heads > 0 && p.head_dim > 0 && p.block_size > 0 &&
                    p.num_blocks >= 0,
                "write_kv: sizes must be positive (num_tokens, num_blocks >= 0)");
  if (p.num_tokens == 0) return;
  const int64_t esize = p.dtype == DType::kFloat32 ? 4 : 2;
  const int64_t row_bytes = p.num_kv_heads * p.head_dim * esize;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(p.k) | reinterpret_cast<uintptr_t>(p.v) |
                         reinterpret_cast<uintptr_t>(p.k_cache) |
                         reinterpret_cast<uintptr_t>(p.v_cache);
  const uint64_t align = uint64_t(addr) | uint64_t(row_bytes);  // lowest set bit = common alignment
  DeviceGuard guard(ctx.device);
  const cudaStream_t stream = to_stream(ctx.stream);
  if (align % 16 == 0) launch<uint4>(p, row_bytes, stream);
  else if (align % 8 == 0) launch<uint2>(p, row_bytes, stream);
  else if (align % 4 == 0) launch<uint32_t>(p, row_bytes, stream);
  else launch<uint16_t>(p, row_bytes, stream);
}

}  // namespace stopkit::cuda
