#include <fmt/format.h>

#include "commands.hpp"
#include "dpart/core/version.hpp"
#include "dpart/runtime/gpu_info.hpp"

namespace dpart::cli {

std::string version_text() {
    const GpuSoftware gpu = gpu_software();
    std::string text = fmt::format("dpart {} (git {}), file schema {}\n", version, git_revision(), schema_version);
    if (gpu.built_with_cuda) {
        text += fmt::format("built with CUDA {}, cuBLAS {}, NCCL {}, cuDNN {}\n", gpu.cuda, gpu.cublas, gpu.nccl, gpu.cudnn);
        text += fmt::format("loaded NCCL {}, cuDNN {}; CUDA driver: {}; GPUs visible: {}", gpu.nccl_loaded,
                            gpu.cudnn_loaded, gpu.driver, gpu.devices);
    } else {
        text += "built without CUDA, NCCL and cuDNN (CPU only)";
    }
    return text;
}

}  // namespace dpart::cli
