// The schedule executor: workers running their stage's part of the schedule for real.
#include "dpart/runtime/executor.hpp"

#include <fmt/format.h>


#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <exception>
#include <filesystem>
#include <fstream>
#include <condition_variable>
#include <map>
#include <mutex>
#include <stop_token>
#include <thread>

#include "dpart/core/error.hpp"
#include "dpart/io/atomic_file.hpp"
#include "dpart/runtime/device_comm.hpp"
#include "dpart/runtime/param_layout.hpp"

namespace dpart::rt {

std::vector<WorkerPlace> worker_places(const Plan& plan) {
    std::vector<WorkerPlace> places;
    for (std::size_t s = 0; s < plan.stages.size(); ++s) {
        const Stage& st = plan.stages[s];
        for (std::size_t i = 0; i < st.devices.size(); ++i) places.push_back({s, i / st.tp, i % st.tp, st.devices[i]});
    }
    return places;
}

std::optional<RunOptions::Fault> fault_from_environment() {
    const char* v = std::getenv("DPART_INJECT_FAULT");
    if (v == nullptr || *v == '\0') return std::nullopt;
    RunOptions::Fault f;
    char mode[8] = {};
    unsigned long long rank = 0, it = 0;
    const int n = std::sscanf(v, "%llu:%llu:%7s", &rank, &it, mode);
    if (n < 2 || (n == 3 && std::string(mode) != "exit"))
        throw InputError(fmt::format("DPART_INJECT_FAULT=\"{}\": expected rank:iteration or rank:iteration:exit", v));
    f.rank = rank;
    f.iteration = it;
    f.exit = n == 3;
    return f;
}

namespace {

bool is_loss(const Layer& layer) { return std::holds_alternative<SoftmaxXentOp>(layer.op); }

// --- Checkpoints: DIR/checkpoint.toml names the iteration; DIR/rank{R}-it{I}.bin each worker's state.
std::filesystem::path rank_file(const std::string& dir, std::size_t rank, std::uint64_t iteration) {
    return std::filesystem::path(dir) / fmt::format("rank{}-it{}.bin", rank, iteration);
}

std::uint64_t read_checkpoint_iteration(const std::string& dir, const std::string& fingerprint, std::size_t workers) {
    const std::string path = (std::filesystem::path(dir) / "checkpoint.toml").string();
    std::ifstream in(path);
    if (!in) throw InputError(fmt::format("{}: no checkpoint to resume from", path));
    std::string line, found;
    std::uint64_t iteration = 0, ranks = 0;
    bool have_iteration = false;
    while (std::getline(in, line)) {
        unsigned long long v = 0;
        char text[64] = {};
        if (std::sscanf(line.c_str(), "iteration = %llu", &v) == 1) iteration = v, have_iteration = true;
        if (std::sscanf(line.c_str(), "workers = %llu", &v) == 1) ranks = v;
        if (std::sscanf(line.c_str(), "fingerprint = \"%63[0-9a-f]\"", text) == 1) found = text;
    }
    if (!have_iteration || found.empty())
        throw InputError(fmt::format("{}: not a dpart checkpoint (iteration and fingerprint missing)", path));
    if (found != fingerprint || ranks != workers)
        throw InputError(fmt::format("{}: the checkpoint was written by another run (plan, model, seed, data or "
                                     "optimizer differ: fingerprint {}, this run's {})",
                                     path, found, fingerprint));
    return iteration;
}

}  // namespace

std::vector<std::size_t> sample_shape(const Model& model, std::size_t layer) {
    const Layer& l = model.layers.at(layer);
    if (l.out_shape.empty() && std::holds_alternative<CustomOp>(l.op)) return {custom_geometry(model, layer).out};
    return {l.out_shape.begin(), l.out_shape.end()};
}

ValueRange optimizer_part(std::size_t total, std::size_t replica, std::size_t replicas) {
    const auto [first, count] = group_part(total, replica, replicas);
    return {first, count};
}

ValueRange layer_part(ValueRange part, std::size_t base, std::size_t size) {
    const std::size_t lo = std::max(part.first, base), hi = std::min(part.first + part.count, base + size);
    return lo < hi ? ValueRange{lo - base, hi - lo} : ValueRange{};
}

std::vector<std::size_t> inputs_of(const Model& model, std::size_t l) {
    const Layer& layer = model.layers[l];
    if (layer.inputs.empty()) return {l == 0 ? model_input : l - 1};
    return layer.inputs;
}

Execution::Execution(const Plan& plan, const Model& model, const PlanEstimate& estimate, RunOptions options,
                     RankMap ranks)
    : plan_(plan), model_(model), options_(std::move(options)), places_(worker_places(plan)), ranks_(std::move(ranks)),
      predicted_(estimate.stages) {
    const std::size_t S = plan.stages.size();
    if (ranks_.of_worker.empty())
        for (std::size_t w = 0; w < places_.size(); ++w) ranks_.of_worker.push_back(w);
    if (ranks_.of_worker.size() != places_.size())
        throw RuntimeError(fmt::format("{} transport ranks for a plan of {} devices", ranks_.of_worker.size(), places_.size()));
    if (ranks_.members.empty()) ranks_.members = ranks_.of_worker;
    first_rank_.resize(S);
    for (std::size_t r = places_.size(); r-- > 0;) first_rank_[places_[r].stage] = r;
    // A layer's output crosses boundary s (into stage s) when it is made before the stage and
    // read at or after it.
    std::vector<std::size_t> last_reader(model.layers.size(), 0);
    for (std::size_t l = 0; l < model.layers.size(); ++l)
        for (std::size_t i : inputs_of(model, l))
            if (i != model_input) last_reader[i] = std::max(last_reader[i], l);
    live_in_.resize(S);
    for (std::size_t s = 1; s < S; ++s)
        for (std::size_t i = 0; i < plan.stages[s].first_layer; ++i)
            if (last_reader[i] >= plan.stages[s].first_layer) live_in_[s].push_back(i);
    for (std::size_t s = 0; s < S; ++s) {
        shares_.push_back(estimate.stages.at(s).shares);
        std::vector<std::uint64_t> off{0};
        for (std::uint64_t sh : shares_.back()) off.push_back(off.back() + sh);
        off.pop_back();
        offsets_.push_back(std::move(off));
    }
    for (std::size_t l = 0; l < model.layers.size(); ++l)
        if (const auto* lin = std::get_if<LinearOp>(&model.layers[l].op); lin && lin->tied_to)
            tied_.push_back({*lin->tied_to, l});
    first_iteration_ = options_.start_iteration;
    options_.shard_optimizer = options_.shard_optimizer || plan_.shard_optimizer;
    if (options_.resume) first_iteration_ = read_checkpoint_iteration(options_.checkpoint_dir, fingerprint(), workers());
    // Build every shard's kernel once so that an op without a kernel, or a split that does not
    // divide, is reported before any worker starts.
    for (const Stage& st : plan.stages)
        for (std::size_t l = st.first_layer; l <= st.last_layer; ++l)
            for (std::uint32_t t = 0; t < st.tp; ++t) {
                const std::size_t n = make_cpu_kernel(model, l, Shard{t, st.tp})->shard_params(), r = st.replicas();
                const std::size_t moments = options_.shard_optimizer ? 2 : 2 * r;  // ZeRO-1: one copy, in parts
                state_bytes_ += sizeof(float) * n * (2 * r + moments);
            }
}

ShardState initial_state(const Model& model, std::size_t layer, Shard shard, std::uint64_t seed) {
    const auto k = make_cpu_kernel(model, layer, shard);
    std::vector<float> full(k->full_params());
    make_cpu_kernel(model, layer, {})->init(seed, full);
    if (const auto* lin = std::get_if<LinearOp>(&model.layers[layer].op); lin && lin->tied_to) {
        const auto emb = make_cpu_kernel(model, *lin->tied_to, {});
        std::vector<float> table(emb->full_params());
        emb->init(seed, table);
        const auto& e = std::get<EmbeddingOp>(model.layers[*lin->tied_to].op);
        std::copy_n(table.begin(), static_cast<std::size_t>(e.vocab * e.hidden), full.begin());
    }
    ShardState s;
    s.params.resize(k->shard_params());
    k->to_shard(full, s.params);
    s.m.assign(s.params.size(), 0.0f);
    s.v.assign(s.params.size(), 0.0f);
    return s;
}

std::string Execution::fingerprint() const {
    std::string text = fmt::format("{} {} {} {} {} {} {} {}", model_.name, model_.layers.size(), to_string(plan_.schedule),
                                   plan_.microbatch_size, plan_.microbatches, options_.seed, options_.dataset_batches,
                                   to_string(options_.optimizer.kind));
    text += fmt::format(" {:a} {:a} {:a} {:a}", options_.optimizer.lr, options_.optimizer.beta1, options_.optimizer.beta2,
                        options_.optimizer.eps);
    for (const Stage& st : plan_.stages) {
        text += fmt::format(" [{} {} {}", st.first_layer, st.last_layer, st.tp);
        for (std::size_t d : st.devices) text += fmt::format(" {}", d);
        text += "]";
    }
    // Each worker's file holds its part of the moments (where a stage has replicas to share them).
    if (options_.shard_optimizer &&
        std::any_of(plan_.stages.begin(), plan_.stages.end(), [](const Stage& st) { return st.replicas() > 1; }))
        text += " zero1";
    std::uint64_t h = 0xcbf29ce484222325ull;
    for (unsigned char c : text) {
        h ^= c;
        h *= 0x100000001b3ull;
    }
    return fmt::format("{:016x}", h);
}

std::size_t Execution::rank_of(std::size_t stage, std::size_t replica, std::size_t tp_rank) const {
    return first_rank_.at(stage) + replica * plan_.stages.at(stage).tp + tp_rank;
}

namespace {

using Clock = std::chrono::steady_clock;

/// A tensor-parallel group's collectives over the transport.
class TransportGroup final : public GroupComm {
public:
    TransportGroup(Transport& net, std::vector<std::size_t> ranks) : net_(net), ranks_(std::move(ranks)) {}
    void start_iteration(std::uint32_t it) {
        iteration_ = it;
        calls_ = 0;
    }
    void allreduce_sum(std::span<float> data) override {
        group_allreduce_sum(net_, ranks_, {Tag::Kind::allreduce, iteration_, 0, calls_++}, data);
    }
    void allgather(std::span<const float> mine, std::span<float> all) override {
        group_allgather(net_, ranks_, {Tag::Kind::allgather, iteration_, 0, calls_++}, mine, all);
    }

private:
    Transport& net_;
    std::vector<std::size_t> ranks_;
    std::uint32_t iteration_ = 0;
    std::uint32_t calls_ = 0;
};

/// Per-sample shape of a layer's output, as the runtime's tensors carry it.

/// The start-of-iteration vote: every member says whether its device has failed; all learn
/// who leaves (transport ranks, in member order).
std::vector<std::size_t> departures(Transport& net, const std::vector<std::size_t>& members, std::uint32_t it,
                                    bool leaving) {
    const std::vector<std::uint8_t> votes =
        group_vote(net, members, {Tag::Kind::barrier, it, 0, 0}, leaving ? std::uint8_t{1} : std::uint8_t{0});
    std::vector<std::size_t> left;
    for (std::size_t i = 0; i < members.size(); ++i)
        if (votes[i] != 0) left.push_back(members[i]);
    return left;
}

class Worker {
public:
    Worker(const Execution& ex, std::size_t rank, Transport& net, std::vector<ShardState>* initial)
        : ex_(ex), model_(ex.model()), plan_(ex.plan()), place_(ex.places().at(rank)), stage_(plan_.stages[place_.stage]),
          rank_(rank), net_(net), tp_(net, group_of_tp()) {
        const auto t = static_cast<std::uint32_t>(place_.tp_rank);
        const bool given = initial != nullptr && !initial->empty();
        if (given && initial->size() != stage_.last_layer - stage_.first_layer + 1)
            throw RuntimeError(fmt::format("given the state of {} layers for a stage of {}", initial->size(),
                                           stage_.last_layer - stage_.first_layer + 1));
        StageSetup setup{&model_, &stage_, place_, ex_.options().seed, {}, ex_.options().recompute, std::nullopt};
        for (std::size_t l = stage_.first_layer; l <= stage_.last_layer; ++l) {
            setup.state.push_back(given ? std::move((*initial)[l - stage_.first_layer])
                                        : initial_state(model_, l, Shard{t, stage_.tp}, ex_.options().seed));
            gradient_offsets_.push_back(gradient_count_);
            gradient_count_ += setup.state.back().params.size();
        }
        // ZeRO-1: this replica keeps and steps its part of the stage's values (so not where a
        // replica's part would be empty: fewer values than parts of ceil(values / replicas)).
        zero_ = ex_.options().shard_optimizer && stage_.replicas() > 1 &&
                optimizer_part(gradient_count_, stage_.replicas() - 1, stage_.replicas()).count > 0;
        if (zero_) setup.optimizer_part = optimizer_part(gradient_count_, place_.replica, stage_.replicas());
        whole_state_ = initial != nullptr;
        compute_ = ex_.options().backend ? ex_.options().backend(std::move(setup)) : make_cpu_stage(std::move(setup));
        // A lone worker has no one to talk to: no communicator (an adaptive run's later plan with
        // more workers bootstraps one then).
        if (const auto& fabric = ex_.options().device_fabric; fabric && ex_.workers() > 1) {
            const StageCompute::DeviceMemory memory = compute_->device_memory();
            if (memory.ops == nullptr)
                throw RuntimeError("device communicators need a device backend (the CPU stage has no device memory)");
            CommSetup cs;
            cs.plan = &plan_;
            cs.worker = rank_;
            for (std::size_t w = 0; w < ex_.workers(); ++w) cs.transport_ranks.push_back(ex_.transport_rank(w));
            cs.segment = ex_.first_iteration();
            cs.net = &net_;
            cs.ops = memory.ops;
            device_comm_ = fabric->connect(cs);
        }
        for (std::size_t r = 0; r < stage_.replicas(); ++r) dp_group_.push_back(peer(place_.stage, r, place_.tp_rank));
        const std::size_t s = place_.stage;
        const std::vector<bool> replicas = shares_memory_with(s);
        dp_on_device_ = std::all_of(replicas.begin(), replicas.end(), [](bool b) { return b; });
        if (s > 0) {
            on_device_prev_ = shares_memory_with(s - 1);
            via_comm_prev_ = through_comm(s - 1, on_device_prev_);
        }
        if (s + 1 < plan_.stages.size()) {
            on_device_next_ = shares_memory_with(s + 1);
            via_comm_next_ = through_comm(s + 1, on_device_next_);
            // Only what leaves through the host is downloaded.
            const auto next = overlaps(s + 1);
            if (std::any_of(next.begin(), next.end(), [&](const Overlap& o) { return !on_device_next_[o.replica]; }))
                keep_ = ex_.live_in(s + 1);
        }
        keep_.push_back(stage_.last_layer);
    }

