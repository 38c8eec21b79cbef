// The adaptive job: segments of the executor, a controller between them, migrations, snapshots
// and neighbour copies, and recovery from a device that leaves.
#include "dpart/runtime/adaptive.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <exception>
#include <map>
#include <thread>

#include "dpart/core/error.hpp"
#include "dpart/plan/estimate.hpp"

namespace dpart::rt {

double AdaptiveResult::total_s() const {
    double s = 0;
    for (const AdaptiveIteration& it : iterations) s += it.seconds;
    return s;
}

namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// --- Messages ------------------------------------------------------------------------------
void put_u64(Bytes& b, std::uint64_t v) { append_value(b, v); }
void put_f64(Bytes& b, double v) { append_value(b, v); }
void put_text(Bytes& b, const std::string& s) {
    put_u64(b, s.size());
    append(b, std::span<const char>(s.data(), s.size()));
}
std::uint64_t get_u64(Reader& r) { return r.value<std::uint64_t>(); }
double get_f64(Reader& r) { return r.value<double>(); }
std::string get_text(Reader& r) {
    std::string s(get_u64(r), '\0');
    r.read_into(std::span<char>(s.data(), s.size()));
    return s;
}

void put_plan(Bytes& b, const Plan& p) {
    put_u64(b, static_cast<std::uint64_t>(p.objective));
    put_u64(b, static_cast<std::uint64_t>(p.schedule));
    put_u64(b, p.microbatch_size);
    put_u64(b, p.microbatches);
    // How it runs: recompute, ZeRO-1, the memory options it was planned with, its precision.
    put_u64(b, (p.recompute ? 1u : 0u) | (p.shard_optimizer ? 2u : 0u) | (p.fused_attention ? 4u : 0u) |
                   (p.vocab_parallel ? 8u : 0u));
    put_u64(b, p.precision ? static_cast<std::uint64_t>(*p.precision) + 1 : 0);
    put_u64(b, p.stages.size());
    for (const Stage& st : p.stages) {
        put_u64(b, st.first_layer);
        put_u64(b, st.last_layer);
        put_u64(b, st.tp);
        put_u64(b, st.devices.size());
        for (std::size_t d : st.devices) put_u64(b, d);
    }
}
Plan get_plan(Reader& r) {
    Plan p;
    p.objective = static_cast<Objective>(get_u64(r));
    p.schedule = static_cast<ScheduleKind>(get_u64(r));
    p.microbatch_size = get_u64(r);
    p.microbatches = get_u64(r);
    const std::uint64_t flags = get_u64(r);
    p.recompute = (flags & 1u) != 0;
    p.shard_optimizer = (flags & 2u) != 0;
    p.fused_attention = (flags & 4u) != 0;
    p.vocab_parallel = (flags & 8u) != 0;
    if (const std::uint64_t precision = get_u64(r); precision != 0) p.precision = static_cast<DType>(precision - 1);
    p.stages.resize(get_u64(r));
    for (Stage& st : p.stages) {
        st.first_layer = get_u64(r);
        st.last_layer = get_u64(r);
        st.tp = static_cast<std::uint32_t>(get_u64(r));
        st.devices.resize(get_u64(r));
        for (std::size_t& d : st.devices) d = get_u64(r);
    }
    return p;
}

void put_state(Bytes& b, const ShardState& s) {
    put_u64(b, s.params.size());
    append(b, std::span<const float>(s.params));
    append(b, std::span<const float>(s.m));
    append(b, std::span<const float>(s.v));
}
ShardState get_state(Reader& r) {
    ShardState s;
    const std::uint64_t n = get_u64(r);
    s.params.resize(n);
    s.m.resize(n);
    s.v.resize(n);
    r.read_into(std::span<float>(s.params));
    r.read_into(std::span<float>(s.m));
    r.read_into(std::span<float>(s.v));
    return s;
}

/// A layer's state held by an agent, and which shard of it.
struct Held {
    Shard shard;
    ShardState state;
};
using Holding = std::map<std::size_t, Held>;  // layer -> state

std::uint64_t holding_bytes(const Held& h) { return 3 * sizeof(float) * h.state.params.size(); }

void put_holding(Bytes& b, const Holding& h) {
    put_u64(b, h.size());
    for (const auto& [layer, held] : h) {
        put_u64(b, layer);
        put_u64(b, held.shard.rank);
        put_u64(b, held.shard.size);
        put_state(b, held.state);
    }
}
Holding get_holding(Reader& r) {
    Holding h;
    const std::uint64_t n = get_u64(r);
    for (std::uint64_t i = 0; i < n; ++i) {
        const std::uint64_t layer = get_u64(r);
        Held held;
        held.shard.rank = static_cast<std::uint32_t>(get_u64(r));
        held.shard.size = static_cast<std::uint32_t>(get_u64(r));
        held.state = get_state(r);
        h.emplace(layer, std::move(held));
    }
    return h;
}

void put_decision(Bytes& b, const Decision& d) {
    put_u64(b, d.iteration);
    put_u64(b, d.plan ? 1 : 0);
    if (d.plan) put_plan(b, *d.plan);
    put_u64(b, d.rollback ? 1 : 0);
    if (d.rollback) put_u64(b, *d.rollback);
    put_u64(b, d.failed.size());
    for (std::size_t x : d.failed) put_u64(b, x);
    put_u64(b, d.detected.size());
    for (const auto& [dev, f] : d.detected) {
        put_u64(b, dev);
        put_f64(b, f);
    }
    put_u64(b, d.restored_from.size());
    for (const auto& [lost, kept] : d.restored_from) {
        put_u64(b, lost);
        put_u64(b, kept);
    }
    put_u64(b, d.probe.size());
    for (std::size_t x : d.probe) put_u64(b, x);
    put_f64(b, d.solve_s);
    put_text(b, d.text);
    put_text(b, d.stop);
}
Decision get_decision(Reader& r) {
    Decision d;
    d.iteration = get_u64(r);
    if (get_u64(r) != 0) d.plan = get_plan(r);
    if (get_u64(r) != 0) d.rollback = get_u64(r);
    d.failed.resize(get_u64(r));
    for (std::size_t& x : d.failed) x = get_u64(r);
    d.detected.resize(get_u64(r));
    for (auto& [dev, f] : d.detected) {
        dev = get_u64(r);
        f = get_f64(r);
    }
    d.restored_from.resize(get_u64(r));
    for (auto& [lost, kept] : d.restored_from) {
        lost = get_u64(r);
        kept = get_u64(r);
    }
    d.probe.resize(get_u64(r));
    for (std::size_t& x : d.probe) x = get_u64(r);
    d.solve_s = get_f64(r);
    d.text = get_text(r);
    d.stop = get_text(r);
    return d;
}

/// What an agent did in one segment, and at the boundary after it.
struct Entry {
    std::uint64_t seq = 0;
    std::uint64_t version = 1;
    std::uint64_t first = 0, end = 0;
    std::int64_t worker = -1;  // its worker index in that plan, -1 when it held no stage
    std::size_t agent = 0;
    double boundary_s = 0;     // from the segment's end to the next one's start
    double migration_s = 0;
    std::uint64_t migrated_bytes = 0, copy_bytes = 0;
    WorkerReport report;
};
void put_entries(Bytes& b, const std::vector<Entry>& es) {
    put_u64(b, es.size());
    for (const Entry& e : es) {
        put_u64(b, e.seq);
        put_u64(b, e.version);
        put_u64(b, e.first);
        put_u64(b, e.end);
        put_u64(b, static_cast<std::uint64_t>(e.worker));
        put_u64(b, e.agent);
        put_f64(b, e.boundary_s);
        put_f64(b, e.migration_s);
        put_u64(b, e.migrated_bytes);
        put_u64(b, e.copy_bytes);
        const Bytes rep = serialise_report(e.report);
        put_u64(b, rep.size());
        b.insert(b.end(), rep.begin(), rep.end());
    }
}
std::vector<Entry> get_entries(Reader& r) {
    std::vector<Entry> es(get_u64(r));
    for (Entry& e : es) {
        e.seq = get_u64(r);
        e.version = get_u64(r);
        e.first = get_u64(r);
        e.end = get_u64(r);
        e.worker = static_cast<std::int64_t>(get_u64(r));
        e.agent = get_u64(r);
        e.boundary_s = get_f64(r);
        e.migration_s = get_f64(r);
        e.migrated_bytes = get_u64(r);
        e.copy_bytes = get_u64(r);
        Bytes rep(get_u64(r));
        r.read_into(std::span<std::byte>(rep));
        e.report = deserialise_report(rep, e.agent);
    }
    return es;
}

std::size_t stage_of(const Plan& p, std::size_t layer) {
    for (std::size_t s = 0; s < p.stages.size(); ++s)
        if (layer >= p.stages[s].first_layer && layer <= p.stages[s].last_layer) return s;
    throw RuntimeError(fmt::format("layer {} is in no stage of the plan", layer));
}

// Control tags: iteration = the boundary's sequence number; microbatch = what.
enum Control : std::uint32_t { measure = 0, decision = 1, history = 2, final_state = 3 };
Tag control(std::uint64_t seq, Control what) {
    return {Tag::Kind::control, static_cast<std::uint32_t>(seq), what, 0};
}

class Agent {
public:
    Agent(const AdaptiveJob& job, Transport& net)
        : job_(job), model_(job.model), net_(net), me_(net.rank()), plan_(job.plan), believed_(job.cluster.devices.size(), 1.0) {
        for (const WorkerPlace& p : worker_places(job.plan)) device_of_.push_back(p.device);
        if (net.size() != device_of_.size())
            throw InputError(fmt::format("the plan has {} devices but {} ranks were started (mpirun -np {})",
                                         device_of_.size(), net.size(), device_of_.size()));
        agent_of_.assign(job.cluster.devices.size(), SIZE_MAX);
        for (std::size_t a = 0; a < device_of_.size(); ++a) agent_of_[device_of_[a]] = a;
        alive_.assign(device_of_.size(), true);
        plans_.push_back(plan_);
        const std::int64_t w = worker_index(plan_);
        if (w >= 0) {
            const WorkerPlace p = worker_places(plan_)[static_cast<std::size_t>(w)];
            const Stage& st = plan_.stages[p.stage];
            const Shard shard{static_cast<std::uint32_t>(p.tp_rank), st.tp};
            for (std::size_t l = st.first_layer; l <= st.last_layer; ++l)
                own_[l] = {shard, initial_state(model_, l, shard, job.run.seed)};
        }
    }

