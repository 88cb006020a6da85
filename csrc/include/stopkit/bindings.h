// The Python signatures of stopkit's native ops, shared by stopkit._C (CPU) and stopkit._C_cuda:
// define_ops<Backend>(m) binds paged_attention, write_kv, copy_blocks and stop_score with the same
// keyword names in both modules. Pointers arrive as integer addresses (0 = none); the trailing
// `stream`, `device` and `workspace` / `workspace_bytes` make a CallContext (the CPU backend
// ignores it). stopkit/ops.py validates every tensor first; calls release the GIL. Both modules
// also bind the CUDA launch plan (stopkit/cuda/launch_plan.h: plain C++, testable without a GPU).
//
// Backend: a struct with static paged_attention / write_kv / copy_blocks / stop_score taking the
// op's params struct and the CallContext.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <iterator>
#include <string>

#include "stopkit/cuda/launch_plan.h"
#include "stopkit/params.h"

namespace stopkit {

namespace detail {
template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}
}  // namespace detail

template <typename Backend>
void define_ops(pybind11::module_& m) {
  namespace py = pybind11;
  using detail::ptr;

  m.def("paged_attention",
        [](uintptr_t out, uintptr_t lse, uintptr_t q, uintptr_t k_cache, uintptr_t v_cache,
           uintptr_t block_table, uintptr_t seq_lens, uintptr_t suffix_k, uintptr_t suffix_v,
           uintptr_t sinks, int64_t batch, int64_t q_len, int64_t num_heads, int64_t num_kv_heads,
           int64_t head_dim, int64_t block_size, int64_t num_blocks, int64_t max_blocks_per_row,
           double scale, int64_t window, int64_t dtype, int64_t max_seq_len, uintptr_t stream,
           int device, uintptr_t workspace, int64_t workspace_bytes) {
    PagedAttentionParams p{ptr<void>(out),
                           ptr<float>(lse),
                           ptr<const void>(q),
                           ptr<const void>(k_cache),
                           ptr<const void>(v_cache),
                           ptr<const int32_t>(block_table),
                           ptr<const int32_t>(seq_lens),
                           ptr<const void>(suffix_k),
                           ptr<const void>(suffix_v),
                           ptr<const float>(sinks),
                           batch,
                           q_len,
                           num_heads,
                           num_kv_heads,
                           head_dim,
                           block_size,
                           num_blocks,
                           max_blocks_per_row,
                           static_cast<float>(scale),
                           window,
                           dtype_from_code(dtype),
                           max_seq_len};
    py::gil_scoped_release release;
    Backend::paged_attention(p, CallContext{stream, device, workspace, workspace_bytes});
  },
        py::arg("out"), py::arg("lse"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("block_table"), py::arg("seq_lens"), py::arg("suffix_k"), py::arg("suffix_v"),
        py::arg("sinks"), py::arg("batch"), py::arg("q_len"), py::arg("num_heads"),
        py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("block_size"), py::arg("num_blocks"),
        py::arg("max_blocks_per_row"), py::arg("scale"), py::arg("window"), py::arg("dtype"),
        py::arg("max_seq_len") = -1, py::arg("stream") = 0, py::arg("device") = -1,
        py::arg("workspace") = 0, py::arg("workspace_bytes") = 0);

  m.def("write_kv",
        [](uintptr_t k, uintptr_t v, uintptr_t k_cache, uintptr_t v_cache, uintptr_t slot_mapping,
           int64_t num_tokens, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
           int64_t num_blocks, int64_t dtype, uintptr_t stream, int device) {
    WriteKVParams p{ptr<const void>(k),
                    ptr<const void>(v),
                    ptr<void>(k_cache),
                    ptr<void>(v_cache),
                    ptr<const int64_t>(slot_mapping),
                    num_tokens,
                    num_kv_heads,
                    head_dim,
                    block_size,
                    num_blocks,
                    dtype_from_code(dtype)};
    py::gil_scoped_release release;
    Backend::write_kv(p, CallContext{stream, device});
  },
        py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slot_mapping"),
        py::arg("num_tokens"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("block_size"),
        py::arg("num_blocks"), py::arg("dtype"), py::arg("stream") = 0, py::arg("device") = -1);

  m.def("copy_blocks",
        [](uintptr_t cache, uintptr_t src, uintptr_t dst, int64_t num_pairs, int64_t num_planes,
           int64_t num_blocks, int64_t block_bytes, uintptr_t stream, int device) {
    CopyBlocksParams p{ptr<void>(cache),
                       ptr<const int64_t>(src),
                       ptr<const int64_t>(dst),
                       num_pairs,
                       num_planes,
                       num_blocks,
                       block_bytes};
    py::gil_scoped_release release;
    Backend::copy_blocks(p, CallContext{stream, device});
  },
        py::arg("cache"), py::arg("src"), py::arg("dst"), py::arg("num_pairs"),
        py::arg("num_planes"), py::arg("num_blocks"), py::arg("block_bytes"), py::arg("stream") = 0,
        py::arg("device") = -1);

  m.def("stop_score",
        [](uintptr_t out, uintptr_t hidden, uintptr_t norm_weight, uintptr_t hidden_weight,
           uintptr_t hidden_bias, uintptr_t head_weight, uintptr_t head_bias, int64_t batch,
           int64_t dim, int64_t hidden_dim, double eps, int64_t activation, int64_t hidden_dtype,
           int64_t weight_dtype, uintptr_t stream, int device, uintptr_t workspace,
           int64_t workspace_bytes) {
    STOPKIT_CHECK(
        activation >= 0 && activation < static_cast<int64_t>(std::size(kActivationNames)),
        "activation code must be in 0.." + std::to_string(std::size(kActivationNames) - 1));
    StopScoreParams p{ptr<float>(out),
                      ptr<const void>(hidden),
                      ptr<const void>(norm_weight),
                      ptr<const void>(hidden_weight),
                      ptr<const void>(hidden_bias),
                      ptr<const void>(head_weight),
                      ptr<const void>(head_bias),
                      batch,
                      dim,
                      hidden_dim,
                      static_cast<float>(eps),
                      static_cast<Activation>(activation),
                      dtype_from_code(hidden_dtype),
                      dtype_from_code(weight_dtype)};
    py::gil_scoped_release release;
    Backend::stop_score(p, CallContext{stream, device, workspace, workspace_bytes});
  },
        py::arg("out"), py::arg("hidden"), py::arg("norm_weight"), py::arg("hidden_weight"),
        py::arg("hidden_bias"), py::arg("head_weight"), py::arg("head_bias"), py::arg("batch"),
        py::arg("dim"), py::arg("hidden_dim"), py::arg("eps"), py::arg("activation"),
        py::arg("hidden_dtype"), py::arg("weight_dtype"), py::arg("stream") = 0,
        py::arg("device") = -1, py::arg("workspace") = 0, py::arg("workspace_bytes") = 0);

  m.def("cuda_launch_plan",
        [](int elem_bytes, int64_t head_dim, int64_t rows, int64_t max_shared_memory) {
    STOPKIT_CHECK(elem_bytes == 2 || elem_bytes == 4,
                  "cuda_launch_plan: elem_bytes must be 2 or 4");
    STOPKIT_CHECK(head_dim >= 1 && head_dim <= 256, "cuda_launch_plan: head_dim must be in 1..256");
    STOPKIT_CHECK(rows >= 1, "cuda_launch_plan: rows must be >= 1");
    const cuda::AttentionPlan plan =
        cuda::plan_paged_attention(elem_bytes, head_dim, rows, max_shared_memory);
    py::dict d;
    d["stages"] = plan.stages;
    d["smem_bytes"] = plan.smem_bytes;
    d["blocks_per_sm"] = plan.blocks_per_sm;
    d["keys_per_stage"] = plan.keys_per_stage;
    d["query_rows"] = 16 * plan.query_slices;
    d["head_dim_bucket"] = plan.dmax;
    d["threads"] = cuda::kThreads;
    return d;
  }, py::arg("elem_bytes"), py::arg("head_dim"), py::arg("rows"), py::arg("max_shared_memory"),
        "The CUDA paged-attention kernel's launch plan (stopkit/cuda/launch_plan.h); blocks_per_sm "
        "is 0 when nothing fits.");
  m.def("cuda_num_splits", &cuda::num_splits, py::arg("blocks"), py::arg("max_keys"),
        py::arg("num_sms"), py::arg("blocks_per_sm"),
        "Context splits of the CUDA paged-attention kernel for `blocks` blocks per split.");

  m.def("dtype_codes", [] {
    py::dict codes;
    for (size_t i = 0; i < std::size(kDTypeNames); ++i) codes[kDTypeNames[i]] = i;
    return codes;
  }, "The ops' dtype argument: {torch dtype name: code}.");
  m.def("activation_codes", [] {
    py::dict codes;
    for (size_t i = 0; i < std::size(kActivationNames); ++i) codes[kActivationNames[i]] = i;
    return codes;
  }, "stop_score's activation argument: {name: code}.");

  m.def("debug_checks", [] {
#ifdef STOPKIT_DEBUG_CHECKS
    return true;
#else
    return false;
#endif
  }, "Whether the kernels were built with full index checks (STOPKIT_DEBUG=1).");
}

}  // namespace stopkit
