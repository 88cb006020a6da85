// pybind11 module stopkit._C_cuda: the CUDA ops, bound by stopkit/bindings.h with the same
// signatures as stopkit._C. Calls launch asynchronously on `stream` (a cudaStream_t address, 0 =
// the legacy default stream).
#include <pybind11/pybind11.h>

#include <memory>
#include <mutex>
#include <vector>

#include "stopkit/bindings.h"
#include "stopkit/cuda/common.cuh"
#include "stopkit/cuda/kernels.cuh"

namespace py = pybind11;
using namespace stopkit;

namespace stopkit::cuda {

const DeviceInfo& device_info(int device) {
  static std::mutex mu;
  static std::vector<std::unique_ptr<DeviceInfo>> infos;
  std::lock_guard<std::mutex> lock(mu);
  if (device >= 0 && device < static_cast<int>(infos.size()) && infos[device]) return *infos[device];
  DeviceInfo info{};  // an invalid device fails here, before anything is stored
  check(cudaDeviceGetAttribute(&info.num_sms, cudaDevAttrMultiProcessorCount, device),
        "cudaDeviceGetAttribute(MultiProcessorCount)");
  check(cudaDeviceGetAttribute(&info.max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
        "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  if (device >= static_cast<int>(infos.size())) infos.resize(device + 1);
  infos[device] = std::make_unique<DeviceInfo>(info);
  return *infos[device];
}

}  // namespace stopkit::cuda

namespace {

struct CudaBackend {
  static void paged_attention(const PagedAttentionParams& p, uintptr_t stream) {
    cuda::paged_attention(p, cuda::to_stream(stream));
  }
  static void write_kv(const WriteKVParams& p, uintptr_t stream) { cuda::write_kv(p, cuda::to_stream(stream)); }
  static void copy_blocks(const CopyBlocksParams& p, uintptr_t stream) {
    cuda::copy_blocks(p, cuda::to_stream(stream));
  }
  static void stop_score(const StopScoreParams& p, uintptr_t stream) { cuda::stop_score(p, cuda::to_stream(stream)); }
};

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "stopkit CUDA kernels (framework-agnostic; raw device pointers, explicit stream)";

  m.def("set_num_splits", &cuda::set_num_splits, py::arg("n"),
        "paged_attention context splits: 0 = automatic, n >= 1 forces n (at most 64; tests).");
  m.def("num_splits", &cuda::get_num_splits, "The forced split count (0 = automatic).");
  m.def("device_properties", [](int device) {
    const cuda::DeviceInfo& info = cuda::device_info(device);
    py::dict d;
    d["num_sms"] = info.num_sms;
    d["max_smem_per_block_optin"] = info.max_smem_optin;
    return d;
  }, py::arg("device") = 0, "Multiprocessor count and opt-in shared memory per block.");

  define_ops<CudaBackend>(m);
}