    AdaptiveResult run() {
        const std::uint64_t N = job_.run.iterations, W = std::max<std::uint64_t>(1, job_.adaptive.window),
                            K = std::max<std::uint64_t>(1, job_.adaptive.copy_every);
        std::uint64_t it = job_.run.start_iteration;
        refresh(it, 0);
        for (std::uint64_t seq = 0; it < N; ++seq) {
            const std::uint64_t end = std::min({N, (it / W + 1) * W, (it / K + 1) * K});
            Entry entry = run_segment(seq, it, end);
            const auto boundary = Clock::now();
            const std::vector<std::size_t> left = entry.report.left;
            for (std::size_t r : left) alive_.at(r) = false;
            const bool failure = !left.empty();
            const std::uint64_t stop = entry.report.stopped_at;
            history_.push_back(std::move(entry));
            if (!alive_[me_]) {  // this agent's device failed: hand what it recorded over, and leave
                net_.send(coordinator(), control(seq, Control::history), entries_message(history_));
                net_.flush();
                return {};
            }
            for (std::size_t r : left)
                if (me_ == coordinator()) {
                    const Bytes b = net_.recv(r, control(seq, Control::history));
                    Reader in(b);
                    for (Entry& e : get_entries(in)) history_.push_back(std::move(e));
                }
            if (stop == N && !failure) break;
            const Decision d = decide(seq, it, stop, left, stop % W == 0);
            decisions_.push_back(d);
            probing_ = std::find(d.probe.begin(), d.probe.end(), device_of_[me_]) != d.probe.end();
            if (!d.stop.empty()) throw RuntimeError(d.stop);
            Entry& mine = own_entry(seq);
            it = stop;
            if (d.rollback) {
                own_ = snapshot_;
                it = *d.rollback;
            }
            if (d.plan) {
                const auto t0 = Clock::now();
                mine.migrated_bytes = migrate(*d.plan, seq);
                mine.migration_s = since(t0);
                plan_ = *d.plan;
                plans_.push_back(plan_);
            }
            if (d.plan || d.rollback || it % K == 0) mine.copy_bytes = refresh(it, seq + 1);
            mine.boundary_s = since(boundary);
        }
        return finish();
    }

private:
    std::size_t coordinator() const {
        for (std::size_t a = 0; a < alive_.size(); ++a)
            if (alive_[a]) return a;
        throw RuntimeError("every device of the job has failed");
    }
    std::vector<std::size_t> alive_agents() const {
        std::vector<std::size_t> out;
        for (std::size_t a = 0; a < alive_.size(); ++a)
            if (alive_[a]) out.push_back(a);
        return out;
    }
    /// Agent `a`'s worker index in plan `p`, -1 when it holds no stage there.
    std::int64_t worker_index(const Plan& p, std::size_t a) const {
        const auto places = worker_places(p);
        for (std::size_t w = 0; w < places.size(); ++w)
            if (places[w].device == device_of_[a]) return static_cast<std::int64_t>(w);
        return -1;
    }
    std::int64_t worker_index(const Plan& p) const { return worker_index(p, me_); }
    Entry& own_entry(std::uint64_t seq) {
        for (Entry& e : history_)
            if (e.seq == seq && e.agent == me_) return e;
        throw RuntimeError("no record of this segment");
    }
    static Bytes entries_message(const std::vector<Entry>& es) {
        Bytes b;
        put_entries(b, es);
        return b;
    }

