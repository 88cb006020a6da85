// Declarations of the CPU kernels. paged_attention has one build per instruction set (see
// CMakeLists.txt); module.cpp picks the best one the running processor supports.
#pragma once

#include "stopkit/params.h"

namespace stopkit::cpu {

#define STOPKIT_DECLARE_ISA(isa) \
  namespace isa {                \
  void paged_attention(const PagedAttentionParams& p); \
  }
STOPKIT_DECLARE_ISA(generic)
#if defined(__x86_64__)
STOPKIT_DECLARE_ISA(avx2)
STOPKIT_DECLARE_ISA(avx512)
#endif
#if defined(__x86_64__) && defined(STOPKIT_HAVE_AVX512BF16)  // the compiler could build it
STOPKIT_DECLARE_ISA(avx512bf16)
#endif
#if defined(__x86_64__) && defined(STOPKIT_HAVE_AMX)
STOPKIT_DECLARE_ISA(amx)
#endif
#undef STOPKIT_DECLARE_ISA

void write_kv(const WriteKVParams& p);
void copy_blocks(const CopyBlocksParams& p);
void stop_score(const StopScoreParams& p);

}  // namespace stopkit::cpu
