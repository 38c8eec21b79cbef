// The registry: every probe this build has.
#include <fmt/format.h>

#include "dpart/profile/probe.hpp"
#include "dpart/runtime/gpu_info.hpp"

namespace dpart::profile {

std::vector<Probe> all_probes(const ProbeSettings& settings) {
    std::vector<Probe> probes = cpu_probes(settings);
    probes.push_back({"gpu.facts", "CUDA driver and library versions, and the GPUs visible", [] {
                          const GpuSoftware g = gpu_software();
                          if (!g.built_with_cuda) throw Waived{"this dpart was built without CUDA"};
                          if (g.devices == 0) throw Waived{fmt::format("no CUDA device visible ({})", g.driver)};
                          ProbeResult r;
                          r.text = fmt::format("CUDA {}, cuBLAS {}, NCCL {}, cuDNN {}, driver {}", g.cuda, g.cublas,
                                               g.nccl_loaded, g.cudnn_loaded, g.driver);
                          r.figures = {{"devices", static_cast<double>(g.devices), "GPUs"}};
                          return r;
                      }});
    return probes;
}

}  // namespace dpart::profile
