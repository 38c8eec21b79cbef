#include "dpart/sim/simulator.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <random>

namespace dpart {

std::vector<StageDurations> durations_under(const Plan& plan, const PlanEstimate& nominal,
                                            const Conditions& conditions) {
    std::vector<StageDurations> out(plan.stages.size());
    for (std::size_t s = 0; s < plan.stages.size(); ++s) {
        const Stage& st = plan.stages[s];
        const StageEstimate& e = nominal.stages[s];
        StageDurations& d = out[s];
        // The slowest device sets each replica's pace and the step's; a factor under 1 is a
        // device faster than the plan assumed.
        double slowest = 0.0;
        for (std::size_t k = 0; k < st.replicas(); ++k) {
            double factor = 0.0;
            for (std::uint32_t t = 0; t < st.tp; ++t)
                factor = std::max(factor, conditions.slowdown[st.devices[k * st.tp + t]]);
            slowest = std::max(slowest, factor);
            d.forward = std::max(d.forward, e.replica_forward_s[k] * factor);
            d.backward = std::max(d.backward, e.replica_backward_s[k] * factor);
        }
        d.optimizer = e.optimizer_s * slowest;
        d.activation_link = e.activation_link;
        d.gradient_link = e.gradient_link;
        if (s + 1 < plan.stages.size())
            d.send_activation =
                e.send_activation_s * conditions.link(st.devices.back(), plan.stages[s + 1].devices.front());
        if (s > 0) d.send_gradient = e.send_gradient_s * conditions.link(st.devices.front(), plan.stages[s - 1].devices.back());
        const std::size_t r = st.replicas();
        double ring = r > 1 ? 0.0 : 1.0;  // the ring's slowest link
        for (std::size_t k = 0; r > 1 && k < r; ++k)
            ring = std::max(ring, conditions.link(st.devices[k * st.tp], st.devices[((k + 1) % r) * st.tp]));
        d.allreduce = e.allreduce_s * ring;
        d.sharded = e.sharded_optimizer;
    }
    return out;
}

Conditions jittered(const Conditions& conditions, const Jitter& jitter, std::uint64_t iteration) {
    if (jitter.sigma <= 0) return conditions;
    Conditions c = conditions;
    std::mt19937_64 rng(jitter.seed * 0x9E3779B97F4A7C15ull + iteration);
    std::normal_distribution<double> normal(0.0, 1.0);
    for (double& s : c.slowdown) s *= std::exp(jitter.sigma * normal(rng));
    return c;
}

std::string apply_events(const Scenario& scenario, std::size_t& next, std::uint64_t iteration,
                         Conditions& conditions, const Cluster& cluster) {
    std::string event;
    while (next < scenario.events.size() && scenario.events[next].iteration <= iteration) {
        const ScenarioEvent& e = scenario.events[next++];
        conditions.apply(e);
        if (!event.empty()) event += "; ";
        event += describe(e, cluster);
    }
    return event;
}

ReplayResult replay_static(const Plan& plan, const PlanEstimate& nominal, const Cluster& cluster,
                           const Scenario& scenario, std::uint64_t iterations, bool overlap_allreduce,
                           const IterationObserver& observe, const Jitter& jitter) {
    ReplayResult result;
    Conditions conditions(cluster.devices.size());
    std::size_t next_event = 0;
    for (std::uint64_t it = 0; it < iterations; ++it) {
        const std::string event = apply_events(scenario, next_event, it, conditions, cluster);
        for (const Stage& st : plan.stages)
            for (std::size_t d : st.devices)
                if (conditions.failed[d]) {
                    result.stopped = true;
                    result.stop_reason = fmt::format("device {} failed at iteration {}; the static policy cannot "
                                                     "continue without a re-plan",
                                                     cluster.devices[d].name, it);
                    return result;
                }
        const TaskGraph g = build_schedule(plan.schedule, durations_under(plan, nominal, jittered(conditions, jitter, it)),
                                           static_cast<std::uint32_t>(plan.microbatches), overlap_allreduce);
        const Timeline t = simulate(g);
        if (observe) observe(it, event, plan, g, t);
        result.iterations.push_back({it, t.makespan, event});
    }
    return result;
}

}  // namespace dpart
