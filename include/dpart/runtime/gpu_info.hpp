#pragma once
// What GPU software the binary was built with, and what it finds at run time. Implemented in
// runtime/cuda/ when dpart is built with CUDA, and by a CPU-only stub otherwise.
#include <string>

namespace dpart {

struct GpuSoftware {
    bool built_with_cuda = false;
    std::string cuda;           ///< CUDA runtime version compiled against, e.g. "13.0"
    std::string cublas;         ///< cuBLAS headers
    std::string nccl;           ///< NCCL headers
    std::string cudnn;          ///< cuDNN headers
    std::string nccl_loaded;    ///< the NCCL library found at run time
    std::string cudnn_loaded;   ///< the cuDNN library found at run time
    std::string driver;         ///< CUDA version the driver supports, or why there is none
    int devices = 0;            ///< CUDA devices visible now
};

[[nodiscard]] GpuSoftware gpu_software();

}  // namespace dpart
