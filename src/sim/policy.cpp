#include "dpart/sim/policy.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <map>
#include <optional>
#include <unordered_map>

namespace dpart {

std::string_view to_string(Policy p) noexcept {
    switch (p) {
        case Policy::static_plan: return "static";
        case Policy::adaptive: return "adaptive";
        case Policy::oracle: return "oracle";
    }
    return "?";
}

ScaledCostModel::ScaledCostModel(const CostModel& base, Conditions conditions)
    : base_(base), conditions_(std::move(conditions)) {
    std::map<std::pair<std::size_t, double>, std::size_t> ids;
    for (std::size_t d = 0; d < conditions_.slowdown.size(); ++d)
        class_.push_back(ids.emplace(std::pair{base.device_class(d), conditions_.slowdown[d]}, ids.size()).first->second);
}

double ScaledCostModel::layer_seconds(std::size_t layer, Pass pass, std::size_t device, std::uint64_t samples,
                                      std::uint32_t tp) const {
    return base_.layer_seconds(layer, pass, device, samples, tp) * conditions_.slowdown.at(device);
}

double ScaledCostModel::device_speed(std::size_t device) const {
    return base_.device_speed(device) / conditions_.slowdown.at(device);
}

double ScaledCostModel::transfer_seconds(std::size_t a, std::size_t b, std::uint64_t bytes) const {
    return base_.transfer_seconds(a, b, bytes) * conditions_.link(a, b);
}

AllreduceCost ScaledCostModel::allreduce_cost(const std::vector<std::size_t>& devices) const {
    AllreduceCost c = base_.allreduce_cost(devices);
    double f = 1.0;
    for (std::size_t i = 0; devices.size() > 1 && i < devices.size(); ++i)
        f = std::max(f, conditions_.link(devices[i], devices[(i + 1) % devices.size()]));
    return {c.fixed * f, c.per_byte * f};
}

double ScaledCostModel::optimizer_seconds(std::size_t device, std::uint64_t params) const {
    return base_.optimizer_seconds(device, params) * conditions_.slowdown.at(device);
}

namespace {

/// A cost model over a sub-cluster: its device i is the base's device original[i].
class RemappedCostModel final : public CostModel {
public:
    RemappedCostModel(const CostModel& base, std::vector<std::size_t> original)
        : base_(base), original_(std::move(original)) {}
    double layer_seconds(std::size_t layer, Pass pass, std::size_t device, std::uint64_t samples,
                         std::uint32_t tp) const override {
        return base_.layer_seconds(layer, pass, original_.at(device), samples, tp);
    }
    std::size_t device_class(std::size_t device) const override { return base_.device_class(original_.at(device)); }
    double device_speed(std::size_t device) const override { return base_.device_speed(original_.at(device)); }
    double transfer_seconds(std::size_t a, std::size_t b, std::uint64_t bytes) const override {
        return base_.transfer_seconds(original_.at(a), original_.at(b), bytes);
    }
    AllreduceCost allreduce_cost(const std::vector<std::size_t>& devices) const override {
        std::vector<std::size_t> mapped;
        for (std::size_t d : devices) mapped.push_back(original_.at(d));
        return base_.allreduce_cost(mapped);
    }
    double optimizer_seconds(std::size_t device, std::uint64_t params) const override {
        return base_.optimizer_seconds(original_.at(device), params);
    }

private:
    const CostModel& base_;
    std::vector<std::size_t> original_;
};

}  // namespace

Survivors survivors(const Cluster& cluster, const std::vector<bool>& failed) {
    Survivors s;
    s.cluster.name = cluster.name;
    s.cluster.intra_default = cluster.intra_default;
    s.cluster.inter_default = cluster.inter_default;
    s.cluster.node_overrides = cluster.node_overrides;  // nodes keep their indices
    s.cluster.where = cluster.where;
    std::vector<std::size_t> index(cluster.devices.size(), SIZE_MAX);
    for (const Node& n : cluster.nodes) {
        Node copy = n;
        copy.devices.clear();
        s.cluster.nodes.push_back(std::move(copy));
    }
    for (std::size_t d = 0; d < cluster.devices.size(); ++d) {
        if (failed[d]) continue;
        index[d] = s.cluster.devices.size();
        s.cluster.nodes[cluster.devices[d].node].devices.push_back(index[d]);
        s.cluster.devices.push_back(cluster.devices[d]);
        s.original.push_back(d);
    }
    for (const auto& [key, link] : cluster.overrides) {
        const std::size_t a = key >> 32, b = key & 0xffffffffu;
        if (index[a] != SIZE_MAX && index[b] != SIZE_MAX) s.cluster.overrides[Cluster::pair_key(index[a], index[b])] = link;
    }
    return s;
}

double migration_seconds(const Plan& from, const Plan& to, const Model& model, const CostModel& cost,
                         const CostOptions& options) {
    // Bytes moving between each (old stage, new stage) pair; the pairs move in parallel, each
    // over the link between their first devices.
    std::map<std::pair<std::size_t, std::size_t>, std::uint64_t> moves;
    auto owner = [](const Plan& p, std::size_t layer) {
        for (std::size_t s = 0; s < p.stages.size(); ++s)
            if (layer >= p.stages[s].first_layer && layer <= p.stages[s].last_layer) return s;
        return p.stages.size();
    };
    for (std::size_t l = 0; l < model.layers.size(); ++l) {
        const std::size_t a = owner(from, l), b = owner(to, l);
        if (from.stages[a].devices == to.stages[b].devices) continue;
        moves[{a, b}] += model.layers[l].cost.params * options.bytes_per_param;
    }
    double seconds = 0;
    for (const auto& [pair, bytes] : moves)
        seconds = std::max(seconds, cost.transfer_seconds(from.stages[pair.first].devices.front(),
                                                          to.stages[pair.second].devices.front(), bytes));
    return seconds;
}

namespace {

/// The best plan on the devices not `excluded`, priced under `conditions`, in the original device
/// indices (nothing when no plan fits).
std::optional<SolveResult> solve_without(const Model& model, const Cluster& cluster, const CostModel& cost,
                                         const CostOptions& copt, const Conditions& conditions,
                                         const std::vector<bool>& excluded, const SolverOptions& so) {
    const Survivors alive = survivors(cluster, excluded);
    if (alive.cluster.devices.empty()) return std::nullopt;
    const RemappedCostModel remapped(cost, alive.original);
    Conditions local(alive.original.size());
    for (std::size_t i = 0; i < alive.original.size(); ++i) local.slowdown[i] = conditions.slowdown[alive.original[i]];
    std::vector<std::size_t> index(cluster.devices.size(), SIZE_MAX);
    for (std::size_t i = 0; i < alive.original.size(); ++i) index[alive.original[i]] = i;
    for (const auto& [pair, f] : conditions.link_factor)
        if (index[pair.first] != SIZE_MAX && index[pair.second] != SIZE_MAX)
            local.link_factor[{std::min(index[pair.first], index[pair.second]), std::max(index[pair.first], index[pair.second])}] = f;
    const ScaledCostModel scaled(remapped, local);
    try {
        SolveResult r = solve(model, alive.cluster, scaled, copt, so);
        for (Stage& st : r.plan.stages)
            for (std::size_t& d : st.devices) d = alive.original[d];
        return r;
    } catch (const InfeasibleError&) {
        return std::nullopt;
    }
}

/// The best plan for the devices alive under `conditions`, in the original device indices. The
/// solver places stages on consecutive devices of its orders and may leave out only the last
/// ones, so a slowed device first in its node would be in every plan: the devices seen slower
/// than planned are also left out together, and the better plan kept (a slowed device is then
/// never worse than a failed one); so are each end of the slowest slowed links, one at a time.
std::optional<Plan> replan(const Model& model, const Cluster& cluster, const CostModel& cost, const CostOptions& given,
                           const Conditions& conditions, const Plan& current, const PolicyOptions& options) {
    // A re-plan runs as the current plan does: recomputed, sharded, if it says so.
    CostOptions copt = given;
    copt.recompute = copt.recompute || current.recompute;
    copt.shard_optimizer = copt.shard_optimizer || current.shard_optimizer;
    copt.fused_attention = copt.fused_attention || current.fused_attention;
    copt.vocab_parallel = copt.vocab_parallel || current.vocab_parallel;
    SolverOptions so = options.solver;
    so.microbatch_size = current.microbatch_size;
    so.microbatches = 0;
    so.schedule = current.schedule;
    std::optional<SolveResult> best = solve_without(model, cluster, cost, copt, conditions, conditions.failed, so);
    // The devices clearly slower than planned (over 1.25x, as measured_slowdowns tells the
    // healthy from the slow), slowest first: the plans without the slowest 1, 2, 4, ... of them.
    std::vector<std::size_t> slowed;
    for (std::size_t d = 0; d < conditions.slowdown.size(); ++d)
        if (!conditions.failed[d] && conditions.slowdown[d] > slow_device_factor) slowed.push_back(d);
    std::stable_sort(slowed.begin(), slowed.end(),
                     [&](std::size_t a, std::size_t b) { return conditions.slowdown[a] > conditions.slowdown[b]; });
    const auto consider = [&](const std::vector<bool>& without) {
        std::optional<SolveResult> other = solve_without(model, cluster, cost, copt, conditions, without, so);
        if (other && (!best || objective_value(so.objective, other->plan, other->estimate) <
                                   objective_value(so.objective, best->plan, best->estimate)))
            best = std::move(other);
    };
    std::vector<std::size_t> counts;  // how many of the slowest to leave out: 1, 2, 4, ..., all
    for (std::size_t k = 1; k < slowed.size(); k *= 2) counts.push_back(k);
    if (!slowed.empty()) counts.push_back(slowed.size());
    for (std::size_t k : counts) {
        std::vector<bool> without = conditions.failed;
        for (std::size_t i = 0; i < k; ++i) without[slowed[i]] = true;
        consider(without);
    }
    // A link clearly slower than planned may join devices that every plan places next to each
    // other (consecutive in the solver's orders): the plans without one of its ends, for the
    // slowest max_slow_links of them.
    std::vector<std::pair<double, LinkKey>> links;
    for (const auto& [key, factor] : conditions.link_factor)
        if (factor > slow_device_factor && !conditions.failed[key.first] && !conditions.failed[key.second])
            links.push_back({factor, key});
    std::sort(links.begin(), links.end(), std::greater<>());
    links.resize(std::min<std::size_t>(links.size(), max_slow_links));
    for (const auto& [factor, key] : links)
        for (const std::size_t end : {key.first, key.second}) {
            std::vector<bool> without = conditions.failed;
            without[end] = true;
            consider(without);
        }
    if (!best) return std::nullopt;
    best->plan.objective = current.objective;
    best->plan.precision = current.precision;
    return best->plan;
}

/// The devices of the replica holding `device` in the plan (none when the plan does not use it).
std::vector<std::size_t> replica_of(const Plan& plan, std::size_t device) {
    for (const Stage& st : plan.stages)
        for (std::size_t k = 0; k < st.replicas(); ++k) {
            const auto first = st.devices.begin() + static_cast<std::ptrdiff_t>(k * st.tp);
            const auto last = first + st.tp;
            if (std::find(first, last, device) != last) return {first, last};
        }
    return {};
}

bool uses_device(const Plan& plan, std::size_t device) {
    for (const Stage& st : plan.stages)
        if (std::find(st.devices.begin(), st.devices.end(), device) != st.devices.end()) return true;
    return false;
}

/// The adaptive policy's belief once `dev` recovers: healthy again (a device the plan left out is
/// measured no more, and would otherwise stay slow in the belief for good), its window's samples
/// from before dropped, and so is what rests on the same evidence: the samples of its
/// tensor-parallel peers in the plan (blamed with it for their replica's time; their belief too
/// where it is the same), and the belief in a device the plan does not use that has its factor
/// (a peer blamed before, then left out).
void believe_recovered(std::size_t dev, const Plan& current, std::vector<double>& slowdown,
                       std::vector<double>& measured_sum, std::vector<std::uint32_t>& measured_count) {
    const std::vector<std::size_t> peers = replica_of(current, dev);
    const double was = slowdown[dev];
    for (std::size_t d = 0; d < slowdown.size(); ++d) {
        const bool same = slowdown[d] == was;
        const bool peer = std::find(peers.begin(), peers.end(), d) != peers.end();
        const bool left_out_peer = !peer && was > 1.0 && same && !uses_device(current, d);
        if (d != dev && !peer && !left_out_peer) continue;
        if (d == dev || same) slowdown[d] = 1.0;
        measured_sum[d] = 0.0;
        measured_count[d] = 0;
    }
}

bool uses_failed(const Plan& plan, const Conditions& c) {
    for (const Stage& st : plan.stages)
        for (std::size_t d : st.devices)
            if (c.failed[d]) return true;
    return false;
}

}  // namespace

ReplanDecision consider_replan(const Model& model, const Cluster& cluster, const CostModel& cost, const CostOptions& copt,
                               const Conditions& view, const Plan& current, const PolicyOptions& options,
                               std::uint64_t remaining, bool forced, std::uint64_t iteration) {
    ReplanDecision d;
    const auto t0 = std::chrono::steady_clock::now();
    const std::optional<Plan> next = replan(model, cluster, cost, copt, view, current, options);
    d.solve_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!next) {
        d.infeasible = true;
        d.note = fmt::format("iteration {}: no plan fits on the devices alive", iteration);
        return d;
    }
    if (*next == current) {
        d.note = fmt::format("iteration {}: the current plan is still the best", iteration);
        return d;
    }
    const ScaledCostModel seen(cost, view);
    d.now_s = forced ? 0.0 : estimate_plan(current, model, cluster, seen, copt).iteration_s;
    d.then_s = estimate_plan(*next, model, cluster, seen, copt).iteration_s;
    const bool oracle = options.policy == Policy::oracle;
    d.migration_s = oracle ? 0 : migration_seconds(current, *next, model, cost, copt);
    const double gain = (d.now_s - d.then_s) * static_cast<double>(remaining);
    const bool worth = oracle ? d.then_s < d.now_s : gain > d.migration_s && d.now_s - d.then_s >= options.min_gain * d.now_s;
    if (forced || worth) {
        d.plan = *next;
        d.note = fmt::format("iteration {}: re-plan to {} stages ({:.6g} -> {:.6g} ms predicted, migration {:.6g} ms)",
                             iteration, next->stages.size(), d.now_s * 1e3, d.then_s * 1e3, d.migration_s * 1e3);
    } else {
        d.note = fmt::format("iteration {}: a {}-stage plan would take {:.6g} instead of {:.6g} ms: not worth a "
                             "migration of {:.6g} ms",
                             iteration, next->stages.size(), d.then_s * 1e3, d.now_s * 1e3, d.migration_s * 1e3);
    }
    return d;
}

