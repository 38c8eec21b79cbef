#pragma once
// The planner: exact dynamic programming over (layer prefix, device prefix) for the partition
// of a model across a cluster, and the baseline strategies it is compared with.
//
// Search space (docs/METHOD.md): stages are contiguous layer ranges; stage k runs on a
// contiguous block of devices in a device order where each node's devices are consecutive and
// nodes are grouped by kind (every order of the kinds is tried). A block is either an aligned
// power-of-two slice of one node, or whole consecutive nodes (2^a or 3 x 2^a of them). Its devices form r data-parallel
// replicas of a tensor-parallel group of t devices (t a power of two dividing the node size,
// t <= max_tp, r <= max_replicas, r <= microbatch size). Devices after the last stage stay unused.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "dpart/cost/cost_model.hpp"
#include "dpart/plan/estimate.hpp"
#include "dpart/plan/plan.hpp"

namespace dpart {

enum class Strategy { optimal, uniform, parameters, time, data_parallel };
[[nodiscard]] std::string_view to_string(Strategy s) noexcept;

struct SolverOptions {
    Objective objective = Objective::iteration;
    ScheduleKind schedule = ScheduleKind::one_f_one_b;
    std::uint64_t microbatch_size = 0;  ///< 0 = search the divisors of the global batch
    std::uint64_t microbatches = 0;     ///< 0 = follow from microbatch_size
    std::uint64_t max_replicas = 0;     ///< 0 = no limit
    std::uint32_t max_tp = 8;
    Strategy strategy = Strategy::optimal;
    /// Candidates kept by bottleneck bound for the iteration objective, re-ranked by exact makespan.
    std::size_t rerank = 8;
    /// Threads for the DP on large searches (the plan does not depend on it); 0 = one per core
    /// this process may run on.
    std::size_t threads = 1;
};

struct SolveResult {
    Plan plan;
    PlanEstimate estimate;
    /// The value the search minimised for the chosen plan: the bottleneck per sample (throughput)
    /// or the surrogate sum(stage) + (M-1) * max(stage) (iteration; the reported iteration time
    /// is the exact makespan).
    double objective_s = 0;
    /// The least value of the search objective over the whole search space (for the iteration
    /// objective the surrogate's optimum, which the chosen plan need not have: it is chosen by
    /// exact makespan among the best candidates). Equal to objective_s for throughput.
    double search_optimum_s = 0;
    std::size_t plans_evaluated = 0;  ///< stage evaluations by the search
    std::size_t level_runs = 0;       ///< DP runs over 1F1B stage levels (in-flight memory decided)
    std::size_t threaded_runs = 0;    ///< DP runs whose layers' states were shared among threads
    /// False when a search too large for the exact 1F1B memory DP (over 256 MiB of tables) counted
    /// every stage's in-flight microbatches as the first stage's: the plan fits, but a plan that
    /// only fits with the exact count could have been missed.
    bool exact = true;
};

/// Why nothing fits, and what would.
struct Infeasibility {
    std::uint64_t deficit_bytes = 0;  ///< smallest excess of a stage's memory over its device's
    std::vector<std::string> suggestions;
};

/// What the planner searches at most (docs/LIMITS.md). Its time grows faster than the layer
/// count and the device count (4096 layers on 32 devices: about 45 s on one core; gpt2-small on
/// 100,000 devices: about 70 s and 1 GiB; seed-mlp on 1,048,576 devices took 257 s and 5.3 GiB),
/// so a larger request is refused at once rather than searched for hours or out of memory.
inline constexpr std::size_t max_plan_layers = 4096;
inline constexpr std::size_t max_plan_devices = 131072;
inline constexpr std::size_t max_plan_layers_x_devices = std::size_t{1} << 24;

/// Solves for the best plan. Throws InfeasibleError (exit 3) with the smallest memory deficit
/// and suggestions when no plan fits, InputError for contradictory options and for a request
/// beyond max_plan_layers, max_plan_devices or max_plan_layers_x_devices.
[[nodiscard]] SolveResult solve(const Model& model, const Cluster& cluster, const CostModel& cost,
                                const CostOptions& cost_options, const SolverOptions& options);

/// What the objective ranks plans by: the iteration's exact makespan, or for throughput the
/// bottleneck per sample (bottleneck per microbatch / microbatch size: the steady-state time per
/// sample, comparable across microbatch sizes).
[[nodiscard]] double objective_value(Objective objective, const Plan& plan, const PlanEstimate& estimate) noexcept;

/// Whole-node blocks come in node counts of 2^a or 3 x 2^a (1, 2, 3, 4, 6, 8, 12, 16, ...).
[[nodiscard]] bool node_count_allowed(std::size_t nodes) noexcept;

/// The candidate device orders: nodes grouped by kind, every order of the kinds (at most 24;
/// beyond 4 kinds, fastest-first and slowest-first).
[[nodiscard]] std::vector<std::vector<std::size_t>> device_orders(const Cluster& cluster, const CostModel& cost);

/// The microbatch sizes tried: the given one, or every divisor of the global batch.
[[nodiscard]] std::vector<std::uint64_t> microbatch_candidates(std::uint64_t global_batch, const SolverOptions& options);

}  // namespace dpart
