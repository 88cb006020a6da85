// pybind11 module stopkit._C: the CPU ops. Every pointer arrives as an integer address (0 = none);
// stopkit/ops.py validates shapes, dtypes and strides before calling, the kernels re-check indices.
#include <pybind11/pybind11.h>
#include <omp.h>

#include <string>

#include "stopkit/cpu/kernels.h"

namespace py = pybind11;
using namespace stopkit;

namespace {

template <typename T>
T* ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }

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
  m.def("debug_checks", [] {
#ifdef STOPKIT_DEBUG_CHECKS
    return true;
#else
    return false;
#endif
  });

  m.def("paged_attention",
        [](uintptr_t out, uintptr_t lse, uintptr_t q, uintptr_t k_cache, uintptr_t v_cache,
           uintptr_t block_table, uintptr_t seq_lens, uintptr_t suffix_k, uintptr_t suffix_v,
           uintptr_t sinks, int64_t batch, int64_t q_len, int64_t num_heads, int64_t num_kv_heads,
           int64_t head_dim, int64_t block_size, int64_t num_blocks, int64_t max_blocks_per_row,
           double scale, int64_t window, int64_t dtype) {
          PagedAttentionParams p{ptr<void>(out), ptr<float>(lse), ptr<const void>(q),
                                 ptr<const void>(k_cache), ptr<const void>(v_cache),
                                 ptr<const int32_t>(block_table), ptr<const int32_t>(seq_lens),
                                 ptr<const void>(suffix_k), ptr<const void>(suffix_v),
                                 ptr<const float>(sinks), batch, q_len, num_heads, num_kv_heads,
                                 head_dim, block_size, num_blocks, max_blocks_per_row,
                                 static_cast<float>(scale), window, dtype_from_code(dtype)};
          py::gil_scoped_release release;
          g_paged_attention(p);
        },
        py::arg("out"), py::arg("lse"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("block_table"), py::arg("seq_lens"), py::arg("suffix_k"), py::arg("suffix_v"),
        py::arg("sinks"), py::arg("batch"), py::arg("q_len"), py::arg("num_heads"),
        py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("block_size"), py::arg("num_blocks"),
        py::arg("max_blocks_per_row"), py::arg("scale"), py::arg("window"), py::arg("dtype"));

  m.def("write_kv",
        [](uintptr_t k, uintptr_t v, uintptr_t k_cache, uintptr_t v_cache, uintptr_t slot_mapping,
           int64_t num_tokens, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
           int64_t num_blocks, int64_t dtype) {
          WriteKVParams p{ptr<const void>(k), ptr<const void>(v), ptr<void>(k_cache),
                          ptr<void>(v_cache), ptr<const int64_t>(slot_mapping), num_tokens,
                          num_kv_heads, head_dim, block_size, num_blocks, dtype_from_code(dtype)};
          py::gil_scoped_release release;
          cpu::write_kv(p);
        },
        py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slot_mapping"),
        py::arg("num_tokens"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("block_size"),
        py::arg("num_blocks"), py::arg("dtype"));

  m.def("copy_blocks",
        [](uintptr_t cache, uintptr_t src, uintptr_t dst, int64_t num_pairs, int64_t num_planes,
           int64_t num_blocks, int64_t block_bytes) {
          CopyBlocksParams p{ptr<void>(cache), ptr<const int64_t>(src), ptr<const int64_t>(dst),
                             num_pairs, num_planes, num_blocks, block_bytes};
          py::gil_scoped_release release;
          cpu::copy_blocks(p);
        },
        py::arg("cache"), py::arg("src"), py::arg("dst"), py::arg("num_pairs"),
        py::arg("num_planes"), py::arg("num_blocks"), py::arg("block_bytes"));

  m.def("stop_score",
        [](uintptr_t out, uintptr_t hidden, uintptr_t norm_weight, uintptr_t hidden_weight,
           uintptr_t hidden_bias, uintptr_t head_weight, uintptr_t head_bias, int64_t batch,
           int64_t dim, int64_t hidden_dim, double eps, int64_t activation, int64_t hidden_dtype,
           int64_t weight_dtype) {
          STOPKIT_CHECK(activation >= 0 && activation <= 4, "activation code must be in 0..4");
          StopScoreParams p{ptr<float>(out), ptr<const void>(hidden), ptr<const void>(norm_weight),
                            ptr<const void>(hidden_weight), ptr<const void>(hidden_bias),
                            ptr<const void>(head_weight), ptr<const void>(head_bias), batch, dim,
                            hidden_dim, static_cast<float>(eps),
                            static_cast<Activation>(activation), dtype_from_code(hidden_dtype),
                            dtype_from_code(weight_dtype)};
          py::gil_scoped_release release;
          cpu::stop_score(p);
        },
        py::arg("out"), py::arg("hidden"), py::arg("norm_weight"), py::arg("hidden_weight"),
        py::arg("hidden_bias"), py::arg("head_weight"), py::arg("head_bias"), py::arg("batch"),
        py::arg("dim"), py::arg("hidden_dim"), py::arg("eps"), py::arg("activation"),
        py::arg("hidden_dtype"), py::arg("weight_dtype"));
}