std::vector<double> measured_slowdowns(const std::vector<DeviceMeasurement>& measurements, std::vector<double> previous) {
    std::map<std::size_t, std::pair<double, std::size_t>> ratio;  // device -> (sum, count)
    std::map<std::size_t, bool> is_reference;                       // device -> measured as a reference
    for (const DeviceMeasurement& m : measurements) {
        if (!(m.predicted_s > 0) || !(m.measured_s >= 0)) continue;
        auto& r = ratio[m.device];
        r.first += m.measured_s / m.predicted_s;
        ++r.second;
        is_reference[m.device] = is_reference[m.device] || m.reference;
    }
    std::vector<double> mean;
    for (const auto& [d, r] : ratio)
        if (is_reference[d]) mean.push_back(r.first / static_cast<double>(r.second));
    if (mean.empty()) return previous;
    const double least = *std::min_element(mean.begin(), mean.end());
    std::vector<double> healthy;
    for (double x : mean)
        if (x <= slow_device_factor * least) healthy.push_back(x);
    std::sort(healthy.begin(), healthy.end());
    const std::size_t n = healthy.size();
    const double reference = n % 2 == 1 ? healthy[n / 2] : 0.5 * (healthy[n / 2 - 1] + healthy[n / 2]);
    for (const auto& [d, r] : ratio) {
        if (d >= previous.size()) previous.resize(d + 1, 1.0);
        previous[d] = reference > 0 ? std::max(1.0, r.first / static_cast<double>(r.second) / reference) : 1.0;
    }
    return previous;
}

