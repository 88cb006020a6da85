// pybind11 module stopkit._C: the CPU ops (signatures in stopkit/bindings.h, shared with
// stopkit._C_cuda), plus the choice of instruction-set build and the OpenMP thread count.
#include <pybind11/pybind11.h>
#include <omp.h>

#include <string>

#include "stopkit/bindings.h"
#include "stopkit/cpu/kernels.h"

namespace py = pybind11;
using namespace stopkit;

namespace {

using PagedAttentionFn = void (*)(const PagedAttentionParams&);

std::string g_isa = "generic";
PagedAttentionFn g_paged_attention = &cpu::generic::paged_attention;

void select_isa() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    g_isa = "avx512";
    g_paged_attention = &cpu::avx512::paged_attention;
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c")) {
    g_isa = "avx2";
    g_paged_attention = &cpu::avx2::paged_attention;
  }
#endif
}

struct CpuBackend {  // the stream argument is for the CUDA module's sake
  static void paged_attention(const PagedAttentionParams& p, uintptr_t) { g_paged_attention(p); }
  static void write_kv(const WriteKVParams& p, uintptr_t) { cpu::write_kv(p); }
  static void copy_blocks(const CopyBlocksParams& p, uintptr_t) { cpu::copy_blocks(p); }
  static void stop_score(const StopScoreParams& p, uintptr_t) { cpu::stop_score(p); }
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
    else { throw std::invalid_argument("isa must be one this build has: generic, avx2, avx512; got " + isa); }
    g_isa = isa;
  }, py::arg("isa"), "Force one instruction-set build (tests; must be supported by the processor).");
  m.def("num_threads", [] { return omp_get_max_threads(); });
  m.def("set_num_threads", [](int n) {
    STOPKIT_CHECK(n >= 1, "num_threads must be >= 1");
    omp_set_num_threads(n);
  }, py::arg("n"));
  define_ops<CpuBackend>(m);
}