    /// The transport rank of (stage, replica, tp rank).
    std::size_t peer(std::size_t stage, std::size_t replica, std::size_t tp_rank) const {
        return ex_.transport_rank(ex_.rank_of(stage, replica, tp_rank));
    }

    WorkerReport run() {
        WorkerReport report;
        report.rank = rank_;
        report.stopped_at = ex_.options().iterations;
        const auto& all = ex_.members();
        const std::size_t S = plan_.stages.size();
        const auto order = stage_order(plan_.schedule, static_cast<std::uint32_t>(place_.stage),
                                       static_cast<std::uint32_t>(S), static_cast<std::uint32_t>(plan_.microbatches));
        if (ex_.options().resume) load_state(ex_.first_iteration());
        for (auto it = static_cast<std::uint32_t>(ex_.first_iteration()); it < ex_.options().iterations; ++it) {
            iteration_ = it;
            conditions_ = conditions_at(ex_.options().scenario, conditions_.slowdown.size(), it);
            device_slowed_ = compute_->apply_slowdown(conditions_.slowdown.at(place_.device));
            if (const auto& f = ex_.options().fault; f && f->rank == rank_ && f->iteration == it) {
                if (f->exit) std::_Exit(3);
                throw RuntimeError("injected fault (DPART_INJECT_FAULT)");
            }
            if (ex_.options().leave_on_failure) {
                report.left = departures(net_, all, it, conditions_.failed.at(place_.device));
                if (!report.left.empty()) {
                    report.stopped_at = it;
                    break;
                }
            } else {
                if (conditions_.failed.at(place_.device))
                    throw RuntimeError(fmt::format("its device failed at iteration {} (scenario)", it));
                group_barrier(net_, all, {Tag::Kind::barrier, it, 0, 0});
            }
            t0_ = Clock::now();
            tp_.start_iteration(it);
            loss_ = 0;
            records_ = &report.tasks;
            for (const StageStep& step : order) {
                if (step.forward)
                    forward(step.microbatch);
                else
                    backward(step.microbatch);
            }
            finish_iteration();
            report.busy_s.push_back(seconds_since_start());
            report.loss.push_back(loss_);
            const std::uint64_t every = ex_.options().checkpoint_every;
            if (every > 0 && (it + 1) % every == 0 && it + 1 < ex_.options().iterations) checkpoint(it + 1, all);
        }
        if (const auto memory = compute_->device_memory(); memory.ops != nullptr && memory.ops->meter() != nullptr) {
            report.peak_device_bytes = static_cast<std::uint64_t>(std::max<std::int64_t>(0, memory.ops->meter()->peak()));
            report.cached_device_bytes = memory.cached_bytes;
        }
        report.state = std::move(compute_->pull_state());
        if (zero_ && whole_state_) unshard_moments(report.state, report.left);
        return report;
    }