    Entry run_segment(std::uint64_t seq, std::uint64_t first, std::uint64_t end) {
        RunOptions ro = job_.run;
        ro.start_iteration = first;
        ro.iterations = end;
        ro.leave_on_failure = true;
        ro.checkpoint_every = 0;
        ro.resume = false;
        RankMap ranks;
        for (const WorkerPlace& p : worker_places(plan_)) ranks.of_worker.push_back(agent_of_.at(p.device));
        ranks.members = alive_agents();
        const PlanEstimate est = estimate_plan(plan_, priced(), job_.cluster, job_.cost, job_.copt);
        const Execution ex(plan_, model_, est, ro, ranks);
        Entry e;
        e.seq = seq;
        e.version = plans_.size();
        e.first = first;
        e.agent = me_;
        e.worker = worker_index(plan_);
        if (e.worker >= 0) {
            std::vector<ShardState> state;
            std::vector<std::size_t> layers;
            for (auto& [l, h] : own_) {
                layers.push_back(l);
                state.push_back(std::move(h.state));
            }
            e.report = ex.run_worker(static_cast<std::size_t>(e.worker), net_, &state);
            for (std::size_t k = 0; k < layers.size(); ++k) own_[layers[k]].state = std::move(state[k]);
            // What the controller compares: its compute against the cost model's for it.
            const WorkerPlace p = ex.places()[static_cast<std::size_t>(e.worker)];
            const StageEstimate& se = est.stages[p.stage];
            predicted_compute_s_ = (static_cast<double>(plan_.microbatches) *
                                        (se.replica_forward_s.at(p.replica) + se.replica_backward_s.at(p.replica)) +
                                    se.optimizer_s) *
                                   static_cast<double>(e.report.stopped_at - first);
            // And, on emulated devices, its sends of activations against theirs: the link to the
            // next stage (the pair of devices a scenario's link event and the planner's scaled
            // cost model name). A real send between host threads is a copy of microseconds whose
            // time says more about the cores than the link: healthy links read up to 39x slow.
            link_.reset();
            if (job_.run.emulate && p.stage + 1 < plan_.stages.size() && se.send_activation_s > 0)
                link_ = SentOver{plan_.stages[p.stage].devices.back(), plan_.stages[p.stage + 1].devices.front(),
                                 se.send_activation_s};
        } else if (probing_ && !plan_.stages.empty()) {
            // The last stage's work (it ends in the loss), unsplit, on this device.
            IdleProbe probe;
            probe.stage = plan_.stages.size() - 1;
            const Stage& st = plan_.stages[probe.stage];
            const PassSeconds p = pass_seconds(job_.cost, st.first_layer, st.last_layer, device_of_[me_],
                                               est.stages[probe.stage].shares.at(0), 1, job_.run.recompute);
            probe.predicted_s = p.forward + p.backward;
            e.report = ex.run_idle(device_of_[me_], net_, &probe);
            predicted_compute_s_ = probe.predicted_s;
        } else {
            e.report = ex.run_idle(device_of_[me_], net_);
            predicted_compute_s_ = 0;
        }
        if (e.worker < 0) link_.reset();
        e.end = e.report.stopped_at;
        return e;
    }