std::map<LinkKey, double> measured_link_factors(const std::vector<LinkMeasurement>& measurements,
                                                const std::map<LinkKey, double>& previous) {
    // The links as devices of measured_slowdowns, numbered in key order.
    std::map<LinkKey, std::size_t> index;
    for (const LinkMeasurement& m : measurements) index.emplace(LinkKey{std::min(m.a, m.b), std::max(m.a, m.b)}, 0);
    std::vector<LinkKey> keys;
    std::vector<double> before;
    for (auto& [key, i] : index) {
        i = keys.size();
        keys.push_back(key);
        const auto p = previous.find(key);
        before.push_back(p == previous.end() ? 1.0 : p->second);
    }
    std::vector<DeviceMeasurement> as_devices;
    for (const LinkMeasurement& m : measurements)
        as_devices.push_back({index.at({std::min(m.a, m.b), std::max(m.a, m.b)}), m.measured_s, m.predicted_s});
    const std::vector<double> factors = measured_slowdowns(as_devices, before);
    std::map<LinkKey, double> out;
    for (std::size_t i = 0; i < keys.size(); ++i) out[keys[i]] = factors[i];
    return out;
}

PolicyReplay replay_policy(const Plan& plan, const Model& model, const Cluster& cluster, const CostModel& cost,
                           const CostOptions& copt, const Scenario& scenario, std::uint64_t iterations,
                           const PolicyOptions& options, const IterationObserver& observe) {
    PolicyReplay out;
    if (options.policy == Policy::static_plan) {
        out.result = replay_static(plan, estimate_plan(plan, model, cluster, cost, copt), cluster, scenario, iterations,
                                   copt.overlap_allreduce, observe, options.jitter);
        out.plan_version.assign(out.result.iterations.size(), 1);
        return out;
    }
    Plan current = plan;
    PlanEstimate nominal = estimate_plan(current, model, cluster, cost, copt);
    std::uint64_t version = 1;
    Conditions truth(cluster.devices.size());
    Conditions believed(cluster.devices.size());  // adaptive: what the measurements say
    std::vector<double> measured_sum(cluster.devices.size(), 0.0);
    std::vector<std::uint32_t> measured_count(cluster.devices.size(), 0);
    // Adaptive: per link between consecutive stages, the sum and count of its measured factors in
    // the window (a run times its sends against their predicted times).
    std::map<std::pair<std::size_t, std::size_t>, std::pair<double, std::uint32_t>> link_samples;
    std::size_t next_event = 0;
    for (std::uint64_t it = 0; it < iterations; ++it) {
        const std::size_t first_event = next_event;
        std::string event = apply_events(scenario, next_event, it, truth, cluster);
        const bool changed = next_event > first_event;
        // Failures and recoveries are seen at once (slowdowns only through measurements); a new
        // failure forces a re-plan.
        for (std::size_t e = first_event; e < next_event; ++e) {
            const ScenarioEvent& ev = scenario.events[e];
            if (ev.kind == EventKind::recover)
                believe_recovered(ev.device, current, believed.slowdown, measured_sum, measured_count);
            // A link repaired (factor 1 or less) is seen at once too: the plan may no longer send
            // over it, and it would stay slow in the belief.
            if (ev.kind == EventKind::link && ev.factor <= 1.0) {
                const std::pair key{std::min(ev.a, ev.b), std::max(ev.a, ev.b)};
                believed.link_factor.erase(key);
                link_samples.erase(key);
            }
        }
        bool failure = false;
        for (std::size_t d = 0; d < truth.failed.size(); ++d) failure = failure || (truth.failed[d] && !believed.failed[d]);
        believed.failed = truth.failed;
        double migration = 0;
        const bool window = options.policy == Policy::adaptive && options.window > 0 && it > 0 && it % options.window == 0;
        const bool forced = uses_failed(current, truth);
        if ((options.policy == Policy::oracle && changed) || window || forced || (failure && options.policy == Policy::adaptive)) {
            const Conditions& view = options.policy == Policy::oracle ? truth : believed;
            const ReplanDecision d =
                consider_replan(model, cluster, cost, copt, view, current, options, iterations - it, forced, it);
            if (d.infeasible) {
                out.result.stopped = true;
                out.result.stop_reason = fmt::format("no plan fits on the devices alive at iteration {}", it);
                break;
            }
            if (d.plan) {
                out.notes.push_back(d.note);
                current = *d.plan;
                nominal = estimate_plan(current, model, cluster, cost, copt);
                ++version;
                ++out.repartitions;
                migration = d.migration_s;
                out.migration_s += d.migration_s;
                if (!event.empty()) event += "; ";
                event += fmt::format("repartition to plan {}", version);
            }
        }
        const Conditions noisy = jittered(truth, options.jitter, it);
        const TaskGraph g = build_schedule(current.schedule, durations_under(current, nominal, noisy),
                                           static_cast<std::uint32_t>(current.microbatches), copt.overlap_allreduce);
        const Timeline t = simulate(g);
        if (observe) observe(it, event, current, g, t);
        out.result.iterations.push_back({it, t.makespan + migration, event});
        out.plan_version.push_back(version);
        // Adaptive: what a run measures is each replica's time against its nominal time, which is
        // the largest slowdown among the replica's devices; it is attributed to all of them and
        // averaged over the window, so that per-iteration noise does not drive re-plans.
        if (options.policy == Policy::adaptive) {
            for (const Stage& st : current.stages)
                for (std::size_t k = 0; k < st.replicas(); ++k) {
                    double factor = 0;
                    for (std::uint32_t q = 0; q < st.tp; ++q)
                        factor = std::max(factor, noisy.slowdown[st.devices[k * st.tp + q]]);
                    for (std::uint32_t q = 0; q < st.tp; ++q) {
                        measured_sum[st.devices[k * st.tp + q]] += factor;
                        ++measured_count[st.devices[k * st.tp + q]];
                    }
                }
            // Each link a stage sends its activations over (and receives gradients back from) is
            // measured by those sends' time against their predicted time: the link's factor.
            for (std::size_t s = 0; s + 1 < current.stages.size(); ++s) {
                if (!(nominal.stages[s].send_activation_s > 0)) continue;
                const std::size_t a = current.stages[s].devices.back(), b = current.stages[s + 1].devices.front();
                auto& [sum, count] = link_samples[{std::min(a, b), std::max(a, b)}];
                sum += noisy.link(a, b);
                ++count;
            }
            if (options.window > 0 && (it + 1) % options.window == 0) {
                for (std::size_t d = 0; d < measured_sum.size(); ++d)
                    if (measured_count[d] > 0) believed.slowdown[d] = measured_sum[d] / measured_count[d];
                std::fill(measured_sum.begin(), measured_sum.end(), 0.0);
                std::fill(measured_count.begin(), measured_count.end(), 0u);
                for (const auto& [key, sample] : link_samples) {
                    const double factor = sample.first / sample.second;
                    if (factor == 1.0)
                        believed.link_factor.erase(key);
                    else
                        believed.link_factor[key] = factor;
                }
                link_samples.clear();
            }
        }
    }
    return out;
}

}  // namespace dpart