    [[nodiscard]] std::uint32_t iteration() const noexcept { return iteration_; }

private:
    /// Writes this worker's state as of the start of `next`; once every worker has, rank 0
    /// records `next` in checkpoint.toml; then each removes its previous file.
    void checkpoint(std::uint64_t next, const std::vector<std::size_t>& all) {
        if (ex_.transport_rank(rank_) != rank_) throw RuntimeError("checkpoints need every worker at its own rank");
        const std::string& dir = ex_.options().checkpoint_dir;
        Bytes b;
        append_value(b, std::uint64_t{0x4b43504450ull});  // "DPCK"
        append_value(b, next);
        const std::vector<ShardState>& state = compute_->pull_state();
        append_value(b, static_cast<std::uint64_t>(state.size()));
        for (const ShardState& st : state) {
            append_value(b, static_cast<std::uint64_t>(st.params.size()));
            append(b, std::span<const float>(st.params));
            append(b, std::span<const float>(st.m));
            append(b, std::span<const float>(st.v));
        }
        write_file_atomic(rank_file(dir, rank_, next).string(),
                          std::string_view(reinterpret_cast<const char*>(b.data()), b.size()));
        const auto it = static_cast<std::uint32_t>(next);
        group_barrier(net_, all, {Tag::Kind::barrier, it, 1, 0});
        if (rank_ == 0)
            write_file_atomic((std::filesystem::path(dir) / "checkpoint.toml").string(),
                              fmt::format("# dpart run checkpoint: every worker's state at the start of this "
                                          "iteration is in rank<R>-it<iteration>.bin\niteration = {}\nworkers = {}\n"
                                          "fingerprint = \"{}\"\n",
                                          next, ex_.workers(), ex_.fingerprint()));
        group_barrier(net_, all, {Tag::Kind::barrier, it, 2, 0});
        if (last_checkpoint_ > 0) std::filesystem::remove(rank_file(dir, rank_, last_checkpoint_));
        last_checkpoint_ = next;
    }