    /// Sends this segment's measurement to the coordinator, which decides; everyone gets the decision.
    Decision decide(std::uint64_t seq, std::uint64_t first, std::uint64_t stop, const std::vector<std::size_t>& left,
                    bool window) {
        const std::size_t c = coordinator();
        Bytes m;
        double measured = 0;
        const Entry& mine = own_entry(seq);
        for (const TaskRecord& t : mine.report.tasks)
            if (t.kind == TaskKind::forward || t.kind == TaskKind::backward || t.kind == TaskKind::optimizer)
                measured += t.end_s - t.start_s;
        // An idle agent's measurement is its probe's, where it ran one to the end: one cut short
        // by the segment's end is only a lower bound, which could read a slow device as healthy
        // (its belief then stays as it is).
        const bool probed = mine.worker < 0 && mine.report.probe_s.has_value() && mine.report.probe_finished &&
                            predicted_compute_s_ > 0;
        if (probed) measured = *mine.report.probe_s;
        put_u64(m, device_of_[me_]);
        put_u64(m, (mine.worker >= 0 && stop > first) ? 1 : probed ? 2 : 0);
        put_f64(m, measured);
        put_f64(m, predicted_compute_s_);
        put_u64(m, copy_of_);
        // The link: per iteration its shortest send, and the median of those over the segment.
        // Noise only lengthens a send (a wait that wakes late, a preemption), while a slow link
        // lengthens every one; the median follows what most of the segment saw.
        std::map<std::uint32_t, double> shortest;  // iteration -> its shortest send
        for (const TaskRecord& t : mine.report.tasks)
            if (t.kind == TaskKind::send_activation) {
                const auto [at, fresh] = shortest.emplace(t.iteration, t.end_s - t.start_s);
                if (!fresh) at->second = std::min(at->second, t.end_s - t.start_s);
            }
        std::vector<double> per_iteration;
        for (const auto& [it, sec] : shortest) per_iteration.push_back(sec);
        std::sort(per_iteration.begin(), per_iteration.end());
        const bool over_link = link_.has_value() && !per_iteration.empty();
        put_u64(m, over_link ? per_iteration.size() : 0);
        put_u64(m, over_link ? link_->a : 0);
        put_u64(m, over_link ? link_->b : 0);
        put_f64(m, over_link ? per_iteration[per_iteration.size() / 2] : 0.0);
        put_f64(m, over_link ? link_->predicted_s : 0.0);
        if (me_ != c) {
            net_.send(c, control(seq, Control::measure), std::move(m));
            const Bytes b = net_.recv(c, control(seq, Control::decision));
            Reader in(b);
            Decision d = get_decision(in);
            holder_.clear();
            for (const auto& [lost, kept] : d.restored_from) holder_[agent_of_.at(lost)] = agent_of_.at(kept);
            return d;
        }
        std::vector<DeviceMeasurement> measurements;
        std::vector<LinkMeasurement> links;
        std::map<std::size_t, std::size_t> holder;  // agent whose copy -> agent holding it
        for (std::size_t a : alive_agents()) {
            const Bytes b = a == me_ ? m : net_.recv(a, control(seq, Control::measure));
            Reader in(b);
            const std::size_t device = get_u64(in);
            const std::uint64_t ran = get_u64(in);  // 0: nothing; 1: its stage; 2: a probe
            const double ms = get_f64(in), ps = get_f64(in);
            const std::uint64_t copy_of = get_u64(in);
            // A probe is timed otherwise than the workers' tasks (thread CPU time on the CPU
            // backend): it is judged against their pace, not part of it.
            if (ran != 0) measurements.push_back({device, ms, ps, ran == 1});
            if (copy_of != SIZE_MAX) holder[copy_of] = a;
            const std::uint64_t sent = get_u64(in);
            LinkMeasurement l;
            l.a = get_u64(in);
            l.b = get_u64(in);
            l.measured_s = get_f64(in);
            l.predicted_s = get_f64(in);
            if (sent > 0) links.push_back(l);
        }
        Decision d = controller(measurements, links, holder, stop, left, window);
        Bytes out;
        put_decision(out, d);
        for (std::size_t a : alive_agents())
            if (a != me_) net_.send(a, control(seq, Control::decision), out);
        return d;
    }

