#pragma once
// NCCL across the ranks of mpirun, one GPU each, as nccl-tests runs on a cluster: the first rank
// makes an NCCL unique id and sends it over the transport, every rank joins one communicator,
// and each collective is timed on every rank at every size; rank 0 averages the ranks' times
// (nccl-tests' default, -a 1), takes the median over samples, and reports the
// nccl.ranks.<collective> results with algbw and busbw for the whole communicator. The GPU
// calls are an interface (RankNcclCalls), so that the orchestration is tested with a fake.
#include <cstddef>
#include <functional>
#include <string>
#include <vector>

#include "dpart/profile/gpu.hpp"
#include "dpart/runtime/transport.hpp"

namespace dpart::profile {

/// What one rank does: why it cannot take part ("" when it can), a new unique id (the first
/// rank's), and its per-count, per-sample seconds of a collective as rank `rank` of `ranks`.
struct RankNcclCalls {
    std::function<std::string()> unavailable;
    std::function<std::string()> unique_id;
    std::function<std::vector<std::vector<double>>(Collective c, const std::string& unique_id, int ranks, int rank,
                                                   const std::vector<std::size_t>& counts)>
        times;
    std::function<std::string()> version;
};
/// The GPU's: this process's first GPU (settings' share of them), gpu::nccl_rank_times.
[[nodiscard]] RankNcclCalls gpu_rank_nccl(const ProbeSettings& settings);

/// Collective over every rank of `t`. All four collectives, 8 B to `max_bytes`. When a rank
/// cannot take part, every rank learns it first (a vote) and nothing runs: the results are
/// waived, naming the first such rank and its reason. Returns the results on rank 0 (with one
/// rank: none), nothing on the others.
[[nodiscard]] std::vector<ProbeResult> measure_rank_collectives(rt::Transport& t, const RankNcclCalls& calls,
                                                                std::size_t max_bytes);

}  // namespace dpart::profile
