// pybind11 module stopkit._C: the CPU ops (signatures in stopkit/bindings.h, shared with
// stopkit._C_cuda), plus the choice of instruction-set build and the OpenMP thread count.
#include <pybind11/pybind11.h>
#include <omp.h>
#if defined(__x86_64__)
#include <cpuid.h>
#endif
#if defined(__x86_64__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <string>

#include "stopkit/bindings.h"
#include "stopkit/cpu/kernels.h"

namespace py = pybind11;
using namespace stopkit;

namespace {

using PagedAttentionFn = void (*)(const PagedAttentionParams&);

std::string g_isa = "generic";
PagedAttentionFn g_paged_attention = &cpu::generic::paged_attention;

// Linux hands out AMX tile state only to processes that ask (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); true when this process may use the tiles.
bool request_amx() {
#if defined(__x86_64__) && defined(__linux__) && defined(STOPKIT_HAVE_AMX)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  const bool cpu = __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) && (edx >> 22 & 1u) &&
                   (edx >> 24 & 1u);  // AMX-BF16, AMX-TILE
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return cpu && syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

void select_isa() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#if defined(STOPKIT_HAVE_AVX512BF16)
  // AVX512_BF16 is cpuid leaf 7 subleaf 1, EAX bit 5 (older compilers lack its
  // __builtin_cpu_supports name).
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  const bool bf16 = __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && (eax >> 5 & 1u);
#if defined(STOPKIT_HAVE_AMX)
  if (avx512 && bf16 && request_amx()) {
    g_isa = "amx";
    g_paged_attention = &cpu::amx::paged_attention;
    return;
  }
#endif
  if (avx512 && bf16) {
    g_isa = "avx512bf16";
    g_paged_attention = &cpu::avx512bf16::paged_attention;
    return;
  }
#endif
  if (avx512) {
    g_isa = "avx512";
    g_paged_attention = &cpu::avx512::paged_attention;
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c")) {
    g_isa = "avx2";
    g_paged_attention = &cpu::avx2::paged_attention;
  }
#endif
}

std::string built_isas() {
  std::string isas = "generic";
#if defined(__x86_64__)
  isas += ", avx2, avx512";
#endif
#if defined(__x86_64__) && defined(STOPKIT_HAVE_AVX512BF16)
  isas += ", avx512bf16";
#endif
#if defined(__x86_64__) && defined(STOPKIT_HAVE_AMX)
  isas += ", amx";
#endif
  return isas;
}

struct CpuBackend {  // the CallContext (stream, device, workspace) is for the CUDA module's sake
  static void paged_attention(const PagedAttentionParams& p, const CallContext&) { g_paged_attention(p); }
  static void write_kv(const WriteKVParams& p, const CallContext&) { cpu::write_kv(p); }
  static void copy_blocks(const CopyBlocksParams& p, const CallContext&) { cpu::copy_blocks(p); }
  static void stop_score(const StopScoreParams& p, const CallContext&) { cpu::stop_score(p); }
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "stopkit CPU kernels (framework-agnostic; raw pointers)";
  select_isa();

  m.def("isa", [] { return g_isa; }, "Instruction set of the paged_attention build in use.");
  m.def("set_isa", [](const std::string& isa) {
    if (isa == "generic") { g_paged_attention = &cpu::generic::paged_attention; }
#if defined(__x86_64__)
    else if (isa == "avx2") { g_paged_attention = &cpu::avx2::paged_attention; }
    else if (isa == "avx512") { g_paged_attention = &cpu::avx512::paged_attention; }
#endif
#if defined(__x86_64__) && defined(STOPKIT_HAVE_AVX512BF16)
    else if (isa == "avx512bf16") { g_paged_attention = &cpu::avx512bf16::paged_attention; }
#endif
#if defined(__x86_64__) && defined(STOPKIT_HAVE_AMX)
    else if (isa == "amx") {
      STOPKIT_CHECK(request_amx(), "isa amx: this processor or kernel does not grant AMX tiles");
      g_paged_attention = &cpu::amx::paged_attention;
    }
#endif
    else { throw std::invalid_argument("isa must be one this build has: " + built_isas() + "; got " + isa); }
    g_isa = isa;
  }, py::arg("isa"), "Force one instruction-set build (tests; must be supported by the processor).");
  m.def("num_threads", [] { return omp_get_max_threads(); });
  m.def("set_num_threads", [](int n) {
    STOPKIT_CHECK(n >= 1, "num_threads must be >= 1");
    omp_set_num_threads(n);
  }, py::arg("n"));
  define_ops<CpuBackend>(m);
}