    /// The coordinator's decision (the same rule as replay's adaptive policy).
    Decision controller(const std::vector<DeviceMeasurement>& measurements, const std::vector<LinkMeasurement>& links,
                        const std::map<std::size_t, std::size_t>& holder, std::uint64_t stop,
                        const std::vector<std::size_t>& left, bool window) {
        const bool failure = !left.empty();
        Decision d;
        d.iteration = stop;
        const std::vector<double> before = believed_;
        believed_ = measured_slowdowns(measurements, believed_);
        believed_.resize(job_.cluster.devices.size(), 1.0);
        for (std::size_t dev = 0; dev < believed_.size(); ++dev)
            if (std::abs(believed_[dev] / before[dev] - 1.0) > 0.05) d.detected.push_back({dev, believed_[dev]});
        std::vector<std::string> link_parts;
        for (const auto& [key, factor] : measured_link_factors(links, believed_links_)) {
            const auto was = believed_links_.find(key);
            if (std::abs(factor / (was == believed_links_.end() ? 1.0 : was->second) - 1.0) > 0.05)
                link_parts.push_back(fmt::format("measured link {}-{} x{:.3g}", job_.cluster.devices[key.first].name,
                                            job_.cluster.devices[key.second].name, factor));
            if (factor == 1.0)
                believed_links_.erase(key);
            else
                believed_links_[key] = factor;
        }
        Conditions view(job_.cluster.devices.size());
        view.slowdown = believed_;
        view.link_factor = believed_links_;
        for (std::size_t dev = 0; dev < view.failed.size(); ++dev)
            view.failed[dev] = agent_of_[dev] == SIZE_MAX || !alive_[agent_of_[dev]];
        for (std::size_t a : left) d.failed.push_back(device_of_[a]);
        std::vector<std::string> parts;
        for (const auto& [dev, f] : d.detected)
            parts.push_back(fmt::format("measured {} x{:.3g}", job_.cluster.devices[dev].name, f));
        parts.insert(parts.end(), link_parts.begin(), link_parts.end());
        const std::uint64_t N = job_.run.iterations;
        if (failure) {
            for (std::size_t dev : d.failed) {
                parts.push_back(fmt::format("{} left", job_.cluster.devices[dev].name));
                // Its layers must be somewhere else: a live replica, or the neighbour's copy.
                if (!restorable(agent_of_[dev], holder))
                    d.stop = fmt::format("device {} failed at iteration {} and its state is lost: no data-parallel "
                                         "replica is alive and its neighbour's copy went with it",
                                         job_.cluster.devices[dev].name, stop);
            }
            d.rollback = snapshot_it_;
            if (d.stop.empty()) {
                const ReplanDecision r = consider_replan(priced(), job_.cluster, job_.cost, job_.copt, view, plan_,
                                                         job_.adaptive.policy, N - snapshot_it_, true, stop);
                d.solve_s = r.solve_s;
                if (r.infeasible)
                    d.stop = fmt::format("no plan fits on the devices alive at iteration {}", stop);
                else
                    d.plan = r.plan;
                parts.push_back(fmt::format("rolled back to iteration {}", snapshot_it_));
                if (r.plan)
                    parts.push_back(fmt::format("re-planned in {:.3g} ms: {} stages, {:.6g} ms predicted", r.solve_s * 1e3,
                                                r.plan->stages.size(), r.then_s * 1e3));
            }
            holder_.clear();
            for (std::size_t a : left)
                if (const auto h = holder.find(a); h != holder.end() && alive_[h->second]) {
                    holder_[a] = h->second;
                    d.restored_from.push_back({device_of_[a], device_of_[h->second]});
                }
        } else if (window && stop < N) {
            const ReplanDecision r = consider_replan(priced(), job_.cluster, job_.cost, job_.copt, view, plan_,
                                                     job_.adaptive.policy, N - stop, false, stop);
            d.solve_s = r.solve_s;
            if (r.plan) {
                d.plan = r.plan;
                parts.push_back(fmt::format("re-planned in {:.3g} ms: {} stages, {:.6g} -> {:.6g} ms predicted, migration "
                                            "{:.3g} ms",
                                            r.solve_s * 1e3, r.plan->stages.size(), r.now_s * 1e3, r.then_s * 1e3,
                                            r.migration_s * 1e3));
            } else if (!d.detected.empty() || !link_parts.empty()) {
                parts.push_back(r.note.substr(r.note.find(": ") + 2));
            }
        }
        // Who measures itself next: the live devices believed slow that the next plan leaves out.
        const Plan& next = d.plan ? *d.plan : plan_;
        for (std::size_t a : alive_agents()) {
            const std::size_t dev = device_of_[a];
            if (believed_[dev] > slow_device_factor && worker_index(next, a) < 0) d.probe.push_back(dev);
        }
        for (std::size_t k = 0; k < parts.size(); ++k) d.text += (k ? "; " : "") + parts[k];
        return d;
    }

