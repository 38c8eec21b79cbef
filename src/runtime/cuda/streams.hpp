#pragma once
// The GPU and stream behind a DeviceOps made by CudaDevices, for code of runtime/cuda that
// enqueues its own work in order with a worker's compute (NCCL's transfers).
#include <cuda_runtime.h>

#include "dpart/runtime/device.hpp"

namespace dpart::rt::cuda {

struct OpsStream {
    int device = 0;
    cudaStream_t stream = nullptr;
};
/// Throws RuntimeError for a DeviceOps that is not CUDA's.
[[nodiscard]] OpsStream stream_of(DeviceOps& ops);

}  // namespace dpart::rt::cuda