    void load_state(std::uint64_t iteration) {
        const std::string path = rank_file(ex_.options().checkpoint_dir, rank_, iteration).string();
        std::ifstream in(path, std::ios::binary);
        if (!in) throw InputError(fmt::format("{}: missing from the checkpoint", path));
        const std::string raw((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        const Bytes b(reinterpret_cast<const std::byte*>(raw.data()), reinterpret_cast<const std::byte*>(raw.data()) + raw.size());
        Reader r(b);
        std::vector<ShardState>& state = compute_->pull_state();
        try {
            if (r.value<std::uint64_t>() != 0x4b43504450ull || r.value<std::uint64_t>() != iteration ||
                r.value<std::uint64_t>() != state.size())
                throw RuntimeError("header");
            for (ShardState& st : state) {
                if (r.value<std::uint64_t>() != st.params.size()) throw RuntimeError("layer size");
                r.read_into(std::span<float>(st.params));
                r.read_into(std::span<float>(st.m));
                r.read_into(std::span<float>(st.v));
            }
            if (!r.done()) throw RuntimeError("trailing bytes");
        } catch (const RuntimeError& e) {
            throw InputError(fmt::format("{}: not this worker's state at iteration {} ({})", path, iteration, e.what()));
        }
        compute_->push_state();
        last_checkpoint_ = iteration;
    }

    struct InFlight {
        const TensorMap* acts = nullptr;  // the stage's outputs (and what it received), until backward
        std::uint64_t first_sample = 0;
    };

    std::vector<std::size_t> group_of_tp() const {
        std::vector<std::size_t> g;
        for (std::size_t t = 0; t < stage_.tp; ++t) g.push_back(peer(place_.stage, place_.replica, t));
        return g;
    }

    std::size_t tied_size(std::size_t emb) const {
        const auto& e = std::get<EmbeddingOp>(model_.layers[emb].op);
        return static_cast<std::size_t>(e.vocab * e.hidden);
    }

    double seconds_since_start() const { return std::chrono::duration<double>(Clock::now() - t0_).count(); }
    /// Runs and times one task; under a scenario, waits out the extra time a slowed device
    /// (compute) or link (sends) would have taken.
    /// Emulated devices take the predicted time of the task instead (see RunOptions::emulate), or
    /// `share` of it for a task done in two halves (ZeRO-1's reduce-scatter and all-gather).
    template <class F>
    void timed(TaskKind kind, std::uint32_t mb, F&& f, double share = 1.0) {
        const double start = seconds_since_start();
        const bool compute = kind == TaskKind::forward || kind == TaskKind::backward || kind == TaskKind::optimizer;
        // A device that realises its slowdown (a shrunk GPU partition) is not also waited for.
        const double factor = compute ? (device_slowed_ ? 1.0 : conditions_.slowdown[place_.device]) : send_factor(kind);
        const bool send = kind == TaskKind::send_activation || kind == TaskKind::send_gradient;
        if (ex_.options().emulate) {
            const auto until = [&](double s) {
                const double left = s - seconds_since_start();
                if (left > 0) std::this_thread::sleep_for(std::chrono::duration<double>(left));
            };
            const double target = start + predicted_seconds(kind) * share * factor;
            if (send) until(target);  // the receiver gets the data when the transfer would end
            f();
            if (!send) until(target);
        } else {
            f();
            if (factor > 1.0)
                std::this_thread::sleep_for(std::chrono::duration<double>((factor - 1.0) * (seconds_since_start() - start)));
        }
        records_->push_back({iteration_, kind, mb, start, seconds_since_start()});
    }
    double predicted_seconds(TaskKind kind) const {
        const StageEstimate& e = ex_.predicted(place_.stage);
        switch (kind) {
            case TaskKind::forward: return e.replica_forward_s.at(place_.replica);
            case TaskKind::backward: return e.replica_backward_s.at(place_.replica);
            case TaskKind::send_activation: return e.send_activation_s;
            case TaskKind::send_gradient: return e.send_gradient_s;
            case TaskKind::allreduce: return e.allreduce_s;
            case TaskKind::optimizer: return e.optimizer_s;
        }
        return 0;
    }
    double send_factor(TaskKind kind) const {
        const std::size_t s = place_.stage;
        if (kind == TaskKind::send_activation && s + 1 < plan_.stages.size())
            return conditions_.link(stage_.devices.back(), plan_.stages[s + 1].devices.front());
        if (kind == TaskKind::send_gradient && s > 0)
            return conditions_.link(stage_.devices.front(), plan_.stages[s - 1].devices.back());
        return 1.0;
    }

    std::uint64_t microbatch_first_sample(std::uint32_t mb) const {
        const std::uint64_t batch = iteration_ % std::max<std::uint64_t>(1, ex_.options().dataset_batches);
        return batch * model_.global_batch + mb * plan_.microbatch_size;
    }
    std::size_t rows() const { return ex_.shares(place_.stage)[place_.replica]; }
    std::uint64_t offset() const { return ex_.offsets(place_.stage)[place_.replica]; }

    StepContext context(const InFlight& f) {
        StepContext ctx;
        ctx.seed = ex_.options().seed;
        ctx.first_sample = f.first_sample;
        ctx.tp = stage_.tp > 1 ? &tp_ : nullptr;
        ctx.device_tp = stage_.tp > 1 && device_comm_ ? device_comm_->tensor_parallel() : nullptr;
        return ctx;
    }

    // --- Moving rows of tensors between the replicas of neighbouring stages ----------------
    struct Overlap {
        std::size_t replica;     // in the other stage
        std::uint64_t from, to;  // sample offsets within the microbatch
    };
    std::vector<Overlap> overlaps(std::size_t other_stage) const {
        std::vector<Overlap> out;
        const auto& sh = ex_.shares(other_stage);
        const auto& off = ex_.offsets(other_stage);
        const std::uint64_t a = offset(), b = offset() + rows();
        for (std::size_t r = 0; r < sh.size(); ++r) {
            const std::uint64_t from = std::max(a, off[r]), to = std::min(b, off[r] + sh[r]);
            if (from < to) out.push_back({r, from, to});
        }
        return out;
    }

    /// Sends rows [from, to) of `tensors` (layer order of `layers`) to every tensor-parallel
    /// rank of `replica` of stage `dst_stage`. Only tensor-parallel rank 0 sends: the others
    /// hold the same values.
    void send_rows(std::size_t dst_stage, const Overlap& o, const std::vector<std::size_t>& layers,
                   const std::map<std::size_t, Tensor>& tensors, Tag tag) {
        if (place_.tp_rank != 0) return;
        Bytes msg;
        for (std::size_t l : layers) {
            const auto it = tensors.find(l);
            const std::size_t row = Tensor::count(sample_shape(model_, l));
            const std::size_t from = (o.from - offset()) * row, n = (o.to - o.from) * row;
            if (it == tensors.end()) {
                const std::vector<float> zeros(n, 0.0f);
                append(msg, std::span<const float>(zeros));
            } else {
                append(msg, std::span<const float>(it->second.data).subspan(from, n));
            }
        }
        for (std::size_t t = 0; t < plan_.stages[dst_stage].tp; ++t)
            net_.send(peer(dst_stage, o.replica, t), tag, msg);
    }
    /// Receives this replica's rows of `layers` from the replicas of `src_stage` that send them
    /// through the host (those not `on_device`); none: an empty map.
    std::map<std::size_t, Tensor> recv_rows(std::size_t src_stage, const std::vector<std::size_t>& layers, Tag tag,
                                            const std::vector<bool>& on_device) {
        std::map<std::size_t, Tensor> out;
        const std::vector<Overlap> from = overlaps(src_stage);
        if (std::all_of(from.begin(), from.end(), [&](const Overlap& o) { return on_device[o.replica]; })) return out;
        for (std::size_t l : layers) {
            std::vector<std::size_t> shape{rows()};
            for (std::size_t d : sample_shape(model_, l)) shape.push_back(d);
            out.emplace(l, Tensor(shape));
        }
        for (const Overlap& o : from) {
            if (on_device[o.replica]) continue;
            const Bytes msg = net_.recv(peer(src_stage, o.replica, 0), tag);
            Reader in(msg);
            for (std::size_t l : layers) {
                Tensor& t = out.at(l);
                const std::size_t row = t.row_size();
                in.read_into(std::span<float>(t.data).subspan((o.from - offset()) * row, (o.to - o.from) * row));
            }
            if (!in.done()) throw RuntimeError(fmt::format("{} from worker {} is longer than expected", describe(tag),
                                                           peer(src_stage, o.replica, 0)));
        }
        return out;
    }

    // --- Handing tensors over on the device ---------------------------------------------------
    /// Per replica of stage `other`: whether this worker and it hand tensors over on the device
    /// (RunOptions::memory_domain: both threads of this process, in memory of the same domain,
    /// neither tensor-parallel). Both ends of a pair decide alike.
    std::vector<bool> shares_memory_with(std::size_t other) const {
        std::vector<bool> out(plan_.stages[other].replicas(), false);
        const auto& domain = ex_.options().memory_domain;
        if (!domain || !net_.in_process() || stage_.tp != 1 || plan_.stages[other].tp != 1) return out;
        const std::optional<std::uint64_t> mine = domain(place_);
        if (!mine) return out;
        for (std::size_t r = 0; r < out.size(); ++r) out[r] = domain(ex_.places().at(ex_.rank_of(other, r, 0))) == mine;
        return out;
    }
    /// Per replica of a neighbouring stage, given which share memory with this worker: whether
    /// the parcels for it go through the device communicator (it does not share memory, and
    /// there is one). `shared` becomes true for those: they are handed over on the device too.
    std::vector<bool> through_comm(std::size_t other, std::vector<bool>& shared) const {
        std::vector<bool> out(shared.size(), false);
        if (!device_comm_ || stage_.tp != 1 || plan_.stages[other].tp != 1) return out;
        for (std::size_t r = 0; r < shared.size(); ++r)
            if (!shared[r]) out[r] = shared[r] = true;
        return out;
    }
    /// The step's device exchange with stages `from` (parcels to receive) and `to` (rows to hand
    /// on); null when no neighbour shares memory with this worker.
    std::optional<DeviceHandoff> handoff(std::optional<std::size_t> from, const std::vector<bool>& from_device,
                                         const std::vector<bool>& from_comm, std::span<const std::size_t> in_layers,
                                         std::optional<std::size_t> to, const std::vector<bool>& to_device,
                                         std::span<const std::size_t> out_layers, Tag tag) {
        const bool any_from = std::find(from_device.begin(), from_device.end(), true) != from_device.end();
        const bool any_to = std::find(to_device.begin(), to_device.end(), true) != to_device.end();
        if (!any_from && !any_to) return std::nullopt;
        DeviceHandoff h;
        h.in_layers = in_layers;
        h.out_layers = out_layers;
        if (from)
            for (const Overlap& o : overlaps(*from))
                if (from_device[o.replica]) h.in.push_back(recv_parcel(*from, o, in_layers, tag, from_comm[o.replica]));
        if (to)
            for (const Overlap& o : overlaps(*to))
                if (to_device[o.replica]) h.out_rows.emplace_back(o.from - offset(), o.to - offset());
        return h;
    }
    /// Sends the parcels made for stage `dst`'s replicas, in the order of handoff()'s out_rows.
    void send_parcels(std::size_t dst_stage, const std::vector<bool>& to_device, const std::vector<bool>& via_comm,
                      DeviceHandoff& h, Tag tag) {
        std::size_t k = 0;
        for (const Overlap& o : overlaps(dst_stage)) {
            if (!to_device[o.replica]) continue;
            const DeviceSpan span = h.out.at(k++).span;
            if (via_comm[o.replica])
                device_comm_->send(peer(dst_stage, o.replica, 0), tag, DeviceBuffer::adopt(device_ops(), span));
            else
                send_span(peer(dst_stage, o.replica, 0), tag, span);
        }
    }
    Parcel recv_parcel(std::size_t src_stage, const Overlap& o, std::span<const std::size_t> layers, Tag tag,
                       bool via_comm) {
        Parcel p;
        p.from = o.from - offset();
        p.to = o.to - offset();
        std::size_t expected = 0;
        for (std::size_t l : layers) expected += (p.to - p.from) * Tensor::count(sample_shape(model_, l));
        if (via_comm) {
            // Received into a buffer of this worker's device, which the stage then owns.
            DeviceBuffer b(device_ops(), expected, compute_->device_memory().compute, DeviceBuffer::uninitialized);
            device_comm_->recv(peer(src_stage, o.replica, 0), tag, b.span());
            p.span = b.release_ownership();
        } else {
            p.span = recv_span(peer(src_stage, o.replica, 0), tag, expected);
        }
        return p;
    }
    DeviceOps& device_ops() const {
        DeviceOps* ops = compute_->device_memory().ops;
        if (ops == nullptr) throw RuntimeError("a device transfer on a stage without device memory");
        return *ops;
    }
    /// A device buffer handed to transport rank `dst` (in this process): its address and size.
    /// Its bytes count from then on with the receiver's memory.
    void send_span(std::size_t dst, const Tag& tag, const DeviceSpan& span) {
        if (MemoryMeter* m = device_ops().meter()) m->add(-allocation_bytes(span));
        net_.send(dst, tag, span_message(span));
    }
    DeviceSpan recv_span(std::size_t src, const Tag& tag, std::size_t expected) {
        const DeviceSpan span = span_from(net_.recv(src, tag), tag, src, expected);
        if (MemoryMeter* m = device_ops().meter()) m->add(allocation_bytes(span));
        return span;
    }
    /// A device span as a message between threads of one process (24 bytes), and back: the
    /// span `src` sent with `tag`, checked to hold `expected` values.
    static Bytes span_message(const DeviceSpan& span) {
        Bytes msg;
        append_value(msg, reinterpret_cast<std::uintptr_t>(span.ptr));
        append_value(msg, static_cast<std::uint64_t>(span.count));
        append_value(msg, static_cast<std::uint8_t>(span.elem));
        return msg;
    }
    static DeviceSpan span_from(const Bytes& msg, const Tag& tag, std::size_t src, std::size_t expected) {
        Reader in(msg);
        DeviceSpan span;
        span.ptr = reinterpret_cast<void*>(in.value<std::uintptr_t>());
        span.count = in.value<std::uint64_t>();
        span.elem = static_cast<Elem>(in.value<std::uint8_t>());
        if (!in.done() || span.count != expected)
            throw RuntimeError(fmt::format("{} from worker {}: a device buffer of {} values, {} expected",
                                           describe(tag), src, span.count, expected));
        return span;
    }

    /// The replicas' gradients summed by the device communicator: all the stage's gradients,
    /// summed in place where the stage keeps them as one array (else in a copy, written back).
    void allreduce_through_comm() {
        device_comm_->allreduce_sum(dp_group_, {Tag::Kind::allreduce, iteration_, 4, 0},
                                    in_place(compute_->gradients_in_place(), gradient_count_, "gradients").sub(0, gradient_count_));
    }
    /// A stage's array a collective works on in place (a device stage's: one communicators are
    /// made for), checked to hold at least `n` values.
    static DeviceSpan in_place(DeviceSpan s, std::size_t n, const char* what) {
        if (s.ptr == nullptr || s.count < n)
            throw RuntimeError(fmt::format("a device communicator needs the stage's {} as one device array of {} values",
                                           what, n));
        return s;
    }

    /// The replicas' gradients summed on the device (every replica shares this worker's memory),
    /// in place: member k sums chunk k of the stage's gradients (seen as one array) reading the
    /// others' arrays where they are, then copies every other member's summed chunk from its
    /// array. Each ends with the same values as group_allreduce_sum gives through the host, and
    /// no member holds a copy of another's gradients.
    void allreduce_on_device() {
        const std::vector<DeviceSpan> g = reduce_scatter_on_device();
        const std::size_t n = dp_group_.size(), me = place_.replica;
        for (std::size_t k = 0; k < n; ++k) {
            if (k == me) continue;
            const ValueRange theirs = part(k);
            device_ops().copy(g[k].sub(theirs.first, theirs.count), g[me].sub(theirs.first, theirs.count));
        }
        // The step zeroes this member's gradients: not before every other has read its chunk.
        device_barrier({Tag::Kind::allreduce, iteration_, 4, 0});
    }
    /// Its first half: replica me's part of its gradients (part(me)) becomes the sum of every
    /// replica's, in replica order: ((g0 + g1) + g2) + ..., bitwise group_allreduce_sum's. Until
    /// the barrier that ends it, chunk `me` of every member's array is this member's alone (each
    /// member reads and writes only its own chunk's values), so the sum of the members before it
    /// is taken in member 0's chunk and then added to its own values (addition commutes: g + s
    /// is s + g to the bit). Returns every member's gradient array, in replica order.
    std::vector<DeviceSpan> reduce_scatter_on_device() {
        const std::size_t n = dp_group_.size(), me = place_.replica;
        const std::vector<DeviceSpan> g =
            share_arrays(in_place(compute_->gradients_in_place(), gradient_count_, "gradients"),
                         {Tag::Kind::allreduce, iteration_, 2, 0});
        const ValueRange mine = part(me);
        const auto chunk = [&](std::size_t j) { return g[j].sub(mine.first, mine.count); };
        DeviceOps& ops = device_ops();
        for (std::size_t j = 1; j < me; ++j) ops.add(chunk(j), chunk(0));
        if (me > 0) ops.add(chunk(0), chunk(me));
        for (std::size_t j = me + 1; j < n; ++j) ops.add(chunk(j), chunk(me));
        // Every part summed before any member reads another's, or changes its own array again.
        device_barrier({Tag::Kind::allreduce, iteration_, 3, 0});
        return g;
    }
    /// Every member of the replicas' group tells the others where its array `mine` is, once its
    /// device has finished the work queued on it (its values are complete): each member's array
    /// in replica order. A barrier too: no member returns before every member called it.
    std::vector<DeviceSpan> share_arrays(DeviceSpan mine, const Tag& tag) {
        device_ops().synchronize();
        const std::size_t n = dp_group_.size(), me = place_.replica;
        const Bytes msg = span_message(mine);
        for (std::size_t k = 0; k < n; ++k)
            if (k != me) net_.send(dp_group_[k], tag, msg);
        std::vector<DeviceSpan> out(n);
        out[me] = mine;
        for (std::size_t k = 0; k < n; ++k)
            if (k != me) out[k] = span_from(net_.recv(dp_group_[k], tag), tag, dp_group_[k], mine.count);
        return out;
    }
    /// Returns when every replica's device has finished the work queued on it so far.
    void device_barrier(const Tag& tag) {
        device_ops().synchronize();
        group_barrier(net_, dp_group_, tag);
    }
    /// Replica k's part of the stage's values: the chunk it sums, and under ZeRO-1 steps.
    ValueRange part(std::size_t k) const { return optimizer_part(gradient_count_, k, dp_group_.size()); }

    // --- ZeRO-1 ----------------------------------------------------------------------------
    /// The replicas' gradients summed part by part (each needs only its part's sums: a
    /// reduce-scatter), each replica's step of its part, then the parts' all-gather: the traffic
    /// of one all-reduce. Gradients tied across stages need whole rows: those are all-reduced
    /// whole (half as much traffic again).
    void finish_sharded(bool tied) {
        if (!tied && dp_on_device_) {
            timed(TaskKind::allreduce, 0, [&] { reduce_scatter_on_device(); }, 0.5);
        } else if (!tied && device_comm_) {
            timed(TaskKind::allreduce, 0, [&] { reduce_scatter_through_comm(); }, 0.5);
        } else {
            timed(TaskKind::allreduce, 0, [&] { sum_through_host(tied); }, 0.5);
        }
        timed(TaskKind::optimizer, 0, [&] { compute_->step(ex_.options().optimizer, iteration_ + 1); });
        timed(TaskKind::allreduce, 0, [&] { gather_parameters(); }, 0.5);
    }

    /// The reduce-scatter through the device communicator: ncclReduceScatter takes parts of one
    /// size, so part k of the gradients goes at k x c of a buffer padded to n parts of c; this
    /// replica's summed part is written back.
    void reduce_scatter_through_comm() {
        // The stage keeps its gradients padded (with zeros) to n parts of c: ncclReduceScatter's
        // output is then the input's own part.
        const std::size_t n = dp_group_.size(), c = (gradient_count_ + n - 1) / n;
        const DeviceSpan g = in_place(compute_->gradients_in_place(), c * n, "gradients");
        device_comm_->reduce_scatter_sum(dp_group_, {Tag::Kind::allreduce, iteration_, 8, 0}, g.sub(0, c * n),
                                         g.sub(place_.replica * c, c));
    }

    /// The replicas' gradients summed through the host, all of the stage's in one message, in
    /// replica order: whole (an all-reduce), or only this replica's part (ZeRO-1's
    /// reduce-scatter); then the ties across stages.
    void sum_through_host(bool whole) {
        std::vector<std::vector<float>>& grads = compute_->pull_grads();
        if (dp_group_.size() > 1) {
            std::vector<float> flat;
            for (const auto& g : grads) flat.insert(flat.end(), g.begin(), g.end());
            const Tag tag{Tag::Kind::allreduce, iteration_, 1, 0};
            if (whole) group_allreduce_sum(net_, dp_group_, tag, flat);
            else group_reduce_scatter_sum(net_, dp_group_, tag, flat);
            std::size_t at = 0;
            for (auto& g : grads) {
                std::copy_n(flat.begin() + static_cast<std::ptrdiff_t>(at), g.size(), g.begin());
                at += g.size();
            }
        }
        exchange_tied(grads);
        compute_->push_grads();
    }

    /// Every replica's stepped part of the parameters to every other replica.
    void gather_parameters() {
        const std::size_t n = dp_group_.size(), me = place_.replica;
        const ValueRange mine = part(me);
        if (dp_on_device_) {
            // In place: each member copies every other's stepped part from that member's master
            // weights.
            const std::vector<DeviceSpan> p = share_arrays(
                in_place(compute_->parameters_in_place(), gradient_count_, "master weights"),
                {Tag::Kind::allreduce, iteration_, 5, 0});
            for (std::size_t k = 0; k < n; ++k) {
                if (k == me) continue;
                const ValueRange theirs = part(k);
                compute_->import_parameters(p[k].sub(theirs.first, theirs.count), theirs.first);
            }
            // Every member done reading the others' weights before any goes on (after the last
            // iteration, a member's stage, and its arrays, may go).
            device_barrier({Tag::Kind::allreduce, iteration_, 9, 0});
        } else if (device_comm_) {
            // ncclAllGather takes parts of one size: in place, the stage keeping its master
            // weights padded to them.
            const std::size_t c = (gradient_count_ + n - 1) / n;
            const DeviceSpan p = in_place(compute_->parameters_in_place(), c * n, "master weights").sub(0, c * n);
            device_comm_->allgather(dp_group_, {Tag::Kind::allreduce, iteration_, 6, 0}, p.sub(me * c, c), p);
            compute_->refresh_compute_copy();
            device_ops().synchronize();
        } else {
            std::vector<float> flat(gradient_count_);
            const std::vector<float> stepped = compute_->parameters(mine.first, mine.count);
            std::copy(stepped.begin(), stepped.end(), flat.begin() + static_cast<std::ptrdiff_t>(mine.first));
            group_allgather_parts(net_, dp_group_, {Tag::Kind::allreduce, iteration_, 7, 0}, flat);
            for (std::size_t k = 0; k < n; ++k)
                if (k != me)
                    compute_->set_parameters(part(k).first, std::span<const float>(flat).subspan(part(k).first, part(k).count));
        }
    }

    /// For a caller that keeps the state (an adaptive run moves and copies whole layers): the
    /// replicas all-gather their parts of the moments, so that each returns them whole. When a
    /// replica of the stage has left, its part went with it: the moments come back empty (the
    /// adaptive job rolls back to its snapshot after a departure, and never uses them).
    void unshard_moments(std::vector<ShardState>& state, const std::vector<std::size_t>& left) {
        const bool whole = std::none_of(dp_group_.begin(), dp_group_.end(), [&](std::size_t r) {
            return std::find(left.begin(), left.end(), r) != left.end();
        });
        const ValueRange mine = part(place_.replica);
        for (std::uint32_t which = 0; which < 2; ++which) {
            std::vector<float> flat(whole ? gradient_count_ : 0);
            std::size_t base = 0;
            for (ShardState& st : state) {
                std::vector<float>& x = which == 0 ? st.m : st.v;
                if (whole) std::copy(x.begin(), x.end(), flat.begin() + static_cast<std::ptrdiff_t>(base + layer_part(mine, base, st.params.size()).first));
                base += st.params.size();
            }
            if (whole) group_allgather_parts(net_, dp_group_, {Tag::Kind::allgather, iteration_, 8 + which, 0}, flat);
            base = 0;
            for (ShardState& st : state) {
                std::vector<float>& x = which == 0 ? st.m : st.v;
                if (whole) x.assign(flat.begin() + static_cast<std::ptrdiff_t>(base),
                                    flat.begin() + static_cast<std::ptrdiff_t>(base + st.params.size()));
                else x.clear();
                base += st.params.size();
            }
        }
    }

    // --- The schedule's steps ------------------------------------------------------------------
    void forward(std::uint32_t mb) {
        InFlight& f = in_flight_[mb];
        f = InFlight{};
        f.first_sample = microbatch_first_sample(mb) + offset();
        const std::size_t s = place_.stage, S = plan_.stages.size();
        const Tag tag{Tag::Kind::activation, iteration_, mb, 0};
        const std::span<const std::size_t> none;
        std::optional<DeviceHandoff> dev =
            handoff(s > 0 ? std::optional(s - 1) : std::nullopt, on_device_prev_, via_comm_prev_,
                    s > 0 ? ex_.live_in(s) : none, s + 1 < S ? std::optional(s + 1) : std::nullopt, on_device_next_,
                    s + 1 < S ? ex_.live_in(s + 1) : none, tag);
        TensorMap in;
        if (s > 0)
            in = recv_rows(s - 1, ex_.live_in(s), tag, on_device_prev_);
        else if (!compute_->makes_model_input())
            in.emplace(model_input, synthetic_input(model_, ex_.options().seed, f.first_sample, rows()));
        timed(TaskKind::forward, mb, [&] {
            f.acts = &compute_->forward(mb, context(f), rows(), std::move(in), keep_, dev ? &*dev : nullptr);
        });
        if (s + 1 < S) {
            timed(TaskKind::send_activation, mb, [&] {
                for (const Overlap& o : overlaps(s + 1))
                    if (!on_device_next_[o.replica]) send_rows(s + 1, o, ex_.live_in(s + 1), *f.acts, tag);
                if (dev) send_parcels(s + 1, on_device_next_, via_comm_next_, *dev, tag);
            });
        } else if (place_.tp_rank == 0) {
            loss_ += loss_sum(f.acts->at(stage_.last_layer));
        }
    }

    /// The sum over the batch of each sample's loss, divided by the global batch.
    double loss_sum(const Tensor& out) const {
        double sum = 0;
        if (is_loss(model_.layers[stage_.last_layer])) {
            for (float x : out.data) sum += x;
        } else {  // no loss layer: half the squared output
            for (float x : out.data) sum += 0.5 * static_cast<double>(x) * x;
        }
        return sum / static_cast<double>(model_.global_batch);
    }
    Tensor loss_gradient(const Tensor& out) const {
        Tensor g(out.shape);
        const float scale = 1.0f / static_cast<float>(model_.global_batch);
        const bool loss = is_loss(model_.layers[stage_.last_layer]);
        for (std::size_t i = 0; i < g.data.size(); ++i) g.data[i] = loss ? scale : out.data[i] * scale;
        return g;
    }

    void backward(std::uint32_t mb) {
        InFlight& f = in_flight_[mb];
        const std::size_t s = place_.stage, S = plan_.stages.size();
        const Tag tag{Tag::Kind::gradient, iteration_, mb, 0};
        const std::span<const std::size_t> none;
        std::optional<DeviceHandoff> dev =
            handoff(s + 1 < S ? std::optional(s + 1) : std::nullopt, on_device_next_, via_comm_next_,
                    s + 1 < S ? ex_.live_in(s + 1) : none, s > 0 ? std::optional(s - 1) : std::nullopt,
                    on_device_prev_, s > 0 ? ex_.live_in(s) : none, tag);
        TensorMap grads;
        if (s + 1 < S)
            grads = recv_rows(s + 1, ex_.live_in(s + 1), tag, on_device_next_);
        else
            grads.emplace(stage_.last_layer, loss_gradient(f.acts->at(stage_.last_layer)));
        // Gradients leave through the host only for a previous stage not sharing memory.
        const bool host_out = std::find(on_device_prev_.begin(), on_device_prev_.end(), false) != on_device_prev_.end();
        timed(TaskKind::backward, mb, [&] {
            grads = compute_->backward(mb, context(f), std::move(grads), host_out ? ex_.live_in(s) : none,
                                       dev ? &*dev : nullptr);
        });
        if (s > 0) {
            timed(TaskKind::send_gradient, mb, [&] {
                for (const Overlap& o : overlaps(s - 1))
                    if (!on_device_prev_[o.replica]) send_rows(s - 1, o, ex_.live_in(s), grads, tag);
                if (dev) send_parcels(s - 1, on_device_prev_, via_comm_prev_, *dev, tag);
            });
        }
        f = InFlight{};
    }

    void finish_iteration() {
        const bool tied = std::any_of(ex_.tied().begin(), ex_.tied().end(),
                                      [&](const auto& p) { return holds(p.first) || holds(p.second); });
        if (zero_) {
            finish_sharded(tied);
            return;
        }
        // Without replicas, ties are summed where the gradients are (on the device, for a device
        // stage): within the stage in place, across stages by exchanging the tied rows only.
        if (tied && dp_group_.size() == 1) {
            timed(TaskKind::allreduce, 0, [&] {
                for (const auto& [emb, lin] : ex_.tied()) {
                    const std::size_t n = tied_size(emb);
                    if (holds(emb) && holds(lin)) {
                        compute_->tie_gradients(emb - stage_.first_layer, lin - stage_.first_layer, n);
                    } else if ((holds(emb) || holds(lin)) && tie_on_device(emb, lin)) {
                        // Each holder adds the other's rows to its own: e + h on both (addition
                        // commutes), where the gradients are.
                        const std::size_t mine = holds(emb) ? emb : lin, theirs = holds(emb) ? lin : emb;
                        const std::size_t other = peer(stage_of(theirs), 0, 0);
                        const Tag tag{Tag::Kind::tied, iteration_, 1, static_cast<std::uint32_t>(lin)};
                        const std::size_t at = gradient_offset(mine);
                        send_span(other, tag, compute_->export_gradients(at, n));
                        compute_->import_gradients(recv_span(other, tag, n), at, true);
                    } else if (holds(emb) || holds(lin)) {
                        const std::size_t mine = holds(emb) ? emb : lin;
                        std::vector<std::vector<float>> one(stage_.last_layer - stage_.first_layer + 1);
                        one[mine - stage_.first_layer] = compute_->gradient(mine - stage_.first_layer, n);
                        exchange_tied(one, emb, lin);
                        compute_->set_gradient(mine - stage_.first_layer, one[mine - stage_.first_layer]);
                    }
                }
            });
        } else if (dp_group_.size() > 1 && !tied && dp_on_device_) {
            timed(TaskKind::allreduce, 0, [&] { allreduce_on_device(); });
        } else if (dp_group_.size() > 1 && !tied && device_comm_) {
            timed(TaskKind::allreduce, 0, [&] { allreduce_through_comm(); });
        } else if (dp_group_.size() > 1 || tied) {
            timed(TaskKind::allreduce, 0, [&] { sum_through_host(true); });
        }
        timed(TaskKind::optimizer, 0, [&] { compute_->step(ex_.options().optimizer, iteration_ + 1); });
    }

    bool holds(std::size_t l) const { return l >= stage_.first_layer && l <= stage_.last_layer; }
    std::span<float> tied_grad(std::vector<std::vector<float>>& grads, std::size_t l, std::size_t n) const {
        return std::span<float>(grads[l - stage_.first_layer]).first(n);
    }

    /// An embedding and the linear layer tied to it each end the iteration with the sum of
    /// both gradients (embedding's + linear's, in that order), so that their copies stay equal.
    /// Every tie (or only the one of `only_emb` and `only_lin`), on host copies of the gradients.
    void exchange_tied(std::vector<std::vector<float>>& grads, std::size_t only_emb = model_input,
                       std::size_t only_lin = model_input) {
        for (const auto& [emb, lin] : ex_.tied()) {
            if (only_emb != model_input && (emb != only_emb || lin != only_lin)) continue;
            if (!holds(emb) && !holds(lin)) continue;
            const std::size_t n = tied_size(emb);
            if (holds(emb) && holds(lin)) {
                auto e = tied_grad(grads, emb, n), h = tied_grad(grads, lin, n);
                for (std::size_t i = 0; i < n; ++i) e[i] = e[i] + h[i];
                std::copy(e.begin(), e.end(), h.begin());
                continue;
            }
            const std::size_t mine = holds(emb) ? emb : lin, theirs = holds(emb) ? lin : emb;
            const std::size_t other_stage = stage_of(theirs);
            const Tag tag{Tag::Kind::tied, iteration_, 0, static_cast<std::uint32_t>(lin)};
            auto g = tied_grad(grads, mine, n);
            if (place_.replica == 0 && place_.tp_rank == 0) {
                Bytes msg;
                append(msg, std::span<const float>(g.data(), g.size()));
                const Stage& o = plan_.stages[other_stage];
                for (std::size_t i = 0; i < o.devices.size(); ++i)
                    net_.send(peer(other_stage, i / o.tp, i % o.tp), tag, msg);
            }
            std::vector<float> other(n);
            Reader(net_.recv(peer(other_stage, 0, 0), tag)).read_into(std::span<float>(other));
            for (std::size_t i = 0; i < n; ++i) g[i] = holds(emb) ? g[i] + other[i] : other[i] + g[i];
        }
    }
    /// Whether the tie of `emb` and `lin`, on two stages of one worker each, is summed on the
    /// device (the two workers share memory).
    bool tie_on_device(std::size_t emb, std::size_t lin) const {
        const std::size_t other = stage_of(holds(emb) ? lin : emb);
        return stage_.devices.size() == 1 && plan_.stages[other].devices.size() == 1 &&
               shares_memory_with(other).front();
    }
    /// Where layer `l`'s gradients start in the stage's gradients seen as one array.
    std::size_t gradient_offset(std::size_t l) const { return gradient_offsets_.at(l - stage_.first_layer); }

    std::size_t stage_of(std::size_t layer) const {
        for (std::size_t s = 0; s < plan_.stages.size(); ++s)
            if (layer >= plan_.stages[s].first_layer && layer <= plan_.stages[s].last_layer) return s;
        return 0;
    }

    const Execution& ex_;
    const Model& model_;
    const Plan& plan_;
    WorkerPlace place_;
    const Stage& stage_;
    std::size_t rank_;
    Transport& net_;
    TransportGroup tp_;
    std::vector<std::size_t> dp_group_;
    std::unique_ptr<StageCompute> compute_;
    std::vector<std::size_t> keep_;  // the outputs forward must return: what the next stage reads, the last layer
    // Per replica of the previous and next stages: tensors handed over on the device.
    std::vector<bool> on_device_prev_, on_device_next_;
    // Of those, the replicas reached through the device communicator (not sharing memory).
    std::vector<bool> via_comm_prev_, via_comm_next_;
    std::unique_ptr<DeviceComm> device_comm_;  // RunOptions::device_fabric's, or null
    bool dp_on_device_ = false;  // the replicas all share this worker's memory: all-reduce on the device
    bool zero_ = false;          // ZeRO-1: this replica steps its part (optimizer_part) of the stage's values
    bool whole_state_ = false;   // the caller keeps the final state: the moments are returned whole
    std::vector<std::size_t> gradient_offsets_;  // per layer of the stage, in its gradients as one array
    std::size_t gradient_count_ = 0;
    bool device_slowed_ = false;     // the stage realises this iteration's slowdown itself
    std::map<std::uint32_t, InFlight> in_flight_;
    std::uint32_t iteration_ = 0;
    Clock::time_point t0_;
    double loss_ = 0;
    std::uint64_t last_checkpoint_ = 0;
    std::vector<TaskRecord>* records_ = nullptr;
    Conditions conditions_{device_count()};
    std::size_t device_count() const {
        std::size_t n = 0;
        for (const Stage& st : plan_.stages)
            for (std::size_t d : st.devices) n = std::max(n, d + 1);
        for (const ScenarioEvent& e : ex_.options().scenario.events) n = std::max({n, e.device + 1, e.a + 1, e.b + 1});
        return n;
    }
};

}  // namespace

WorkerReport Execution::run_worker(std::size_t rank, Transport& net, std::vector<ShardState>* state) const {
    std::uint32_t iteration = 0;
    try {
        Worker w(*this, rank, net, state);
        try {
            WorkerReport report = w.run();
            if (state != nullptr) *state = std::move(report.state), report.state.clear();
            return report;
        } catch (...) {
            iteration = w.iteration();
            // Peers may wait on this worker inside NCCL, beyond the transport's reach: stop every
            // device communicator first (before this worker's own buffers and streams go).
            if (options_.device_fabric) options_.device_fabric->abort_all();
            throw;
        }
    } catch (const PeerStopped&) {
        if (options_.device_fabric) options_.device_fabric->abort_all();
        throw;
    } catch (const std::exception& e) {
        if (options_.device_fabric) options_.device_fabric->abort_all();
        const WorkerPlace& p = places_.at(rank);
        const std::string msg =
            fmt::format("worker {} (stage {}, replica {}, device index {}) stopped at iteration {}: {}", rank, p.stage,
                        p.replica, p.device, iteration, e.what());
        net.abort(msg);
        if (const auto* in = dynamic_cast<const InputError*>(&e)) throw InputError(in->where(), in->detail());
        throw RuntimeError(msg);
    }
}

namespace {

/// Waits until `deadline` unless stopped first; false when stopped.
bool wait_until(std::stop_token stop, std::chrono::steady_clock::time_point deadline) {
    std::mutex m;
    std::condition_variable_any cv;
    std::unique_lock lock(m);
    (void)cv.wait_until(lock, stop, deadline, [] { return false; });
    return std::chrono::steady_clock::now() >= deadline || !stop.stop_requested();
}

}  // namespace

void Execution::measure_probe(const IdleProbe& probe, std::size_t device, double slowdown, std::stop_token stop,
                      WorkerReport& report) const {
    using Clock = std::chrono::steady_clock;
    const std::size_t s = probe.stage;
    const Stage& stage = plan_.stages.at(s);
    Stage alone = stage;
    alone.tp = 1;
    alone.devices = {device};
    StageSetup setup{&model_, &alone, WorkerPlace{s, 0, 0, device}, options_.seed, {}, options_.recompute, std::nullopt};
    for (std::size_t l = stage.first_layer; l <= stage.last_layer; ++l)
        setup.state.push_back(initial_state(model_, l, Shard{0, 1}, options_.seed));
    const std::unique_ptr<StageCompute> compute =
        options_.backend ? options_.backend(std::move(setup)) : make_cpu_stage(std::move(setup));
    const bool realised = compute->apply_slowdown(slowdown);
    const std::size_t rows = shares_.at(s).at(0);
    const std::vector<std::size_t> keep{stage.last_layer};
    const std::span<const std::size_t> none;
    StepContext ctx;
    ctx.seed = options_.seed;
    // Inputs as the stage receives them: the model's, or the earlier layers' outputs (made up).
    TensorMap inputs;
    if (s == 0) {
        if (!compute->makes_model_input()) inputs.emplace(model_input, synthetic_input(model_, options_.seed, 0, rows));
    } else {
        for (std::size_t l : live_in_.at(s)) {
            std::vector<std::size_t> shape{rows};
            for (std::size_t d : sample_shape(model_, l)) shape.push_back(d);
            Tensor t(shape);
            for (std::size_t i = 0; i < t.data.size(); ++i)
                t.data[i] = random_symmetric(options_.seed, stream_of(Stream::input, l + 1), i);
            inputs.emplace(l, std::move(t));
        }
    }
    // The CPU stage's device is a core it shares with the workers' threads: its time is this
    // thread's CPU time (its wall time would count the time the workers had the cores). A device
    // stage's is the wall time of its synchronised work.
    const bool on_cores = compute->device_memory().ops == nullptr;
    const auto now = [on_cores] {
        if (on_cores) {
            timespec ts{};
            if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) == 0)
                return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
        }
        return std::chrono::duration<double>(Clock::now().time_since_epoch()).count();
    };
    // One microbatch, timed from its inputs' arrival (as a worker's forward and backward tasks).
    const auto step = [&](std::uint32_t mb) {
        TensorMap in = inputs;
        const double t = now();
        const TensorMap& out = compute->forward(mb, ctx, rows, std::move(in), keep, nullptr);
        const double forward = now() - t;
        TensorMap grads;
        Tensor g(out.at(stage.last_layer).shape);
        std::fill(g.data.begin(), g.data.end(), 1.0f / static_cast<float>(model_.global_batch));
        grads.emplace(stage.last_layer, std::move(g));
        const double b = now();
        (void)compute->backward(mb, ctx, std::move(grads), none, nullptr);
        return forward + now() - b;
    };
    (void)step(0);  // warm-up: first-touch allocations, caches
    // The median of a few repeats: one microbatch is short, and a single preemption of it on
    // shared cores would read as a slow device.
    std::vector<double> times;
    for (std::uint32_t k = 1; k <= idle_probe_repeats && (k == 1 || !stop.stop_requested()); ++k)
        times.push_back(step(k));
    std::sort(times.begin(), times.end());
    const double busy = times[times.size() / 2];
    // The rest of the time a slowed device would take, as the workers wait it out (timed()).
    const double factor = realised ? 1.0 : slowdown;
    const double target = options_.emulate ? std::max(busy, probe.predicted_s * factor) : factor * busy;
    const auto start = Clock::now();
    report.probe_finished = target <= busy || wait_until(stop, start + std::chrono::duration_cast<Clock::duration>(
                                                                        std::chrono::duration<double>(target - busy)));
    // Waited out in full, it took the target (not the wait's wake-up delay on busy cores).
    report.probe_s = report.probe_finished ? target : busy + std::chrono::duration<double>(Clock::now() - start).count();
}

WorkerReport Execution::run_idle(std::size_t device, Transport& net, const IdleProbe* probe) const {
    WorkerReport report;
    report.rank = net.rank();
    report.stopped_at = options_.iterations;
    std::size_t devices = device + 1;
    for (const ScenarioEvent& e : options_.scenario.events) devices = std::max({devices, e.device + 1, e.a + 1, e.b + 1});
    // The probe runs beside the votes and writes only its own fields of the report; it is
    // stopped (and joined) when they are over, or when a vote throws (before `report` goes: it
    // is declared first).
    std::jthread prober;
    if (probe != nullptr && first_iteration_ < options_.iterations) {
        const double slowdown = conditions_at(options_.scenario, devices, first_iteration_).slowdown.at(device);
        prober = std::jthread([&, slowdown](std::stop_token stop) {
            try {
                measure_probe(*probe, device, slowdown, stop, report);
            } catch (...) {
                report.probe_s.reset();  // no memory for the layers, say: nothing measured
            }
        });
    }
    for (std::uint64_t it = first_iteration_; it < options_.iterations; ++it) {
        const bool failed = conditions_at(options_.scenario, devices, it).failed.at(device);
        report.left = departures(net, ranks_.members, static_cast<std::uint32_t>(it), failed);
        if (!report.left.empty()) {
            report.stopped_at = it;
            break;
        }
        report.busy_s.push_back(0.0);
        report.loss.push_back(0.0);
    }
    if (prober.joinable()) {
        prober.request_stop();
        prober.join();
    }
    return report;
}

// --- Gathering the results ----------------------------------------------------------------

std::uint64_t digest(const std::vector<std::vector<float>>& weights) {
    std::uint64_t h = 0xcbf29ce484222325ull;
    for (const auto& layer : weights) {
        const auto* p = reinterpret_cast<const unsigned char*>(layer.data());
        for (std::size_t i = 0; i < layer.size() * sizeof(float); ++i) {
            h ^= p[i];
            h *= 0x100000001b3ull;
        }
    }
    return h;
}

std::string digest_text(std::uint64_t d) { return fmt::format("fnv1a64:{:016x}", d); }

namespace {

RunResult assemble(const Execution& ex, std::vector<WorkerReport> reports) {
    const Plan& plan = ex.plan();
    const Model& model = ex.model();
    RunResult r;
    r.first_iteration = ex.first_iteration();
    const std::size_t N = ex.options().iterations - ex.first_iteration();
    r.iteration_s.assign(N, 0.0);
    r.loss.assign(N, 0.0);
    for (const WorkerReport& w : reports)
        for (std::size_t it = 0; it < N; ++it) {
            r.iteration_s[it] = std::max(r.iteration_s[it], w.busy_s.at(it));
            r.loss[it] += w.loss.at(it);
        }
    r.weights = canonical_weights(model, plan, [&](std::size_t s, std::uint32_t t, std::size_t l) -> const std::vector<float>& {
        return reports.at(ex.rank_of(s, 0, t)).state.at(l - plan.stages[s].first_layer).params;
    });
    r.weights_digest = digest(r.weights);
    r.workers = std::move(reports);
    return r;
}

}  // namespace

Bytes serialise_report(const WorkerReport& w) {
    Bytes b;
    append_value(b, static_cast<std::uint64_t>(w.tasks.size()));
    append(b, std::span<const TaskRecord>(w.tasks));
    append_value(b, static_cast<std::uint64_t>(w.busy_s.size()));
    append(b, std::span<const double>(w.busy_s));
    append(b, std::span<const double>(w.loss));
    append_value(b, w.stopped_at);
    append_value(b, static_cast<std::uint64_t>(w.left.size()));
    append(b, std::span<const std::size_t>(w.left));
    append_value(b, w.peak_device_bytes);
    append_value(b, w.cached_device_bytes);
    append_value(b, static_cast<std::uint64_t>(w.state.size()));
    for (const auto& p : w.state) {
        append_value(b, static_cast<std::uint64_t>(p.params.size()));
        append(b, std::span<const float>(p.params));
    }
    return b;
}

WorkerReport deserialise_report(const Bytes& b, std::size_t rank) {
    Reader in(b);
    WorkerReport w;
    w.rank = rank;
    w.tasks.resize(in.value<std::uint64_t>());
    in.read_into(std::span<TaskRecord>(w.tasks));
    const auto n = in.value<std::uint64_t>();
    w.busy_s.resize(n);
    w.loss.resize(n);
    in.read_into(std::span<double>(w.busy_s));
    in.read_into(std::span<double>(w.loss));
    w.stopped_at = in.value<std::uint64_t>();
    w.left.resize(in.value<std::uint64_t>());
    in.read_into(std::span<std::size_t>(w.left));
    w.peak_device_bytes = in.value<std::uint64_t>();
    w.cached_device_bytes = in.value<std::uint64_t>();
    w.state.resize(in.value<std::uint64_t>());
    for (auto& p : w.state) {
        p.params.resize(in.value<std::uint64_t>());
        in.read_into(std::span<float>(p.params));
    }
    return w;
}

std::vector<std::vector<float>> canonical_weights(
    const Model& model, const Plan& plan,
    const std::function<const std::vector<float>&(std::size_t stage, std::uint32_t tp_rank, std::size_t layer)>& shard) {
    std::vector<std::vector<float>> weights(model.layers.size());
    for (std::size_t s = 0; s < plan.stages.size(); ++s) {
        const Stage& st = plan.stages[s];
        for (std::size_t l = st.first_layer; l <= st.last_layer; ++l)
            for (std::uint32_t t = 0; t < st.tp; ++t) {
                const auto k = make_cpu_kernel(model, l, Shard{t, st.tp});
                weights[l].resize(k->full_params());
                k->from_shard(shard(s, t, l), weights[l]);
            }
    }
    for (std::size_t l = 0; l < model.layers.size(); ++l)
        if (const auto* lin = std::get_if<LinearOp>(&model.layers[l].op); lin && lin->tied_to) {
            const auto& e = std::get<EmbeddingOp>(model.layers[*lin->tied_to].op);
            weights[l].erase(weights[l].begin(), weights[l].begin() + static_cast<std::ptrdiff_t>(e.vocab * e.hidden));
        }
    return weights;
}

void run_on_threads(std::size_t n, const std::function<void(std::size_t)>& body) {
    std::vector<std::exception_ptr> errors(n);
    {
        std::vector<std::jthread> threads;
        for (std::size_t i = 0; i < n; ++i)
            threads.emplace_back([&, i] {
                try {
                    body(i);
                } catch (...) {
                    errors[i] = std::current_exception();
                }
            });
    }
    // Report the failure that stopped the others, not the stops it caused.
    std::exception_ptr stopped;
    for (const auto& e : errors) {
        if (!e) continue;
        try {
            std::rethrow_exception(e);
        } catch (const PeerStopped&) {
            stopped = e;
        } catch (...) {
            throw;
        }
    }
    if (stopped) std::rethrow_exception(stopped);
}

RunResult run_in_process(const Execution& ex) {
    prepare_cpu_workers();
    InProcessNetwork network(ex.workers(), ex.options().timeout);
    std::vector<WorkerReport> reports(ex.workers());
    run_on_threads(ex.workers(), [&](std::size_t r) { reports[r] = ex.run_worker(r, network.endpoint(r)); });
    return assemble(ex, std::move(reports));
}

RunResult run_distributed(const Execution& ex, Transport& net) {
    prepare_cpu_workers();
    if (net.size() != ex.workers())
        throw InputError(fmt::format("the plan has {} devices but {} ranks were started (mpirun -np {})", ex.workers(),
                                     net.size(), ex.workers()));
    WorkerReport mine = ex.run_worker(net.rank(), net);
    const Tag tag{Tag::Kind::report, 0, 0, 0};
    if (net.rank() != 0) {
        net.send(0, tag, serialise_report(mine));
        net.flush();
        return {};
    }
    std::vector<WorkerReport> reports;
    reports.push_back(std::move(mine));
    for (std::size_t r = 1; r < net.size(); ++r) reports.push_back(deserialise_report(net.recv(r, tag), r));
    return assemble(ex, std::move(reports));
}

}  // namespace dpart::rt
