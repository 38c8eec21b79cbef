#pragma once
// What a plan costs: every stage's times and memory, and the iteration's exact makespan from the
// schedule's task graph. The solver's objective, `dpart plan`'s report, and the predictions that
// `replay` and `run` compare against all come from here.
#include <cstdint>
#include <vector>

#include "dpart/cost/cost_model.hpp"
#include "dpart/plan/plan.hpp"
#include "dpart/sim/schedule.hpp"

namespace dpart {

/// Bytes crossing each cut: cut_bytes[k] is the per-sample size of the activations produced by
/// layers before k and read by layer k or later (k = 0 and k = L carry nothing).
[[nodiscard]] std::vector<std::uint64_t> cut_bytes(const Model& model);

/// What stage memory needs of the whole model, computed once per model.
struct ModelCuts {
    std::vector<std::uint64_t> cuts;  ///< cut_bytes
    /// Per layer k, the per-sample bytes of gradients waiting while k runs backward: those of the
    /// tensors made before k that a later layer reads (cuts[k + 1], less k's own output, which
    /// is k's dY): a residual branch's gradient, held until its producer's backward.
    std::vector<std::uint64_t> pending;
};
[[nodiscard]] ModelCuts model_cuts(const Model& model);

/// A microbatch of `samples` shared among replicas in proportion to their speeds (largest
/// remainder, ties to the earlier replica). Every share is at least 1; empty when samples <
/// replicas.
[[nodiscard]] std::vector<std::uint64_t> replica_shares(std::uint64_t samples, const std::vector<double>& speeds);

/// Per-device memory of a stage's replica with `share` samples per microbatch.
struct StageMemoryInput {
    std::size_t first_layer = 0, last_layer = 0;
    std::uint32_t tp = 1;
    std::size_t replicas = 1;
    std::uint64_t share = 1;
    std::uint64_t in_flight = 1;  ///< microbatches whose activations the stage keeps
};
struct StageMemory {
    std::uint64_t params = 0;       ///< parameters held per device (tensor-parallel shard, tied copies)
    std::uint64_t state_bytes = 0;  ///< weights, gradients and optimizer state
    std::uint64_t activation_bytes = 0;  ///< saved for the microbatches in flight
    std::uint64_t workspace_bytes = 0;   ///< the largest layer workspace, for one replica's share
    [[nodiscard]] std::uint64_t total() const noexcept { return state_bytes + activation_bytes + workspace_bytes; }
};
/// `cuts`: the model's model_cuts when the caller has them (else computed here).
[[nodiscard]] StageMemory stage_memory(const Model& model, const StageMemoryInput& in, const CostOptions& options,
                                       const ModelCuts* cuts = nullptr);

/// Microbatches a stage keeps in flight: 1F1B stage s of S keeps min(S - s, M); GPipe all M.
[[nodiscard]] std::uint64_t in_flight(ScheduleKind schedule, std::size_t stage, std::size_t stages,
                                      std::uint64_t microbatches) noexcept;

/// Seconds of one forward and one backward pass of layers [first, last] for `samples` samples on
/// `device`, split `tp` ways; a recomputing backward runs the forward again first.
struct PassSeconds {
    double forward = 0, backward = 0;
};
[[nodiscard]] PassSeconds pass_seconds(const CostModel& cost, std::size_t first, std::size_t last, std::size_t device,
                                       std::uint64_t samples, std::uint32_t tp, bool recompute);

struct StageEstimate {
    double forward_s = 0;          ///< per microbatch, slowest replica
    double backward_s = 0;
    double send_activation_s = 0;  ///< to the next stage
    double send_gradient_s = 0;    ///< to the previous stage
    double allreduce_s = 0;        ///< per iteration
    double optimizer_s = 0;        ///< per iteration
    bool sharded_optimizer = false;  ///< ZeRO-1 across this stage's replicas (--shard-optimizer, replicas > 1)
    /// Per microbatch: forward + backward + both sends + (all-reduce + optimizer) / M. The
    /// pipeline's bottleneck is the largest of these.
    double stage_s = 0;
    std::vector<std::uint64_t> shares;  ///< samples per replica per microbatch
    /// The links its sends use when they share one with another stage's transfers (the
    /// schedule's link ids), else private_link.
    std::uint32_t activation_link = private_link;
    std::uint32_t gradient_link = private_link;
    std::vector<double> replica_forward_s;   ///< per replica (its slowest device), per microbatch
    std::vector<double> replica_backward_s;
    StageMemory memory;                 ///< the fullest device's
    std::uint64_t capacity_bytes = 0;   ///< the smallest device's memory
    double flops_per_iteration = 0;     ///< forward + backward, all replicas
};

struct PlanEstimate {
    std::vector<StageEstimate> stages;
    double iteration_s = 0;  ///< exact makespan of the schedule's task graph
    double bottleneck_s = 0;
    std::size_t bottleneck_stage = 0;
    double samples_per_s = 0;
    double bubble_fraction = 0;  ///< share of stage-time not spent in forward or backward
    bool fits = true;            ///< every device's memory holds its stage
    TaskGraph graph;
    Timeline timeline;
};

/// Checks a plan against its model and cluster (layers covered once and in order, devices
/// distinct and existing, tensor-parallel groups inside a node, microbatch_size x microbatches =
/// global batch, at least one sample per replica). Throws InputError at the plan's locations.
void validate_plan(const Plan& plan, const Model& model, const Cluster& cluster);

/// Which sends share a physical link. Transfers between two nodes leave the sending node over
/// its one path to the other node, which carries one transfer at a time: every send from node A
/// to node B (any stage, activations or gradients) uses link (A, B). Inside a node each device
/// pair has its own path (NVLink and PCIe switches are non-blocking). Links used by a single
/// stage's sends in one direction stay private (the schedule already orders them); the others
/// are numbered from 0. Sets the stages' activation_link and gradient_link.
void assign_shared_links(const Plan& plan, const Cluster& cluster, std::vector<StageEstimate>& stages);

/// A memory of the cluster the estimated plan over-fills: a whole device, or one GPU whose
/// green-context partitions share its memory (their capacities pooled, whichever the plan uses).
struct MemoryShortfall {
    std::vector<std::size_t> devices;  ///< the cluster's devices of that memory
    std::uint64_t needed = 0;          ///< the plan's stages' memory on them (each device its stage's fullest)
    std::uint64_t capacity = 0;
};
[[nodiscard]] std::vector<MemoryShortfall> memory_shortfalls(const Plan& plan, const PlanEstimate& estimate,
                                                             const Cluster& cluster);

/// Whether every device of a valid plan holds its stage (memory only: no task graph).
[[nodiscard]] bool plan_fits(const Plan& plan, const Model& model, const Cluster& cluster, const CostModel& cost,
                             const CostOptions& options);

/// Estimates a valid plan.
[[nodiscard]] PlanEstimate estimate_plan(const Plan& plan, const Model& model, const Cluster& cluster,
                                         const CostModel& cost, const CostOptions& options);

}  // namespace dpart
