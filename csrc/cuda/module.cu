// pybind11 module stopkit._C_cuda: the CUDA ops, bound by stopkit/bindings.h with the same
// signatures as stopkit._C. Calls launch asynchronously on the given device and stream (a
// cudaStream_t address, 0 = the legacy default stream).
#include <pybind11/pybind11.h>

#include <mutex>

#include "stopkit/bindings.h"
#include "stopkit/cuda/common.cuh"
#include "stopkit/cuda/kernels.cuh"

namespace py = pybind11;
using namespace stopkit;

namespace stopkit::cuda {

const DeviceInfo& device_info(int device) {
  static std::once_flag once[kMaxDevices];
  static DeviceInfo infos[kMaxDevices];
  if (device < 0 || device >= kMaxDevices) {
    throw std::invalid_argument("stopkit CUDA: device must be in 0.." +
                                std::to_string(kMaxDevices - 1) + ", got " +
                                std::to_string(device));
  }
  // An invalid device throws here, and call_once leaves the flag unset.
  std::call_once(once[device], [device] {
    DeviceInfo info{};
    check(cudaDeviceGetAttribute(&info.num_sms, cudaDevAttrMultiProcessorCount, device),
          "cudaDeviceGetAttribute(MultiProcessorCount)");
    check(cudaDeviceGetAttribute(&info.max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                 device),
          "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
    infos[device] = info;
  });
  return infos[device];
}

}  // namespace stopkit::cuda

namespace {

struct CudaBackend {
  static void paged_attention(const PagedAttentionParams& p, const CallContext& c) {
    cuda::paged_attention(p, c);
  }
  static void write_kv(const WriteKVParams& p, const CallContext& c) { cuda::write_kv(p, c); }
  static void copy_blocks(const CopyBlocksParams& p, const CallContext& c) {
    cuda::copy_blocks(p, c);
  }
  static void stop_score(const StopScoreParams& p, const CallContext& c) { cuda::stop_score(p, c); }
};

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() =
      "stopkit CUDA kernels (framework-agnostic; raw device pointers, explicit device and stream)";

  m.def("set_num_splits", &cuda::set_num_splits, py::arg("n"),
        "paged_attention context splits: 0 = automatic, n >= 1 forces n (at most 64; tests).");
  m.def("num_splits", &cuda::get_num_splits, "The forced split count (0 = automatic).");
  m.def("set_smem_limit", &cuda::set_smem_limit, py::arg("bytes"),
        "Shared memory per block that launch plans assume: 0 = the device's opt-in limit, else at "
        "most `bytes` (runs a smaller GPU's plans; tests).");
  m.def("smem_limit", &cuda::get_smem_limit, "The forced shared-memory limit (0 = the device's).");
  m.def("device_properties", [](int device) {
    const cuda::DeviceInfo& info = cuda::device_info(device);
    py::dict d;
    d["num_sms"] = info.num_sms;
    d["max_smem_per_block_optin"] = info.max_smem_optin;
    return d;
  }, py::arg("device") = 0, "Multiprocessor count and opt-in shared memory per block.");
  m.def("paged_attention_occupancy",
        [](int64_t dtype, int64_t head_dim, int64_t rows, int device) {
    py::gil_scoped_release release;
    return cuda::paged_attention_occupancy(dtype_from_code(dtype), head_dim, rows, device);
  }, py::arg("dtype"), py::arg("head_dim"), py::arg("rows"), py::arg("device"),
        "Blocks per multiprocessor that the CUDA runtime reports for the planned kernel (tests).");
  m.def("paged_attention_workspace_bytes",
        [](int64_t batch, int64_t q_len, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
           int64_t block_size, int64_t max_blocks_per_row, int64_t window, int64_t dtype,
           int64_t max_seq_len, int device) {
    PagedAttentionParams p{};
    p.batch = batch;
    p.q_len = q_len;
    p.num_heads = num_heads;
    p.num_kv_heads = num_kv_heads;
    p.head_dim = head_dim;
    p.block_size = block_size;
    p.max_blocks_per_row = max_blocks_per_row;
    p.window = window;
    p.dtype = dtype_from_code(dtype);
    p.max_seq_len = max_seq_len;
    py::gil_scoped_release release;
    return cuda::paged_attention_workspace_bytes(p, device);
  },
        py::arg("batch"), py::arg("q_len"), py::arg("num_heads"), py::arg("num_kv_heads"),
        py::arg("head_dim"), py::arg("block_size"), py::arg("max_blocks_per_row"),
        py::arg("window"), py::arg("dtype"), py::arg("max_seq_len"), py::arg("device"),
        "Bytes of float32 workspace paged_attention needs for these arguments (0: one split).");
  m.def("stop_score_workspace_bytes", &cuda::stop_score_workspace_bytes, py::arg("batch"),
        py::arg("hidden_dim"), "Bytes of workspace stop_score needs (0: none).");

  define_ops<CudaBackend>(m);
}
