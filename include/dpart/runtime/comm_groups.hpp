#pragma once
// The communicators a plan needs between GPU workers, and how they are bootstrapped and shrunk
// (CPU-side logic, no NCCL headers). runtime/cuda creates one NCCL communicator per group from a
// unique id that the group's first rank makes and shares over the bootstrap Transport (MPI
// under mpirun, as nccl-tests does; in-process queues in tests), and calls ncclCommShrink with
// the exclusion list computed here when a device fails.
#include <cstddef>
#include <functional>
#include <span>
#include <vector>

#include "dpart/plan/plan.hpp"
#include "dpart/runtime/transport.hpp"

namespace dpart::rt {

/// Groups of worker ranks (executor numbering: stage, then replica, then tensor-parallel rank),
/// each in rank order.
struct CommGroups {
    /// Per (stage, tp rank) with more than one replica: the replicas that all-reduce gradients.
    std::vector<std::vector<std::size_t>> data_parallel;
    /// Per (stage, replica) with tp > 1: the tensor-parallel group.
    std::vector<std::vector<std::size_t>> tensor_parallel;
    /// Per pair of neighbouring stages (s, s+1) with any worker pair exchanging activations:
    /// every worker of both stages (activations go from any replica of s to any of s+1).
    std::vector<std::vector<std::size_t>> pipeline;
};
[[nodiscard]] CommGroups comm_groups(const Plan& plan);

/// Every rank of `group` (the caller included, group[0] the root) gets the bytes the root's
/// `make` returns: the root calls it and sends the result to the others. An NCCL unique id goes
/// through this before ncclCommInitRank.
[[nodiscard]] Bytes share_from_root(Transport& t, std::span<const std::size_t> group, const Tag& tag,
                                    const std::function<Bytes()>& make);

/// A communicator of `size` ranks after `failed` leave: the exclusion list ncclCommShrink takes
/// (sorted, without duplicates) and each old rank's new rank (-1 for those that left).
struct Shrink {
    std::vector<int> excluded;
    std::vector<int> new_rank;
};
/// Throws InputError when a failed rank is not below `size` or every rank would leave.
[[nodiscard]] Shrink shrink_ranks(std::size_t size, std::span<const std::size_t> failed);

}  // namespace dpart::rt