    bool restorable(std::size_t lost, const std::map<std::size_t, std::size_t>& holder) const {
        const std::int64_t w = worker_index(plan_, lost);
        if (w < 0) return true;  // it held no stage
        const auto h = holder.find(lost);
        if (h != holder.end() && alive_[h->second]) return true;
        const WorkerPlace p = worker_places(plan_)[static_cast<std::size_t>(w)];
        const Stage& st = plan_.stages[p.stage];
        for (std::size_t k = 0; k < st.replicas(); ++k)
            if (alive_[agent_of_[st.devices[k * st.tp + p.tp_rank]]]) return true;
        return false;
    }

    /// Where shard t of layer l of the current plan is (after any rollback): a live replica's
    /// own state, or the neighbour's copy of a lost agent's. {agent, from its copy}.
    std::pair<std::size_t, bool> source(std::size_t layer, std::uint32_t t, const std::map<std::size_t, std::size_t>& holder) const {
        const Stage& st = plan_.stages[stage_of(plan_, layer)];
        for (std::size_t k = 0; k < st.replicas(); ++k) {
            const std::size_t a = agent_of_[st.devices[k * st.tp + t]];
            if (alive_[a]) return {a, false};
        }
        const std::size_t lost = agent_of_[st.devices[t]];
        const auto h = holder.find(lost);
        if (h == holder.end() || !alive_[h->second])
            throw RuntimeError(fmt::format("layer {}: no live copy of its state", layer));
        return {h->second, true};
    }

    /// Moves the state of every layer whose owners change from the current plan to `next`;
    /// returns the bytes this agent sent.
    std::uint64_t migrate(const Plan& next, std::uint64_t seq) {
        std::vector<bool> failed_device(job_.cluster.devices.size(), false);
        for (std::size_t a = 0; a < alive_.size(); ++a) failed_device[device_of_[a]] = !alive_[a];
        const auto unchanged = [&](std::size_t l) {
            const Stage& a = plan_.stages[stage_of(plan_, l)];
            const Stage& b = next.stages[stage_of(next, l)];
            if (a.devices != b.devices || a.tp != b.tp) return false;
            return std::none_of(a.devices.begin(), a.devices.end(), [&](std::size_t dev) { return failed_device[dev]; });
        };
        const auto tag = [&](std::size_t l, std::uint32_t t) {
            return Tag{Tag::Kind::migrate, static_cast<std::uint32_t>(seq), t, static_cast<std::uint32_t>(l)};
        };
        const auto& holder = holder_;
        std::uint64_t sent = 0;
        // Sends first (they never block), then receives.
        for (std::size_t l = 0; l < model_.layers.size(); ++l) {
            if (unchanged(l)) continue;
            const Stage& from = plan_.stages[stage_of(plan_, l)];
            const Stage& to = next.stages[stage_of(next, l)];
            for (std::uint32_t t = 0; t < from.tp; ++t) {
                const auto [src, from_copy] = source(l, t, holder);
                if (src != me_) continue;
                const Held& h = (from_copy ? copy_ : own_).at(l);
                if (h.shard.rank != t || h.shard.size != from.tp)
                    throw RuntimeError(fmt::format("layer {}: holds shard {}/{} where {}/{} was expected", l, h.shard.rank,
                                                   h.shard.size, t, from.tp));
                for (std::size_t dev : to.devices) {
                    const std::size_t a = agent_of_[dev];
                    if (a == me_) continue;
                    Bytes b;
                    put_state(b, h.state);
                    net_.send(a, tag(l, t), std::move(b));
                    sent += holding_bytes(h);
                }
            }
        }
        Holding next_own;
        const std::int64_t w = worker_index(next);
        if (w >= 0) {
            const WorkerPlace p = worker_places(next)[static_cast<std::size_t>(w)];
            const Stage& to = next.stages[p.stage];
            const Shard mine{static_cast<std::uint32_t>(p.tp_rank), to.tp};
            for (std::size_t l = to.first_layer; l <= to.last_layer; ++l) {
                if (unchanged(l)) {
                    next_own[l] = own_.at(l);
                    continue;
                }
                const Stage& from = plan_.stages[stage_of(plan_, l)];
                const auto whole = make_cpu_kernel(model_, l, {});
                ShardState full;
                full.params.assign(whole->full_params(), 0.0f);
                full.m = full.params;
                full.v = full.params;
                for (std::uint32_t t = 0; t < from.tp; ++t) {
                    const auto [src, from_copy] = source(l, t, holder);
                    ShardState piece;
                    if (src == me_) {
                        piece = (from_copy ? copy_ : own_).at(l).state;
                    } else {
                        const Bytes b = net_.recv(src, tag(l, t));
                        Reader in(b);
                        piece = get_state(in);
                    }
                    const auto k = make_cpu_kernel(model_, l, Shard{t, from.tp});
                    if (piece.params.size() != k->shard_params())
                        throw RuntimeError(fmt::format("layer {}: received {} values for a shard of {}", l,
                                                       piece.params.size(), k->shard_params()));
                    k->from_shard(piece.params, full.params);
                    k->from_shard(piece.m, full.m);
                    k->from_shard(piece.v, full.v);
                }
                const auto k = make_cpu_kernel(model_, l, mine);
                Held h{mine, {}};
                h.state.params.resize(k->shard_params());
                h.state.m.resize(k->shard_params());
                h.state.v.resize(k->shard_params());
                k->to_shard(full.params, h.state.params);
                k->to_shard(full.m, h.state.m);
                k->to_shard(full.v, h.state.v);
                next_own[l] = std::move(h);
            }
        }
        own_ = std::move(next_own);
        net_.flush();
        return sent;
    }

