// CUDA, cuBLAS, NCCL and cuDNN versions: compiled-in (headers) and found at run time.
#include <cublas_api.h>
#include <cuda_runtime.h>
#include <cudnn.h>
#include <nccl.h>

#include <string>

#include "dpart/runtime/gpu_info.hpp"

namespace dpart {
namespace {

std::string cuda_version_string(int v) { return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10); }

}  // namespace

GpuSoftware gpu_software() {
    GpuSoftware s;
    s.built_with_cuda = true;
    s.cuda = cuda_version_string(CUDART_VERSION);
    s.cublas = std::to_string(CUBLAS_VER_MAJOR) + "." + std::to_string(CUBLAS_VER_MINOR) + "." +
               std::to_string(CUBLAS_VER_PATCH);
    s.nccl = std::to_string(NCCL_MAJOR) + "." + std::to_string(NCCL_MINOR) + "." + std::to_string(NCCL_PATCH);
    s.cudnn = std::to_string(CUDNN_MAJOR) + "." + std::to_string(CUDNN_MINOR) + "." + std::to_string(CUDNN_PATCHLEVEL);

    int nccl = 0;
    if (ncclGetVersion(&nccl) == ncclSuccess) {
        // NCCL >= 2.9 encodes major*10000 + minor*100 + patch.
        s.nccl_loaded = std::to_string(nccl / 10000) + "." + std::to_string((nccl % 10000) / 100) + "." +
                        std::to_string(nccl % 100);
    }
    const std::size_t cudnn = cudnnGetVersion();  // major*10000 + minor*100 + patch since cuDNN 9
    s.cudnn_loaded = std::to_string(cudnn / 10000) + "." + std::to_string((cudnn % 10000) / 100) + "." +
                     std::to_string(cudnn % 100);

    int driver = 0;
    if (cudaDriverGetVersion(&driver) == cudaSuccess && driver > 0) {
        s.driver = cuda_version_string(driver);
        int count = 0;  // left unchanged by a failing call
        if (cudaGetDeviceCount(&count) == cudaSuccess) s.devices = count;
        else s.driver += std::string(" (") + cudaGetErrorString(cudaGetLastError()) + ")";
    } else {
        s.driver = "no CUDA driver found";
    }
    return s;
}

}  // namespace dpart
