// pybind11 module stopkit._C: the CPU ops (signatures in stopkit/bindings.h, shared with
// stopkit._C_cuda), plus the choice of instruction-set build and the OpenMP thread count.
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#if defined(__x86_64__)
#include <cpuid.h>
#endif
#if defined(__x86_64__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <string>
#include <string_view>
#include <vector>

#include "stopkit/bindings.h"
#include "stopkit/cpu/kernels.h"

namespace py = pybind11;
using namespace stopkit;

namespace {

using PagedAttentionFn = void (*)(const PagedAttentionParams&);

// The builds compiled in (STOPKIT_CPU_ISAS: least to most capable).
struct Build {
  std::string_view name;
  PagedAttentionFn paged_attention;
};
#define STOPKIT_BUILD(isa) Build{#isa, &cpu::isa::paged_attention},
constexpr Build kBuilds[] = {STOPKIT_CPU_ISAS(STOPKIT_BUILD)};
#undef STOPKIT_BUILD

#if defined(__x86_64__)
bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

// AVX512_BF16 is cpuid leaf 7 subleaf 1, EAX bit 5 (older compilers lack its
// __builtin_cpu_supports name).
bool has_avx512bf16() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return has_avx512() && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && (eax >> 5 & 1u);
}

// Linux hands out AMX tile state only to processes that ask (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); true when this process may use the tiles.
bool has_amx() {
#if defined(__linux__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  const bool cpu = has_avx512bf16() && __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) &&
                   (edx >> 22 & 1u) && (edx >> 24 & 1u);  // AMX-BF16, AMX-TILE
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return cpu && syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}
#endif

// What a build needs of the processor; "" where this one runs it.
std::string missing_for(std::string_view isa) {
  if (isa == "generic") return "";
#if defined(__x86_64__)
  if (isa == "avx2") return has_avx2() ? "" : "AVX2, FMA and F16C";
  if (isa == "avx512") return has_avx512() ? "" : "AVX-512 F, BW, VL and DQ";
  if (isa == "avx512bf16") return has_avx512bf16() ? "" : "AVX-512 F, BW, VL, DQ and BF16";
  if (isa == "amx") return has_amx() ? "" : "AVX-512 BF16 and AMX-BF16 tiles granted by the OS";
#endif
  return "an instruction set this module does not know";
}

struct Dispatch {
  std::vector<bool> runs;  // per kBuilds entry, checked once at import
  size_t current = 0;
};

Dispatch& dispatch() {
  static Dispatch d = [] {
#if defined(__x86_64__)
    __builtin_cpu_init();
#endif
    Dispatch d;
    for (const Build& b : kBuilds) d.runs.push_back(missing_for(b.name).empty());
    for (size_t i = 0; i < d.runs.size(); ++i)
      if (d.runs[i]) d.current = i;  // the most capable build this processor runs
    return d;
  }();
  return d;
}

std::vector<std::string> built_isas() {
  std::vector<std::string> names;
  for (const Build& b : kBuilds) names.emplace_back(b.name);
  return names;
}

void set_isa(const std::string& isa) {
  Dispatch& d = dispatch();
  for (size_t i = 0; i < std::size(kBuilds); ++i) {
    if (kBuilds[i].name != isa) continue;
    STOPKIT_CHECK(d.runs[i], "isa " + isa + ": this processor cannot run that build (it needs " +
                                 missing_for(isa) + ")");
    d.current = i;
    return;
  }
  std::string names;
  for (const std::string& name : built_isas()) names += (names.empty() ? "" : ", ") + name;
  throw std::invalid_argument("stopkit: isa must be a build this module has (" + names + "), got " +
                              isa);
}

struct CpuBackend {  // the CallContext (stream, device, workspace) is for the CUDA module's sake
  static void paged_attention(const PagedAttentionParams& p, const CallContext&) {
    kBuilds[dispatch().current].paged_attention(p);
  }
  static void write_kv(const WriteKVParams& p, const CallContext&) { cpu::write_kv(p); }
  static void copy_blocks(const CopyBlocksParams& p, const CallContext&) { cpu::copy_blocks(p); }
  static void stop_score(const StopScoreParams& p, const CallContext&) { cpu::stop_score(p); }
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "stopkit CPU kernels (framework-agnostic; raw pointers)";
  dispatch();

  m.def("isas", &built_isas,
        "The instruction-set builds of paged_attention compiled in, least to most capable.");
  m.def("isa", [] { return std::string(kBuilds[dispatch().current].name); },
        "The build in use: by default the most capable one this processor runs.");
  m.def("set_isa", &set_isa, py::arg("isa"),
        "Use one build (tests, benchmarks); ValueError for one not compiled in or that this "
        "processor cannot run.");
  m.def("split_keys", [] { return cpu::kSplitKeys; },
        "paged_attention splits rows longer than this many keys into chunks of this many.");
  m.def("num_threads", [] {
    return omp_get_max_threads();
  }, "The kernels' OpenMP threads (torch's OpenMP runtime: torch.get_num_threads() is the same).");
  m.def("set_num_threads", [](int n) {
    STOPKIT_CHECK(n >= 1, "num_threads must be >= 1");
    omp_set_num_threads(n);
  }, py::arg("n"), "Sets the kernels' OpenMP threads (and so torch's: they share the runtime).");
  define_ops<CpuBackend>(m);
}