    /// Snapshot of this agent's state at `it`, and a copy of it to the next live agent (the
    /// previous one's comes here). Returns the bytes sent.
    std::uint64_t refresh(std::uint64_t it, std::uint64_t seq) {
        snapshot_ = own_;
        snapshot_it_ = it;
        const std::vector<std::size_t> ring = alive_agents();
        copy_.clear();
        copy_of_ = SIZE_MAX;
        if (ring.size() < 2) return 0;
        const std::size_t at = static_cast<std::size_t>(std::find(ring.begin(), ring.end(), me_) - ring.begin());
        const std::size_t next = ring[(at + 1) % ring.size()], prev = ring[(at + ring.size() - 1) % ring.size()];
        const Tag tag{Tag::Kind::copy, static_cast<std::uint32_t>(seq), 0, static_cast<std::uint32_t>(it)};
        Bytes b;
        put_holding(b, own_);
        const std::uint64_t sent = b.size();
        net_.send(next, tag, std::move(b));
        const Bytes in = net_.recv(prev, tag);
        Reader r(in);
        copy_ = get_holding(r);
        copy_of_ = prev;
        return sent;
    }

    /// Every live agent sends what it recorded and its final parameters to the coordinator,
    /// which assembles the result.
    AdaptiveResult finish() {
        const std::size_t c = coordinator();
        const Tag tag = control(UINT32_MAX, final_state);
        if (me_ != c) {
            Bytes b;
            put_entries(b, history_);
            put_holding(b, own_);
            net_.send(c, tag, std::move(b));
            net_.flush();
            return {};
        }
        std::map<std::size_t, Holding> owned;  // agent -> its final layers
        owned[me_] = std::move(own_);
        for (std::size_t a : alive_agents()) {
            if (a == me_) continue;
            const Bytes b = net_.recv(a, tag);
            Reader in(b);
            for (Entry& e : get_entries(in)) history_.push_back(std::move(e));
            owned[a] = get_holding(in);
        }
        return assemble(owned);
    }

