// Built without CUDA: there is no GPU software to report.
#include "dpart/runtime/gpu_info.hpp"

namespace dpart {

GpuSoftware gpu_software() {
    GpuSoftware s;
    s.driver = "not used (built without CUDA)";
    return s;
}

}  // namespace dpart
