// Built without CUDA: no GPU can be measured, and every gpu.* and nccl.* probe is waived with
// the reason unavailable() gives.
#include <stdexcept>

#include "dpart/profile/gpu_measure.hpp"

namespace dpart::profile::gpu {
namespace {
[[noreturn]] void refuse() { throw std::runtime_error("this dpart was built without CUDA"); }
}  // namespace

std::string unavailable() { return "this dpart was built without CUDA"; }
int device_count() { return 0; }
DeviceFacts device_facts(int) { refuse(); }
std::vector<double> gemm_times(int, GemmType, int, const Timing&) { refuse(); }
ConvTimes conv_times(int, const ConvShape&, const Timing&) { refuse(); }
std::vector<double> copy_times(CopyKind, int, int, std::size_t, const Timing&) { refuse(); }
std::vector<double> copy_latencies(CopyKind, int, int, std::size_t, const Timing&) { refuse(); }
bool can_access_peer(int, int) { return false; }
NcclTimes nccl_times(Collective, const std::vector<int>&, const std::vector<std::size_t>&, const Timing&) { refuse(); }
std::string nccl_unique_id() { refuse(); }
NcclTimes nccl_rank_times(Collective, const std::string&, int, int, int, const std::vector<std::size_t>&, const Timing&) {
    refuse();
}

}  // namespace dpart::profile::gpu