    AdaptiveResult assemble(std::map<std::size_t, Holding>& owned) {
        AdaptiveResult r;
        r.writer = true;
        r.plans = plans_;
        r.decisions = decisions_;
        std::map<std::uint64_t, std::vector<Entry*>> by_seq;
        for (Entry& e : history_) by_seq[e.seq].push_back(&e);
        std::vector<double> loss(job_.run.iterations, 0.0);
        double carried = 0;      // boundary time not yet charged to an iteration
        std::string pending;     // decision text for the next iteration row
        std::vector<bool> seen(job_.run.iterations, false);
        std::size_t decision = 0;
        for (auto& [seq, entries] : by_seq) {
            Segment seg;
            seg.plan_version = entries.front()->version;
            seg.first = entries.front()->first;
            seg.end = entries.front()->end;
            const Plan& plan = plans_.at(seg.plan_version - 1);
            seg.workers.resize(worker_places(plan).size());
            double boundary = 0, migration = 0;
            std::uint64_t moved = 0, copied = 0;
            for (Entry* e : entries) {
                seg.end = std::min(seg.end, e->end);
                boundary = std::max(boundary, e->boundary_s);
                migration = std::max(migration, e->migration_s);
                moved += e->migrated_bytes;
                copied += e->copy_bytes;
                if (e->worker >= 0) seg.workers.at(static_cast<std::size_t>(e->worker)) = std::move(e->report);
            }
            for (std::uint64_t it = seg.first; it < seg.end; ++it) {
                AdaptiveIteration row;
                row.iteration = it;
                row.plan_version = seg.plan_version;
                for (const WorkerReport& w : seg.workers) {
                    if (it - seg.first >= w.busy_s.size()) continue;
                    row.seconds = std::max(row.seconds, w.busy_s[it - seg.first]);
                    row.loss += w.loss[it - seg.first];
                }
                row.seconds += carried;
                carried = 0;
                row.event = pending;
                pending.clear();
                if (!seen[it]) {
                    for (const ScenarioEvent& e : job_.run.scenario.events)
                        if (e.iteration == it) row.event += (row.event.empty() ? "" : "; ") + describe(e, job_.cluster);
                } else {
                    ++r.rerun_iterations;
                }
                seen[it] = true;
                loss[it] = row.loss;
                r.iterations.push_back(std::move(row));
            }
            // The boundary after this segment, charged to the next iteration run.
            if (decision < decisions_.size() && by_seq.count(seq + 1) != 0) {
                const Decision& d = decisions_[decision++];
                carried += boundary;
                r.replan_s += d.solve_s;
                r.migration_s += migration;
                r.migrated_bytes += moved;
                r.failures += d.failed.size();
                if (d.plan) ++r.repartitions;
                pending = d.text;
                if (d.plan)
                    pending += fmt::format("{}migrated {} B in {:.3g} ms; plan {}", pending.empty() ? "" : "; ", moved,
                                           migration * 1e3, seg.plan_version + 1);
            }
            r.copy_bytes += copied;
            r.segments.push_back(std::move(seg));
        }
        r.loss = std::move(loss);
        // The final weights, from replica 0 of each stage of the last plan.
        const Plan& last = plans_.back();
        r.weights = canonical_weights(model_, last, [&](std::size_t s, std::uint32_t t, std::size_t l) -> const std::vector<float>& {
            return owned.at(agent_of_[last.stages[s].devices[t]]).at(l).state.params;
        });
        r.weights_digest = digest(r.weights);
        return r;
    }

    /// The model as the job's cost model prices it.
    const Model& priced() const { return job_.priced != nullptr ? *job_.priced : model_; }

    const AdaptiveJob& job_;
    const Model& model_;
    Transport& net_;
    std::size_t me_;
    Plan plan_;
    std::vector<Plan> plans_;
    std::vector<std::size_t> device_of_;  // agent -> device
    std::vector<std::size_t> agent_of_;   // device -> agent (SIZE_MAX: not in the job)
    std::vector<bool> alive_;
    Holding own_, snapshot_, copy_;
    std::uint64_t snapshot_it_ = 0;
    std::size_t copy_of_ = SIZE_MAX;
    std::map<std::size_t, std::size_t> holder_;
    std::vector<double> believed_;
    double predicted_compute_s_ = 0;  // the cost model's time for what this agent measured (its stage, or its probe)
    bool probing_ = false;            // the last decision asked this agent to measure itself
    /// The link this agent's worker sent its activations over in the segment, and the predicted
    /// time of one send.
    struct SentOver {
        std::size_t a = 0, b = 0;
        double predicted_s = 0;
    };
    std::optional<SentOver> link_;
    std::map<std::pair<std::size_t, std::size_t>, double> believed_links_;  // the coordinator's: (a < b) -> factor
    std::vector<Entry> history_;
    std::vector<Decision> decisions_;
};

}  // namespace

AdaptiveResult run_adaptive(const AdaptiveJob& job, Transport& net) {
    prepare_cpu_workers();
    try {
        return Agent(job, net).run();
    } catch (const PeerStopped&) {
        throw;
    } catch (const InputError&) {
        throw;
    } catch (const std::exception& e) {
        const std::string msg = fmt::format("agent {} of the adaptive job: {}", net.rank(), e.what());
        net.abort(msg);
        throw RuntimeError(msg);
    }
}

AdaptiveResult run_adaptive_in_process(const AdaptiveJob& job) {
    const std::size_t agents = worker_places(job.plan).size();
    prepare_cpu_workers();  // before the threads: a thread keeps the arena it first allocated in
    InProcessNetwork network(agents, job.run.timeout);
    std::vector<AdaptiveResult> results(agents);
    run_on_threads(agents, [&](std::size_t a) { results[a] = run_adaptive(job, network.endpoint(a)); });
    for (AdaptiveResult& r : results)
        if (r.writer) return std::move(r);
    throw RuntimeError("the adaptive job ended without a result");
}

}  // namespace dpart::rt
