#include "dpart/sim/schedule.hpp"

#include <algorithm>
#include <functional>
#include <queue>
#include <stdexcept>

namespace dpart {

std::string_view to_string(ScheduleKind s) noexcept { return s == ScheduleKind::gpipe ? "gpipe" : "1f1b"; }

std::string_view to_string(TaskKind k) noexcept {
    switch (k) {
        case TaskKind::forward: return "forward";
        case TaskKind::backward: return "backward";
        case TaskKind::send_activation: return "send_activation";
        case TaskKind::send_gradient: return "send_gradient";
        case TaskKind::allreduce: return "allreduce";
        case TaskKind::optimizer: return "optimizer";
    }
    return "?";
}

std::vector<StageStep> stage_order(ScheduleKind schedule, std::uint32_t stage, std::uint32_t stages,
                                   std::uint32_t microbatches) {
    std::vector<StageStep> order;
    order.reserve(2 * static_cast<std::size_t>(microbatches));
    if (schedule == ScheduleKind::gpipe) {
        for (std::uint32_t m = 0; m < microbatches; ++m) order.push_back({true, m});
        for (std::uint32_t m = 0; m < microbatches; ++m) order.push_back({false, m});
        return order;
    }
    // 1F1B (PipeDream-flush, Megatron's non-interleaved schedule): warm up with as many
    // forwards as stages after this one, then alternate one forward and one backward, then drain.
    const std::uint32_t warmup = std::min(stages - stage - 1, microbatches);
    std::uint32_t f = 0, b = 0;
    for (; f < warmup; ++f) order.push_back({true, f});
    while (f < microbatches) {
        order.push_back({true, f++});
        order.push_back({false, b++});
    }
    while (b < microbatches) order.push_back({false, b++});
    return order;
}

TaskGraph build_schedule(ScheduleKind schedule, const std::vector<StageDurations>& stages, std::uint32_t microbatches,
                         bool overlap_allreduce) {
    if (stages.empty() || microbatches == 0) throw std::invalid_argument("a schedule needs stages and microbatches");
    const auto S = static_cast<std::uint32_t>(stages.size());
    const std::uint32_t M = microbatches;
    TaskGraph g;
    g.schedule = schedule;
    g.stages = S;
    g.microbatches = M;
    // Resources: stage s -> s; forward link s -> S + s; backward link s (sending to s-1) -> 2S + s.
    for (std::uint32_t s = 0; s < S; ++s) g.resources.push_back({Resource::Kind::stage, s});
    for (std::uint32_t s = 0; s < S; ++s) g.resources.push_back({Resource::Kind::forward_link, s});
    for (std::uint32_t s = 0; s < S; ++s) g.resources.push_back({Resource::Kind::backward_link, s});
    // Shared links after those, one resource per link id.
    std::vector<std::pair<std::uint32_t, std::uint32_t>> shared;  // link id -> resource
    auto link_resource = [&](std::uint32_t id, std::uint32_t own) {
        if (id == private_link) return own;
        for (const auto& [link, r] : shared)
            if (link == id) return r;
        const auto r = static_cast<std::uint32_t>(g.resources.size());
        g.resources.push_back({Resource::Kind::shared_link, id});
        shared.push_back({id, r});
        return r;
    };

    constexpr std::uint32_t none = UINT32_MAX;
    const std::size_t cells = static_cast<std::size_t>(S) * M;
    std::vector<std::uint32_t> fwd(cells, none), bwd(cells, none), act(cells, none), grad(cells, none);
    auto at = [M](std::uint32_t s, std::uint32_t m) { return static_cast<std::size_t>(s) * M + m; };
    std::vector<std::uint32_t> send_act(S), send_grad(S);
    for (std::uint32_t s = 0; s < S; ++s) {
        send_act[s] = link_resource(stages[s].activation_link, S + s);
        send_grad[s] = link_resource(stages[s].gradient_link, 2 * S + s);
    }
    std::vector<std::uint32_t> last_on(g.resources.size(), none);

    g.tasks.reserve(4 * cells + 2 * S);
    auto add = [&](TaskKind kind, std::uint32_t s, std::uint32_t m, std::uint32_t resource, double duration,
                   std::initializer_list<std::uint32_t> deps) {
        Task t;
        t.kind = kind;
        t.stage = s;
        t.microbatch = m;
        t.resource = resource;
        t.duration = duration;
        for (std::uint32_t d : deps)
            if (d != none) t.add_dep(d);
        if (!g.resources[resource].shared() && last_on[resource] != none &&
            (t.deps == 0 || t.dep[t.deps - 1] != last_on[resource]))
            t.add_dep(last_on[resource]);
        const auto id = static_cast<std::uint32_t>(g.tasks.size());
        g.tasks.push_back(std::move(t));
        last_on[resource] = id;
        return id;
    };

    // Emit tasks in a topological order by repeatedly advancing every stage as far as its
    // dependencies allow (each stage runs its steps in the fixed order of the schedule).
    std::vector<std::vector<StageStep>> orders(S);
    std::vector<std::size_t> next(S, 0);
    for (std::uint32_t s = 0; s < S; ++s) orders[s] = stage_order(schedule, s, S, M);
    std::size_t remaining = 2 * cells;
    while (remaining > 0) {
        bool progressed = false;
        for (std::uint32_t s = 0; s < S; ++s) {
            while (next[s] < orders[s].size()) {
                const StageStep step = orders[s][next[s]];
                const std::uint32_t m = step.microbatch;
                if (step.forward) {
                    if (s > 0 && act[at(s - 1, m)] == none) break;
                    fwd[at(s, m)] = add(TaskKind::forward, s, m, s, stages[s].forward, {s > 0 ? act[at(s - 1, m)] : none});
                    if (s + 1 < S)
                        act[at(s, m)] = add(TaskKind::send_activation, s, m, send_act[s], stages[s].send_activation,
                                            {fwd[at(s, m)]});
                } else {
                    if (s + 1 < S && grad[at(s + 1, m)] == none) break;
                    // Its forward ran earlier on the same stage: the resource order implies it.
                    bwd[at(s, m)] = add(TaskKind::backward, s, m, s, stages[s].backward,
                                        {s + 1 < S ? grad[at(s + 1, m)] : none});
                    if (s > 0)
                        grad[at(s, m)] = add(TaskKind::send_gradient, s, m, send_grad[s], stages[s].send_gradient,
                                             {bwd[at(s, m)]});
                }
                ++next[s];
                --remaining;
                progressed = true;
            }
        }
        if (!progressed) throw std::logic_error("schedule deadlock: the stage orders are inconsistent");
    }
    for (std::uint32_t s = 0; s < S; ++s) {
        // The all-reduce runs on the replicas' own links after the stage's last backward; the
        // optimizer step needs the reduced gradients.
        const std::uint32_t last_backward = last_on[s];
        double allreduce = stages[s].allreduce;
        allreduce = exposed_allreduce(allreduce, stages[s].backward, overlap_allreduce, stages[s].sharded);
        Task ar;
        ar.kind = TaskKind::allreduce;
        ar.stage = s;
        ar.resource = s;
        ar.duration = allreduce;
        ar.add_dep(last_backward);
        g.tasks.push_back(ar);
        last_on[s] = static_cast<std::uint32_t>(g.tasks.size() - 1);
        Task opt;
        opt.kind = TaskKind::optimizer;
        opt.stage = s;
        opt.resource = s;
        opt.duration = stages[s].optimizer;
        opt.add_dep(last_on[s]);
        g.tasks.push_back(opt);
        last_on[s] = static_cast<std::uint32_t>(g.tasks.size() - 1);
    }
    return g;
}

namespace {

/// Event-driven: tasks start in the order they become ready, so that a shared link serves
/// transfers first come first served (ties: the lower task index). Ready times never go back
/// (a task becomes ready when its last dependency ends, never before the task popped now).
Timeline simulate_shared(const TaskGraph& graph) {
    const std::size_t n = graph.tasks.size();
    Timeline t;
    t.start.assign(n, 0);
    t.end.assign(n, 0);
    std::vector<std::uint32_t> waiting(n), first(n + 1, 0), succ;
    for (std::size_t i = 0; i < n; ++i) {
        waiting[i] = graph.tasks[i].deps;
        for (std::uint8_t k = 0; k < graph.tasks[i].deps; ++k) ++first[graph.tasks[i].dep[k] + 1];
    }
    for (std::size_t i = 0; i < n; ++i) first[i + 1] += first[i];
    succ.resize(first[n]);
    std::vector<std::uint32_t> fill(first.begin(), first.end() - 1);
    for (std::size_t i = 0; i < n; ++i)
        for (std::uint8_t k = 0; k < graph.tasks[i].deps; ++k)
            succ[fill[graph.tasks[i].dep[k]]++] = static_cast<std::uint32_t>(i);
    std::vector<double> ready(n, 0), free(graph.resources.size(), 0);
    using Entry = std::pair<double, std::uint32_t>;
    std::priority_queue<Entry, std::vector<Entry>, std::greater<>> queue;
    for (std::size_t i = 0; i < n; ++i)
        if (waiting[i] == 0) queue.push({0.0, static_cast<std::uint32_t>(i)});
    while (!queue.empty()) {
        const auto [at, i] = queue.top();
        queue.pop();
        const Task& task = graph.tasks[i];
        double start = at;
        if (graph.resources[task.resource].shared()) {
            start = std::max(start, free[task.resource]);
            free[task.resource] = start + task.duration;
        }
        t.start[i] = start;
        t.end[i] = start + task.duration;
        t.makespan = std::max(t.makespan, t.end[i]);
        for (std::uint32_t k = first[i]; k < first[i + 1]; ++k) {
            const std::uint32_t j = succ[k];
            ready[j] = std::max(ready[j], t.end[i]);
            if (--waiting[j] == 0) queue.push({ready[j], j});
        }
    }
    return t;
}

}  // namespace

Timeline simulate(const TaskGraph& graph) {
    if (std::any_of(graph.resources.begin(), graph.resources.end(), [](const Resource& r) { return r.shared(); }))
        return simulate_shared(graph);
    Timeline t;
    t.start.resize(graph.tasks.size());
    t.end.resize(graph.tasks.size());
    for (std::size_t i = 0; i < graph.tasks.size(); ++i) {
        double ready = 0;
        const Task& task = graph.tasks[i];
        for (std::uint8_t k = 0; k < task.deps; ++k) ready = std::max(ready, t.end[task.dep[k]]);
        t.start[i] = ready;
        t.end[i] = ready + graph.tasks[i].duration;
        t.makespan = std::max(t.makespan, t.end[i]);
    }
    return t;
}

}  // namespace dpart

namespace dpart {

std::vector<std::uint32_t> peak_in_flight(const TaskGraph& graph, const Timeline& timeline) {
    // Events per stage: +1 when a forward starts (its activations begin to accumulate), -1 when
    // its backward ends. At equal times releases come first.
    std::vector<std::vector<std::pair<double, int>>> events(graph.stages);
    for (std::size_t i = 0; i < graph.tasks.size(); ++i) {
        const Task& t = graph.tasks[i];
        if (t.kind == TaskKind::forward) events[t.stage].push_back({timeline.start[i], +1});
        if (t.kind == TaskKind::backward) events[t.stage].push_back({timeline.end[i], -1});
    }
    std::vector<std::uint32_t> peak(graph.stages, 0);
    for (std::uint32_t s = 0; s < graph.stages; ++s) {
        std::sort(events[s].begin(), events[s].end());
        int level = 0;
        for (const auto& [time, delta] : events[s]) {
            level += delta;
            peak[s] = std::max<std::uint32_t>(peak[s], static_cast<std::uint32_t>(std::max(level, 0)));
        }
    }
    return peak;
}

}  // namespace dpart
