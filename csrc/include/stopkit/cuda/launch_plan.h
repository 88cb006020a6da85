// Launch plan of the CUDA paged-attention kernel: its shared-memory layout, the pipeline depth
// and query tile that fit a device's per-block limit, the blocks per multiprocessor that follow,
// and the context split chosen from waves. Plain host C++ with no CUDA headers: stopkit._C (the
// CPU module) binds these same functions as cuda_launch_plan / cuda_num_splits, so the plan that
// stopkit._C_cuda launches by is tested on machines without a GPU.
#pragma once

#include <algorithm>
#include <cstdint>

namespace stopkit::cuda {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kMinStages = 2;
constexpr int kMaxStages = 4;
constexpr int kMaxSplits = 64;
// The kernel's __launch_bounds__ minimum: registers never hold more blocks back than this.
constexpr int kMinBlocksPerSm = 2;
// Shared memory the runtime keeps per resident block (sm_80 and later); a multiprocessor holds
// its opt-in per-block limit plus one such reservation (163 + 1, 99 + 1, 227 + 1 KB).
constexpr int64_t kSmemReservedPerBlock = 1024;

// The compile-time head_dim of the kernel instance that serves `head_dim` (any multiple of 16 in
// 32..256 runs in the next of 64, 128, 256).
constexpr int head_dim_bucket(int64_t head_dim) {
  return head_dim <= 64 ? 64 : head_dim <= 128 ? 128 : 256;
}

// Shared-memory layout of one kernel instance (element size, head_dim bucket), in this order:
//   K and V tiles  [stages][2][keys][ld] elements (rows padded by 16 bytes: no bank conflicts)
//   key positions  [stages][keys] int32
//   P staging      [kWarps][16][kPLd] float32 (float32 path only: no tensor cores there)
//   queries        [16 * query_slices][ld] elements
// The epilogue reuses the start of it for [kWarps][16][dmax + 6] float32 partial rows.
struct TileLayout {
  int elem_bytes;  // 4 (float32) or 2 (float16, bfloat16)
  int dmax;        // 64, 128 or 256

  static constexpr int kPLd = 17;  // P row stride, floats (conflict-free)

  constexpr int ld() const { return dmax + 16 / elem_bytes; }
  // Keys per stage: 16 KiB of keys (and as much of values) per pipeline stage.
  constexpr int keys() const { return 16384 / (dmax * elem_bytes); }
  constexpr bool mma() const { return elem_bytes == 2; }
  constexpr int64_t kv_stage_bytes() const { return int64_t(2) * keys() * ld() * elem_bytes; }
  constexpr int64_t kpos_offset(int stages) const { return stages * kv_stage_bytes(); }
  constexpr int64_t p_offset(int stages) const {
    return kpos_offset(stages) + int64_t(stages) * keys() * 4;
  }
  constexpr int64_t p_bytes() const { return mma() ? 0 : int64_t(kWarps) * 16 * kPLd * 4; }
  constexpr int64_t q_offset(int stages) const { return p_offset(stages) + p_bytes(); }
  constexpr int64_t q_bytes(int query_slices) const {
    return int64_t(16) * query_slices * ld() * elem_bytes;
  }
  constexpr int red_ld() const { return dmax + 4; }
  constexpr int64_t reduce_bytes() const { return int64_t(kWarps) * 16 * (red_ld() + 2) * 4; }
  constexpr int64_t smem_bytes(int stages, int query_slices) const {
    return std::max(q_offset(stages) + q_bytes(query_slices), reduce_bytes());
  }
};

// Blocks of `smem_bytes` that one multiprocessor holds on a device whose opt-in per-block limit
// is `max_shared_memory`, at most kMinBlocksPerSm (registers bound the rest).
constexpr int blocks_per_sm(int64_t smem_bytes, int64_t max_shared_memory) {
  const int64_t by_smem =
      (max_shared_memory + kSmemReservedPerBlock) / (smem_bytes + kSmemReservedPerBlock);
  return static_cast<int>(std::min<int64_t>(by_smem, kMinBlocksPerSm));
}

struct AttentionPlan {
  int dmax;            // compile-time head_dim of the kernel instance
  int keys_per_stage;  // keys of one pipeline stage
  int stages;          // pipeline depth (kMinStages..kMaxStages)
  int query_slices;    // 16-row query slices per block (1, 2 or 4); rows = 16 * query_slices
  int64_t smem_bytes;  // dynamic shared memory per block
  int blocks_per_sm;   // resident blocks per multiprocessor (0: does not fit)
};

// The plan for `rows` query rows per (batch row, kv head) (= query heads per kv head x q_len).
// The query tile covers the rows where it can (1, 2 or 4 slices of 16); then the most blocks per
// multiprocessor, then the deepest pipeline that keeps them. A tile that cannot fit even 2 stages
// takes fewer slices (more query tiles re-read the same keys). blocks_per_sm == 0 when nothing fits.
inline AttentionPlan plan_paged_attention(int elem_bytes, int64_t head_dim, int64_t rows,
                                          int64_t max_shared_memory) {
  const TileLayout t{elem_bytes, head_dim_bucket(head_dim)};
  int slices = rows <= 16 ? 1 : rows <= 32 ? 2 : 4;
  for (;; slices /= 2) {
    AttentionPlan best{t.dmax, t.keys(), 0, slices, 0, 0};
    for (int stages = kMinStages; stages <= kMaxStages; ++stages) {
      const int64_t smem = t.smem_bytes(stages, slices);
      if (smem > max_shared_memory) break;
      const int blocks = blocks_per_sm(smem, max_shared_memory);
      if (blocks >= best.blocks_per_sm) best = {t.dmax, t.keys(), stages, slices, smem, blocks};
    }
    if (best.blocks_per_sm > 0 || slices == 1) return best;
  }
}

// Split-KV cost model, in units of one key's work in one block: a block with k keys costs
// k + kBlockCostKeys (queries, pipeline fill, epilogue), a wave of blocks as much as one block,
// and any split adds the merge launch. Constants to be tuned on a device (bench/device_check.sh).
constexpr int64_t kMinSplitKeys = 128;  // fewer keys per split than this are not worth a merge
constexpr int64_t kBlockCostKeys = 64;
constexpr int64_t kMergeCostKeys = 128;

// Context splits for `blocks` blocks per split (batch x kv heads x query tiles) over at most
// `max_keys` keys per row, on `num_sms` multiprocessors of `blocks_per_sm` blocks each: the fewest
// splits whose estimated time is within 5% of the best (flash-attention's and FlashInfer's rule
// of planning from waves, from the longest row rather than the table's capacity).
inline int num_splits(int64_t blocks, int64_t max_keys, int64_t num_sms, int64_t blocks_per_sm) {
  const int64_t slots = std::max<int64_t>(1, num_sms * blocks_per_sm);
  const int n_max = static_cast<int>(std::clamp<int64_t>(max_keys / kMinSplitKeys, 1, kMaxSplits));
  if (blocks <= 0 || n_max == 1) return 1;
  auto cost = [&](int n) {
    const int64_t waves = (blocks * n + slots - 1) / slots;
    const int64_t keys = (max_keys + n - 1) / n;
    return waves * (keys + kBlockCostKeys) + (n > 1 ? kMergeCostKeys : 0);
  };
  int64_t best = cost(1);
  for (int n = 2; n <= n_max; ++n) best = std::min(best, cost(n));
  for (int n = 1;; ++n) {
    if (cost(n) * 100 <= best * 105) return n;
  }
}

}  // namespace stopkit::cuda
