// The CUDA backend's entry points in a build without CUDA: a clear refusal.
#include "dpart/core/error.hpp"
#include "dpart/runtime/cuda_backend.hpp"
#include "dpart/runtime/device_comm.hpp"

namespace dpart::rt {

struct CudaDevices::Impl {};

CudaDevices::CudaDevices(const Cluster&) {
    throw RuntimeError("this dpart was built without CUDA (no nvcc when it was configured, or -DDPART_WITH_CUDA=OFF): "
                       "--backend cuda is not available; use --backend cpu");
}
CudaDevices::~CudaDevices() = default;
std::unique_ptr<DeviceOps> CudaDevices::ops(std::size_t, bool, std::chrono::milliseconds) { return nullptr; }
std::string CudaDevices::describe(std::size_t) const { return {}; }
std::optional<std::uint64_t> CudaDevices::memory_domain(std::size_t) const { return std::nullopt; }
std::unique_ptr<CommLibrary> make_nccl_library(std::chrono::milliseconds) {
    throw RuntimeError("this dpart was built without CUDA: NCCL is not available (--device-comm host rehearses it)");
}
std::unique_ptr<DeviceOps> make_gpu_ops(int, bool) {
    throw RuntimeError("this dpart was built without CUDA: no GPU can run the device layers");
}
bool built_with_cuda_backend() noexcept { return false; }

}  // namespace dpart::rt
