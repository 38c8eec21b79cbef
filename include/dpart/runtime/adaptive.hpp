#pragma once
// `dpart run --adaptive`: a live job that repartitions itself. One agent per device of the
// initial plan (a thread, or an MPI rank) runs the plan in segments of iterations through the
// executor; between segments the agents
//   - report what they measured to a coordinator (the lowest rank alive), which turns it into
//     effective device speeds and takes the same decision as replay's adaptive policy
//     (consider_replan: re-plan, and move when the gain over the remaining iterations exceeds
//     the migration);
//   - migrate: the weights and Adam moments of exactly the layers that change owner move over the
//     transport to their new owners, re-sharded when the tensor-parallel split changes;
//   - every K iterations, keep a snapshot of their state and send a copy to their neighbour in
//     the ring of live agents;
//   - an agent whose device was left out for being slow measures itself on some of the model's
//     work while the others train (IdleProbe), so that the controller sees it recover.
// A device that fails leaves at the start of an iteration (the executor's vote tells everyone):
// the survivors roll back to the last snapshot, re-plan on what is left, restore the lost layers
// from a data-parallel replica or the neighbour's copy, and go on. docs/METHOD.md, "Adaptive runs".
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "dpart/cost/cost_model.hpp"
#include "dpart/runtime/executor.hpp"
#include "dpart/sim/policy.hpp"

namespace dpart::rt {

struct AdaptiveOptions {
    std::uint64_t window = 10;      ///< iterations between the controller's decisions
    std::uint64_t copy_every = 10;  ///< K: snapshots and neighbour copies every K iterations
    PolicyOptions policy;           ///< min_gain and the solver's options for re-plans
};

struct AdaptiveJob {
    const Model& model;
    const Cluster& cluster;
    const CostModel& cost;
    CostOptions copt;
    Plan plan;        ///< the initial plan; its devices are the job's agents, in worker order
    RunOptions run;   ///< iterations, seed, data, optimizer, scenario, timeout, emulate
    AdaptiveOptions adaptive;
    /// The model as `cost` prices it, for estimates and re-plans (dpart run: in its compute
    /// precision); null: `model`.
    const Model* priced = nullptr;
};

/// One row of iterations.csv, in the order things happened (iterations re-run after a rollback
/// appear again).
struct AdaptiveIteration {
    std::uint64_t iteration = 0;
    std::uint64_t plan_version = 1;
    double seconds = 0;  ///< the slowest worker's iteration, plus the boundary work before it
    double loss = 0;
    std::string event;
};

/// A stretch of iterations run with one plan.
struct Segment {
    std::uint64_t plan_version = 1;
    std::uint64_t first = 0, end = 0;   ///< iterations [first, end) ran
    std::vector<WorkerReport> workers;  ///< by worker of that plan
};

/// A controller decision (one per boundary between segments).
struct Decision {
    std::uint64_t iteration = 0;           ///< the boundary: the iteration about to start
    std::optional<Plan> plan;              ///< the plan moved to
    std::optional<std::uint64_t> rollback;  ///< after a failure: the snapshot's iteration
    std::vector<std::size_t> failed;       ///< devices lost at this boundary
    /// (lost device, device whose copy of its state restores it) when no replica is alive
    std::vector<std::pair<std::size_t, std::size_t>> restored_from;
    std::vector<std::pair<std::size_t, double>> detected;  ///< (device, slowdown) newly believed
    /// Devices believed slow that the plan leaves out: each measures itself in the next segment
    /// (IdleProbe), so that the controller sees when one is fast again.
    std::vector<std::size_t> probe;
    double solve_s = 0;
    std::string text;
    std::string stop;  ///< non-empty: the job cannot go on (why)
};

struct AdaptiveResult {
    bool writer = false;  ///< this agent holds the result (one agent does; the others' is empty)
    std::vector<Plan> plans;  ///< by version - 1
    std::vector<Segment> segments;
    std::vector<Decision> decisions;
    std::vector<AdaptiveIteration> iterations;
    std::vector<double> loss;  ///< per iteration (its last execution)
    std::vector<std::vector<float>> weights;
    std::uint64_t weights_digest = 0;
    std::uint64_t repartitions = 0;
    std::uint64_t failures = 0;          ///< devices lost and recovered from
    std::uint64_t rerun_iterations = 0;  ///< iterations executed again after rollbacks
    std::uint64_t migrated_bytes = 0;    ///< weights and moments sent to new owners
    std::uint64_t copy_bytes = 0;        ///< state sent to neighbours
    double migration_s = 0;              ///< sum over migrations of the slowest agent's time
    double replan_s = 0;                 ///< the planner's time, all decisions
    [[nodiscard]] double total_s() const;
};

/// Every agent a thread of this process, over in-process queues.
[[nodiscard]] AdaptiveResult run_adaptive_in_process(const AdaptiveJob& job);
/// This process is one agent (net.size() = the initial plan's devices).
[[nodiscard]] AdaptiveResult run_adaptive(const AdaptiveJob& job, Transport& net);

}  // namespace dpart::rt
