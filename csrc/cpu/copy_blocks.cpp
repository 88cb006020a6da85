// copy_blocks on the CPU: copy-on-write of whole KV blocks, in every plane (layer x K/V).
#include <omp.h>

#include <cstring>

#include "stopkit/cpu/kernels.h"

namespace stopkit::cpu {

void copy_blocks(const CopyBlocksParams& p) {
  for (int64_t i = 0; i < p.num_pairs; ++i) {
    STOPKIT_CHECK(
        p.src[i] >= 0 && p.src[i] < p.num_blocks && p.dst[i] >= 0 && p.dst[i] < p.num_blocks,
        "copy_blocks: pair " + std::to_string(i) + " (" + std::to_string(p.src[i]) + " -> " +
            std::to_string(p.dst[i]) + ") outside [0, " + std::to_string(p.num_blocks) + ")");
  }
  auto* cache = static_cast<char*>(p.cache);
  const int64_t plane_bytes = p.num_blocks * p.block_bytes;
  const int64_t work = p.num_planes * p.num_pairs;
#pragma omp parallel for schedule(static) if (work * p.block_bytes > (1 << 18))
  for (int64_t w = 0; w < work; ++w) {
    const int64_t plane = w / p.num_pairs, i = w % p.num_pairs;
    char* base = cache + plane * plane_bytes;
    std::memcpy(base + p.dst[i] * p.block_bytes, base + p.src[i] * p.block_bytes, p.block_bytes);
  }
}

}  // namespace stopkit::cpu
