#pragma once
// Re-planning policies for replay: `oracle` re-plans the moment conditions change, for free (the
// upper bound); `adaptive` re-plans every window from the stage times it measured, and moves to
// the new plan only when the predicted gain over the remaining iterations exceeds the migration.
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "dpart/cost/cost_model.hpp"
#include "dpart/plan/solver.hpp"
#include "dpart/sim/scenario.hpp"
#include "dpart/sim/simulator.hpp"

namespace dpart {

/// A cost model under conditions: a device's work takes `slowdown` times as long, a link's
/// transfers `link` times as long. The planner re-plans with it.
class ScaledCostModel final : public CostModel {
public:
    ScaledCostModel(const CostModel& base, Conditions conditions);
    [[nodiscard]] double layer_seconds(std::size_t layer, Pass pass, std::size_t device, std::uint64_t samples,
                                       std::uint32_t tp) const override;
    [[nodiscard]] std::size_t device_class(std::size_t device) const override { return class_.at(device); }
    [[nodiscard]] double device_speed(std::size_t device) const override;
    [[nodiscard]] double transfer_seconds(std::size_t a, std::size_t b, std::uint64_t bytes) const override;
    [[nodiscard]] AllreduceCost allreduce_cost(const std::vector<std::size_t>& devices) const override;
    [[nodiscard]] double optimizer_seconds(std::size_t device, std::uint64_t params) const override;

private:
    const CostModel& base_;
    Conditions conditions_;
    std::vector<std::size_t> class_;
};

/// The devices still alive, as a cluster of their own, with the map back to the original indices.
struct Survivors {
    Cluster cluster;
    std::vector<std::size_t> original;  ///< survivor index -> original device index
};
[[nodiscard]] Survivors survivors(const Cluster& cluster, const std::vector<bool>& failed);

/// Seconds to move the state (weights and optimizer, `bytes_per_param` per parameter) of every
/// layer whose owner changes between two plans, over the slowest link between old and new owners.
[[nodiscard]] double migration_seconds(const Plan& from, const Plan& to, const Model& model, const CostModel& cost,
                                       const CostOptions& options);

/// A device measured over this factor of the healthy ones' pace is slow (measured_slowdowns);
/// a re-plan also tries the plans that leave the slow devices out.
inline constexpr double slow_device_factor = 1.25;
/// Re-plans also try leaving out either end of the slowest this many links slowed over
/// slow_device_factor (two solves each).
inline constexpr std::size_t max_slow_links = 4;

enum class Policy { static_plan, adaptive, oracle };
[[nodiscard]] std::string_view to_string(Policy p) noexcept;

struct PolicyOptions {
    Policy policy = Policy::static_plan;
    std::uint64_t window = 10;  ///< adaptive: iterations between re-plans
    /// adaptive: the least predicted gain per iteration, as a fraction, worth a repartition (the
    /// measured speeds are noisy; below this the gain may be noise)
    double min_gain = 0.02;
    SolverOptions solver;       ///< for re-plans (the microbatch size is kept)
    Jitter jitter;              ///< per-device noise, the same for every policy at a given seed
};

struct PolicyReplay {
    ReplayResult result;
    std::vector<std::uint64_t> plan_version;  ///< per iteration
    std::uint64_t repartitions = 0;
    double migration_s = 0;
    std::vector<std::string> notes;  ///< re-plans considered and taken
};

/// What re-planning under `view` (the conditions the policy believes) gives.
struct ReplanDecision {
    std::optional<Plan> plan;  ///< the plan to move to; none: keep the current one
    bool infeasible = false;   ///< no plan fits on the devices alive
    double now_s = 0;          ///< the current plan's predicted iteration under `view` (0 when forced)
    double then_s = 0;         ///< the new plan's
    double migration_s = 0;    ///< moving the layers that change owner (0 for the oracle)
    double solve_s = 0;        ///< wall time of the planner's search
    std::string note;          ///< what was decided, for traces
};

/// The controller's decision, the same for replay's policies and `dpart run --adaptive`: the
/// best plan on the devices alive under `view`; it is taken when `forced` (the current plan uses
/// a failed device), or, for the oracle, when it is faster, or, adaptive, when its predicted gain
/// over the `remaining` iterations exceeds the migration and is at least `min_gain` per iteration.
[[nodiscard]] ReplanDecision consider_replan(const Model& model, const Cluster& cluster, const CostModel& cost,
                                             const CostOptions& copt, const Conditions& view, const Plan& current,
                                             const PolicyOptions& options, std::uint64_t remaining, bool forced,
                                             std::uint64_t iteration);

/// A device's measured time for some work next to the cost model's prediction for it.
struct DeviceMeasurement {
    std::size_t device = 0;
    double measured_s = 0;
    double predicted_s = 0;
    /// Whether it sets the healthy pace the others are judged against (a worker's stage); false:
    /// it is only judged (an idle device's probe, timed otherwise).
    bool reference = true;
};

/// Effective slowdowns from measurements. A device's ratio measured / predicted includes what the
/// cost model gets wrong for every device alike, so it is taken relative to the healthy devices'
/// ratio: the median of the reference ratios within 25% of the smallest reference ratio. A device
/// measured several times gets its mean ratio; devices not measured keep `previous`, and so do all
/// when no measurement is a reference.
[[nodiscard]] std::vector<double> measured_slowdowns(const std::vector<DeviceMeasurement>& measurements,
                                                     std::vector<double> previous);

/// The time some transfers over the link between devices a and b took, next to the cost model's
/// prediction for them.
struct LinkMeasurement {
    std::size_t a = 0, b = 0;
    double measured_s = 0;
    double predicted_s = 0;
};
using LinkKey = std::pair<std::size_t, std::size_t>;  ///< (smaller, larger) device, as Conditions::link_factor

/// Effective link factors from measurements, as measured_slowdowns tells slow devices from
/// healthy ones: a link's ratio measured / predicted relative to the healthy links' (the median
/// of the ratios within 25% of the smallest). Only the links measured are in the result; one
/// measured alone is its own reference (factor 1): a slow link shows only beside healthy ones. A
/// link measured several times gets its mean ratio. `previous`: the factors so far, kept for a
/// link whose every measurement is unusable (no positive prediction).
[[nodiscard]] std::map<LinkKey, double> measured_link_factors(const std::vector<LinkMeasurement>& measurements,
                                                              const std::map<LinkKey, double>& previous);

/// Replays `plan` for `iterations` under `scenario` with a policy (static: replay_static).
[[nodiscard]] PolicyReplay replay_policy(const Plan& plan, const Model& model, const Cluster& cluster,
                                         const CostModel& cost, const CostOptions& copt, const Scenario& scenario,
                                         std::uint64_t iterations, const PolicyOptions& options,
                                         const IterationObserver& observe = {});

}  // namespace dpart
