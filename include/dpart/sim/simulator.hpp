#pragma once
// Replaying a plan iteration by iteration under a scenario. Each iteration runs the plan's
// schedule task graph (the same graph the planner's prediction comes from) with the durations
// the iteration's conditions give.
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "dpart/plan/estimate.hpp"
#include "dpart/sim/scenario.hpp"
#include "dpart/sim/schedule.hpp"

namespace dpart {

/// A plan's per-stage durations under `conditions`: a replica's compute and optimizer step scale
/// by the largest slowdown among its devices; a transfer or all-reduce by the bandwidth divisor
/// of the slowest link it uses (latency included: an upper bound).
[[nodiscard]] std::vector<StageDurations> durations_under(const Plan& plan, const PlanEstimate& nominal,
                                                          const Conditions& conditions);

/// Per-device noise on compute: each iteration every device's work takes
/// exp(sigma * N(0, 1)) times as long, drawn from a generator seeded by (seed, iteration), so that
/// a given seed gives every policy the same noise.
struct Jitter {
    double sigma = 0;
    std::uint64_t seed = 1;
};

/// The conditions with one iteration's jitter applied to every device's slowdown.
[[nodiscard]] Conditions jittered(const Conditions& conditions, const Jitter& jitter, std::uint64_t iteration);

/// Applies the events that take effect at the start of `iteration` (those from `next` on whose
/// iteration has come), advancing `next`; returns their description ("" when none).
std::string apply_events(const Scenario& scenario, std::size_t& next, std::uint64_t iteration,
                         Conditions& conditions, const Cluster& cluster);

struct IterationRecord {
    std::uint64_t iteration = 0;
    double iteration_s = 0;
    std::string event;  ///< what took effect at its start ("" when nothing)
};

struct ReplayResult {
    std::vector<IterationRecord> iterations;
    bool stopped = false;     ///< a device of the plan failed and the policy cannot go on
    std::string stop_reason;
};

/// Sees every simulated iteration: what took effect at its start, the plan in force, its task
/// graph and timeline (e.g. to write the trace CSVs).
using IterationObserver = std::function<void(std::uint64_t iteration, const std::string& event, const Plan& plan,
                                             const TaskGraph&, const Timeline&)>;

/// The static policy: the plan as it is, every iteration; it stops at the first failure of one
/// of its devices (only a re-plan could continue).
[[nodiscard]] ReplayResult replay_static(const Plan& plan, const PlanEstimate& nominal, const Cluster& cluster,
                                         const Scenario& scenario, std::uint64_t iterations,
                                         bool overlap_allreduce = false, const IterationObserver& observe = {},
                                         const Jitter& jitter = {});

}  // namespace dpart
