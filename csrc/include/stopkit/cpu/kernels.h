// Declarations of the CPU kernels. paged_attention has one build per instruction set, each in the
// namespace of its name (see CMakeLists.txt); module.cpp picks the best one the running processor
// supports.
#pragma once

#include <cstdint>

#include "stopkit/cpu/isas.h"  // generated: STOPKIT_CPU_ISAS(X), the builds compiled in
#include "stopkit/params.h"

namespace stopkit::cpu {

// Keys per work item of paged_attention: a longer row is split into chunks of this many keys
// (whole pages; a multiple of the amx build's 128-key blocks), merged by their LSE. The split plan
// depends on the row's own length (and the call's window) only, never on the batch or the thread
// count, so a row's output has the same bits whatever batch it sits in and however many threads
// run. Smaller chunks give a lone long row more threads but cost every split row more (each chunk
// writes a partial result to merge); bench/RESULTS.md has the measurements.
constexpr int64_t kSplitKeys = 1024;

#define STOPKIT_DECLARE_ISA(isa)                       \
  namespace isa {                                      \
  void paged_attention(const PagedAttentionParams& p); \
  }
STOPKIT_CPU_ISAS(STOPKIT_DECLARE_ISA)
#undef STOPKIT_DECLARE_ISA

void write_kv(const WriteKVParams& p);
void copy_blocks(const CopyBlocksParams& p);
void stop_score(const StopScoreParams& p);

}  // namespace stopkit::cpu
