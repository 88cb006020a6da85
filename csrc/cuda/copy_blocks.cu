// copy_blocks on CUDA: copy-on-write of whole KV blocks in every plane (layer x K/V) of a cache
// viewed as [planes, num_blocks, block_bytes]. One thread block per (plane, pair).
#include <algorithm>

#include "stopkit/cuda/common.cuh"
#include "stopkit/cuda/kernels.cuh"

namespace stopkit::cuda {
namespace {

template <typename V>
__global__ void copy_blocks_kernel(V* cache, const int64_t* __restrict__ src,
                                   const int64_t* __restrict__ dst, int64_t num_pairs, int64_t work,
                                   int64_t num_blocks, int64_t block_vecs) {
  for (int64_t w = blockIdx.x; w < work; w += gridDim.x) {
    const int64_t plane = w / num_pairs, pair = w - plane * num_pairs;
    const int64_t s = __ldg(src + pair), d = __ldg(dst + pair);
    const bool ok = s >= 0 && s < num_blocks && d >= 0 && d < num_blocks;
    debug_trap_if(!ok);
    if (!ok) continue;
    V* base = cache + plane * num_blocks * block_vecs;
    const V* from = base + s * block_vecs;
    V* to = base + d * block_vecs;
    for (int64_t i = threadIdx.x; i < block_vecs; i += blockDim.x) to[i] = from[i];
  }
}

template <typename V>
void launch(const CopyBlocksParams& p, cudaStream_t stream) {
  const int64_t work = p.num_planes * p.num_pairs;
  const int64_t blocks = std::min<int64_t>(work, int64_t(1) << 20);
  copy_blocks_kernel<V><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      static_cast<V*>(p.cache), p.src, p.dst, p.num_pairs, work, p.num_blocks,
      p.block_bytes / int64_t(sizeof(V)));
  check_launch("copy_blocks_kernel");
}

}  // namespace

void copy_blocks(const CopyBlocksParams& p, const CallContext& ctx) {
  STOPKIT_CHECK(p.num_pairs >= 0 && p.num_planes >= 0 && p.num_blocks >= 0 && p.block_bytes >= 0,
                "copy_blocks: sizes must be >= 0");
  if (p.num_pairs == 0 || p.num_planes == 0 || p.block_bytes == 0) return;
  const uint64_t align = uint64_t(reinterpret_cast<uintptr_t>(p.cache)) | uint64_t(p.block_bytes);
  DeviceGuard guard(ctx.device);
  const cudaStream_t stream = to_stream(ctx.stream);
  if (align % 16 == 0) launch<uint4>(p, stream);
  else if (align % 8 == 0) launch<uint2>(p, stream);
  else if (align % 4 == 0) launch<uint32_t>(p, stream);
  else if (align % 2 == 0) launch<uint16_t>(p, stream);
  else launch<uint8_t>(p, stream);
}

}  // namespace stopkit::cuda
