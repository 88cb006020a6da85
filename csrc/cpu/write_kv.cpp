// write_kv on the CPU: scatter [T, Hkv, D] keys and values into their cache slots.
#include <omp.h>

#include <cstring>

#include "stopkit/cpu/convert.h"
#include "stopkit/cpu/kernels.h"

namespace stopkit::cpu {

void write_kv(const WriteKVParams& p) {
  const int64_t num_slots = p.num_blocks * p.block_size;
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    const int64_t slot = p.slot_mapping[t];
    STOPKIT_CHECK(slot >= -1 && slot < num_slots,
                  "write_kv: slot_mapping[" + std::to_string(t) + "] = " + std::to_string(slot) +
                      " outside [-1, " + std::to_string(num_slots) + ")");
  }
  const size_t row_bytes = static_cast<size_t>(p.num_kv_heads * p.head_dim) * dtype_size(p.dtype);
  const auto* k = static_cast<const char*>(p.k);
  const auto* v = static_cast<const char*>(p.v);
  auto* kc = static_cast<char*>(p.k_cache);
  auto* vc = static_cast<char*>(p.v_cache);
  // Slot index * row bytes is the offset: a slot's tokens are one [Hkv, D] row in the cache.
#pragma omp parallel for schedule(static) if (p.num_tokens * row_bytes > (1 << 16))
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    const int64_t slot = p.slot_mapping[t];
    if (slot < 0) continue;
    std::memcpy(kc + slot * row_bytes, k + t * row_bytes, row_bytes);
    std::memcpy(vc + slot * row_bytes, v + t * row_bytes, row_bytes);
  }
}

}  // namespace stopkit::cpu
