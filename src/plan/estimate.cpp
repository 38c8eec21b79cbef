#include "dpart/plan/estimate.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <map>
#include <numeric>
#include <optional>
#include <tuple>
#include <unordered_set>

#include "dpart/core/checked.hpp"

namespace dpart {

std::string_view to_string(Objective o) noexcept { return o == Objective::throughput ? "throughput" : "iteration"; }

namespace {

/// Each layer's last consumer (itself when no later layer reads it).
std::vector<std::size_t> last_uses(const Model& model) {
    const std::size_t L = model.layers.size();
    std::vector<std::size_t> last_use(L, 0);
    for (std::size_t i = 0; i < L; ++i) {
        last_use[i] = std::max(last_use[i], i);
        const Layer& l = model.layers[i];
        if (l.inputs.empty() && i > 0) continue;
        for (std::size_t j : l.inputs) last_use[j] = std::max(last_use[j], i);
    }
    return last_use;
}

std::vector<std::uint64_t> cut_bytes(const Model& model, const std::vector<std::size_t>& last_use) {
    // Layer i's output crosses every cut k with i < k <= (its last consumer).
    std::vector<std::uint64_t> cuts(model.layers.size() + 1, 0);
    for (std::size_t i = 0; i < model.layers.size(); ++i)
        for (std::size_t k = i + 1; k <= last_use[i]; ++k) cuts[k] = checked_add(cuts[k], model.layers[i].cost.out_bytes);
    return cuts;
}

}  // namespace

std::vector<std::uint64_t> cut_bytes(const Model& model) { return cut_bytes(model, last_uses(model)); }

ModelCuts model_cuts(const Model& model) {
    const std::vector<std::size_t> last_use = last_uses(model);
    ModelCuts m{cut_bytes(model, last_use), std::vector<std::uint64_t>(model.layers.size(), 0)};
    for (std::size_t k = 0; k < model.layers.size(); ++k) {
        const std::uint64_t own = last_use[k] > k ? model.layers[k].cost.out_bytes : 0;
        m.pending[k] = m.cuts[k + 1] - own;  // own is one of the tensors crossing cut k + 1
    }
    return m;
}

std::vector<std::uint64_t> replica_shares(std::uint64_t samples, const std::vector<double>& speeds) {
    const std::size_t r = speeds.size();
    if (r == 0 || samples < r) return {};
    if (std::all_of(speeds.begin(), speeds.end(), [&](double x) { return x == speeds.front(); })) {
        // Equal speeds: what largest remainder gives, in closed form.
        std::vector<std::uint64_t> shares(r, samples / r);
        for (std::size_t k = 0; k < samples % r; ++k) ++shares[k];
        return shares;
    }
    // One sample each, the rest in proportion to speed (largest remainder).
    const double total = std::accumulate(speeds.begin(), speeds.end(), 0.0);
    const std::uint64_t extra = samples - r;
    std::vector<std::uint64_t> shares(r, 1);
    std::vector<std::pair<double, std::size_t>> remainders;
    std::uint64_t given = 0;
    for (std::size_t k = 0; k < r; ++k) {
        const double exact = static_cast<double>(extra) * speeds[k] / total;
        const auto whole = static_cast<std::uint64_t>(std::floor(exact));
        shares[k] += whole;
        given += whole;
        remainders.push_back({exact - static_cast<double>(whole), k});
    }
    std::stable_sort(remainders.begin(), remainders.end(),
                     [](const auto& a, const auto& b) { return a.first > b.first; });
    for (std::size_t i = 0; given < extra; ++i, ++given) ++shares[remainders[i % r].second];
    return shares;
}

std::uint64_t in_flight(ScheduleKind schedule, std::size_t stage, std::size_t stages, std::uint64_t microbatches) noexcept {
    if (schedule == ScheduleKind::gpipe) return microbatches;
    return std::min<std::uint64_t>(stages - stage, microbatches);
}

StageMemory stage_memory(const Model& model, const StageMemoryInput& in, const CostOptions& options,
                         const ModelCuts* cuts) {
    ModelCuts own;
    if (cuts == nullptr) {
        own = model_cuts(model);
        cuts = &own;
    }
    StageMemory m;
    std::uint64_t saved = 0, workspace = 0;
    for (std::size_t l = in.first_layer; l <= in.last_layer; ++l) {
        const Layer& layer = model.layers[l];
        const bool split = in.tp > 1 && tp_splits(layer.op, options.vocab_parallel);
        const std::uint64_t params = held_params(layer, model.dtype);
        m.params = checked_add(m.params, split ? (params + in.tp - 1) / in.tp : params);
        saved = checked_add(saved, saved_per_rank(layer, in.tp, options.fused_attention, options.vocab_parallel));
        workspace = std::max(workspace, checked_add(workspace_per_rank(layer, model.dtype, in.tp, options.fused_attention,
                                                                       options.vocab_parallel),
                                                    cuts->pending[l]));
    }
    m.workspace_bytes = checked_mul(in.share, workspace);
    m.state_bytes = state_bytes(m.params, options, model.dtype, in.replicas);
    if (m.state_bytes == UINT64_MAX) throw OverflowError("value overflows 64 bits");
    if (options.recompute) {
        // Keep each in-flight microbatch's stage input; recompute one microbatch at a time.
        const std::uint64_t input = in.first_layer == 0 ? 0 : cuts->cuts[in.first_layer];
        m.activation_bytes = checked_add(checked_product({in.in_flight, in.share, input}), checked_mul(in.share, saved));
    } else {
        m.activation_bytes = checked_product({in.in_flight, in.share, saved});
    }
    return m;
}

void validate_plan(const Plan& plan, const Model& model, const Cluster& cluster) {
    const std::size_t L = model.layers.size();
    if (plan.stages.empty()) throw InputError(plan.where, "the plan has no stages");
    if (plan.microbatch_size == 0 || plan.microbatches == 0)
        throw InputError(plan.where, "microbatch_size and microbatches must be positive");
    std::uint64_t batch = 0;
    try {
        batch = checked_mul(plan.microbatch_size, plan.microbatches);
    } catch (const OverflowError&) {
        throw InputError(plan.where, "microbatch_size x microbatches overflows 64 bits");
    }
    if (batch != model.global_batch)
        throw InputError(plan.where, fmt::format("microbatch_size {} x microbatches {} = {} samples, but the model's "
                                                 "global_batch is {}",
                                                 plan.microbatch_size, plan.microbatches, batch, model.global_batch));
    std::size_t next = 0;
    std::unordered_set<std::size_t> used;
    for (std::size_t s = 0; s < plan.stages.size(); ++s) {
        const Stage& st = plan.stages[s];
        const std::string ctx = fmt::format("stage {}", s);
        if (st.first_layer != next && s == 0)
            throw InputError(st.where, fmt::format("{}: first_layer is {} but the first stage starts at layer 0 "
                                                   "(stages must cover the layers in order, each once)",
                                                   ctx, st.first_layer));
        if (st.first_layer != next)
            throw InputError(st.where, fmt::format("{}: first_layer is {} but the previous stage ends at layer {} "
                                                   "(stages must cover the layers in order, each once)",
                                                   ctx, st.first_layer, next - 1));
        if (st.last_layer < st.first_layer || st.last_layer >= L)
            throw InputError(st.where, fmt::format("{}: last_layer {} is outside {}..{}", ctx, st.last_layer,
                                                   st.first_layer, L - 1));
        next = st.last_layer + 1;
        if (st.devices.empty()) throw InputError(st.where, fmt::format("{}: no devices", ctx));
        if (st.tp == 0 || st.devices.size() % st.tp != 0)
            throw InputError(st.where, fmt::format("{}: {} devices cannot form tensor-parallel groups of {}", ctx,
                                                   st.devices.size(), st.tp));
        for (std::size_t i = 0; i < st.devices.size(); ++i) {
            const std::size_t d = st.devices[i];
            if (d >= cluster.devices.size()) throw InputError(st.where, fmt::format("{}: no device {}", ctx, d));
            if (!used.insert(d).second)
                throw InputError(st.where, fmt::format("{}: device \"{}\" appears more than once in the plan", ctx,
                                                       cluster.devices[d].name));
            if (i % st.tp != 0 && cluster.devices[d].node != cluster.devices[st.devices[i - i % st.tp]].node)
                throw InputError(st.where, fmt::format("{}: the tensor-parallel group of \"{}\" and \"{}\" spans nodes "
                                                       "\"{}\" and \"{}\" (tensor parallelism stays inside a node)",
                                                       ctx, cluster.devices[st.devices[i - i % st.tp]].name,
                                                       cluster.devices[d].name,
                                                       cluster.nodes[cluster.devices[st.devices[i - i % st.tp]].node].name,
                                                       cluster.nodes[cluster.devices[d].node].name));
        }
        if (plan.microbatch_size < st.replicas())
            throw InputError(st.where, fmt::format("{}: {} replicas need a microbatch of at least {} samples, got {}",
                                                   ctx, st.replicas(), st.replicas(), plan.microbatch_size));
    }
    if (next != L)
        throw InputError(plan.where, fmt::format("the stages end at layer {} but the model has {} layers", next - 1, L));
}

namespace {

/// Replica speeds (the slowest device of each tensor-parallel group) and their first devices.
void replicas_of(const Stage& st, const CostModel& cost, std::vector<double>& speeds, std::vector<std::size_t>& leaders) {
    speeds.clear();
    leaders.clear();
    for (std::size_t k = 0; k < st.replicas(); ++k) {
        double slowest = cost.device_speed(st.devices[k * st.tp]);
        for (std::uint32_t t = 1; t < st.tp; ++t) slowest = std::min(slowest, cost.device_speed(st.devices[k * st.tp + t]));
        speeds.push_back(slowest);
        leaders.push_back(st.devices[k * st.tp]);
    }
}

std::uint64_t capacity_of(const Stage& st, const Cluster& cluster) {
    std::uint64_t capacity = UINT64_MAX;
    for (std::size_t d : st.devices) capacity = std::min(capacity, cluster.devices[d].mem_bytes());
    return capacity;
}

}  // namespace

std::vector<MemoryShortfall> memory_shortfalls(const Plan& plan, const PlanEstimate& estimate, const Cluster& cluster) {
    // One memory per whole device, one per GPU of a node for its partitions.
    std::map<std::tuple<bool, std::size_t, std::size_t>, MemoryShortfall> memories;
    const auto key = [&](std::size_t d) {
        const Device& dev = cluster.devices.at(d);
        return dev.partition ? std::make_tuple(true, dev.node, static_cast<std::size_t>(dev.partition->gpu))
                             : std::make_tuple(false, d, std::size_t{0});
    };
    for (std::size_t d = 0; d < cluster.devices.size(); ++d) {
        MemoryShortfall& m = memories[key(d)];
        m.devices.push_back(d);
        m.capacity = checked_add(m.capacity, cluster.devices[d].mem_bytes());
    }
    for (std::size_t s = 0; s < plan.stages.size() && s < estimate.stages.size(); ++s)
        for (std::size_t d : plan.stages[s].devices) {
            MemoryShortfall& m = memories[key(d)];
            m.needed = checked_add(m.needed, estimate.stages[s].memory.total());
        }
    std::vector<MemoryShortfall> out;
    for (auto& [k, m] : memories)
        if (m.needed > m.capacity) out.push_back(std::move(m));
    return out;
}

bool plan_fits(const Plan& plan, const Model& model, const Cluster& cluster, const CostModel& cost,
               const CostOptions& options) {
    std::vector<double> speeds;
    std::vector<std::size_t> leaders;
    const ModelCuts cuts = model_cuts(model);
    for (std::size_t s = 0; s < plan.stages.size(); ++s) {
        const Stage& st = plan.stages[s];
        replicas_of(st, cost, speeds, leaders);
        const auto shares = replica_shares(plan.microbatch_size, speeds);
        const StageMemoryInput in{st.first_layer, st.last_layer, st.tp, st.replicas(),
                                  *std::max_element(shares.begin(), shares.end()),
                                  in_flight(plan.schedule, s, plan.stages.size(), plan.microbatches)};
        if (stage_memory(model, in, options, &cuts).total() > capacity_of(st, cluster))
            return false;
    }
    return true;
}

void assign_shared_links(const Plan& plan, const Cluster& cluster, std::vector<StageEstimate>& stages) {
    const std::size_t S = plan.stages.size();
    // (sending node, receiving node) of each inter-node send; per stage: activation, gradient.
    std::vector<std::array<std::optional<std::pair<std::size_t, std::size_t>>, 2>> key(S);
    std::map<std::pair<std::size_t, std::size_t>, int> uses;
    auto inter = [&](std::size_t a, std::size_t b) -> std::optional<std::pair<std::size_t, std::size_t>> {
        const std::size_t na = cluster.devices[a].node, nb = cluster.devices[b].node;
        if (na == nb) return std::nullopt;
        return std::make_pair(na, nb);
    };
    for (std::size_t s = 0; s < S; ++s) {
        const Stage& st = plan.stages[s];
        if (s + 1 < S) key[s][0] = inter(st.devices.back(), plan.stages[s + 1].devices.front());
        if (s > 0) key[s][1] = inter(st.devices.front(), plan.stages[s - 1].devices.back());
        for (const auto& k : key[s])
            if (k) ++uses[*k];
    }
    std::map<std::pair<std::size_t, std::size_t>, std::uint32_t> ids;
    for (const auto& [k, n] : uses)
        if (n > 1) ids.emplace(k, static_cast<std::uint32_t>(ids.size()));
    for (std::size_t s = 0; s < S; ++s) {
        stages[s].activation_link = key[s][0] && ids.count(*key[s][0]) ? ids.at(*key[s][0]) : private_link;
        stages[s].gradient_link = key[s][1] && ids.count(*key[s][1]) ? ids.at(*key[s][1]) : private_link;
    }
}

PassSeconds pass_seconds(const CostModel& cost, std::size_t first, std::size_t last, std::size_t device,
                         std::uint64_t samples, std::uint32_t tp, bool recompute) {
    PassSeconds p;
    for (std::size_t l = first; l <= last; ++l) {
        p.forward += cost.layer_seconds(l, Pass::forward, device, samples, tp);
        p.backward += cost.layer_seconds(l, Pass::backward, device, samples, tp);
    }
    if (recompute) p.backward += p.forward;  // backward runs the stage's forward again first
    return p;
}

PlanEstimate estimate_plan(const Plan& plan, const Model& model, const Cluster& cluster, const CostModel& cost,
                           const CostOptions& given) {
    // A plan made with --recompute is estimated (and run) with it, whatever the caller's options.
    CostOptions options = given;
    options.recompute = options.recompute || plan.recompute;
    options.shard_optimizer = options.shard_optimizer || plan.shard_optimizer;
    options.fused_attention = options.fused_attention || plan.fused_attention;
    options.vocab_parallel = options.vocab_parallel || plan.vocab_parallel;
    validate_plan(plan, model, cluster);
    const std::size_t S = plan.stages.size();
    const std::uint64_t M = plan.microbatches;
    const ModelCuts model_cut = model_cuts(model);
    const std::vector<std::uint64_t>& cuts = model_cut.cuts;
    PlanEstimate est;
    est.stages.resize(S);
    std::vector<StageDurations> durations(S);
    for (std::size_t s = 0; s < S; ++s) {
        const Stage& st = plan.stages[s];
        StageEstimate& e = est.stages[s];
        const std::size_t r = st.replicas();
        std::vector<double> speeds;
        std::vector<std::size_t> leaders;
        replicas_of(st, cost, speeds, leaders);
        e.shares = replica_shares(plan.microbatch_size, speeds);
        const std::uint64_t max_share = *std::max_element(e.shares.begin(), e.shares.end());
        for (std::size_t k = 0; k < r; ++k) {
            double f = 0, b = 0;
            for (std::uint32_t t = 0; t < st.tp; ++t) {
                const PassSeconds p = pass_seconds(cost, st.first_layer, st.last_layer, st.devices[k * st.tp + t],
                                                   e.shares[k], st.tp, options.recompute);
                f = std::max(f, p.forward);
                b = std::max(b, p.backward);
            }
            e.replica_forward_s.push_back(f);
            e.replica_backward_s.push_back(b);
            e.forward_s = std::max(e.forward_s, f);
            e.backward_s = std::max(e.backward_s, b);
        }
        if (s + 1 < S)
            e.send_activation_s =
                cost.transfer_seconds(st.devices.back(), plan.stages[s + 1].devices.front(), cuts[st.last_layer + 1] * max_share);
        if (s > 0)
            e.send_gradient_s =
                cost.transfer_seconds(st.devices.front(), plan.stages[s - 1].devices.back(), cuts[st.first_layer] * max_share);

        StageMemoryInput in{st.first_layer, st.last_layer, st.tp, r, max_share, in_flight(plan.schedule, s, S, M)};
        e.memory = stage_memory(model, in, options, &model_cut);
        e.allreduce_s = cost.allreduce_seconds(leaders, e.memory.params * gradient_value_bytes(options, model.dtype));
        const std::uint64_t stepped = optimizer_params(e.memory.params, r, options.shard_optimizer);
        for (std::size_t d : st.devices) e.optimizer_s = std::max(e.optimizer_s, cost.optimizer_seconds(d, stepped));
        e.sharded_optimizer = options.shard_optimizer && r > 1;
        const double allreduce = exposed_allreduce(e.allreduce_s, e.backward_s, options.overlap_allreduce, e.sharded_optimizer);
        e.stage_s = e.forward_s + e.backward_s + e.send_activation_s + e.send_gradient_s +
                    (allreduce + e.optimizer_s) / static_cast<double>(M);
        e.capacity_bytes = capacity_of(st, cluster);
        if (e.memory.total() > e.capacity_bytes) est.fits = false;
        for (std::size_t l = st.first_layer; l <= st.last_layer; ++l)
            e.flops_per_iteration += static_cast<double>(model.layers[l].cost.fwd_flops + model.layers[l].cost.bwd_flops) *
                                     static_cast<double>(model.global_batch);
        durations[s] = {e.forward_s,  e.backward_s,  e.send_activation_s,  e.send_gradient_s,
                        e.allreduce_s, e.optimizer_s, e.sharded_optimizer};
        if (e.stage_s > est.bottleneck_s) {
            est.bottleneck_s = e.stage_s;
            est.bottleneck_stage = s;
        }
    }
    assign_shared_links(plan, cluster, est.stages);
    for (std::size_t s = 0; s < S; ++s) {
        durations[s].activation_link = est.stages[s].activation_link;
        durations[s].gradient_link = est.stages[s].gradient_link;
    }
    est.graph = build_schedule(plan.schedule, durations, static_cast<std::uint32_t>(M), options.overlap_allreduce);
    est.timeline = simulate(est.graph);
    est.iteration_s = est.timeline.makespan;
    est.samples_per_s = static_cast<double>(model.global_batch) / est.iteration_s;
    double busy = 0;
    for (const auto& e : est.stages) busy += static_cast<double>(M) * (e.forward_s + e.backward_s);
    est.bubble_fraction = 1.0 - busy / (static_cast<double>(S) * est.iteration_s);
    return est;
}

}  // namespace dpart
