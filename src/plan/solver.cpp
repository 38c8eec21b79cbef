#include "dpart/plan/solver.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <exception>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <set>
#include <system_error>
#include <thread>
#include <tuple>

#include "dpart/core/cores.hpp"
#include "dpart/core/format.hpp"

namespace dpart {

std::string_view to_string(Strategy s) noexcept {
    switch (s) {
        case Strategy::optimal: return "optimal";
        case Strategy::uniform: return "uniform";
        case Strategy::parameters: return "parameters";
        case Strategy::time: return "time";
        case Strategy::data_parallel: return "data-parallel";
    }
    return "?";
}

namespace {

constexpr double inf = std::numeric_limits<double>::infinity();
constexpr std::uint32_t no_choice = UINT32_MAX;

std::uint64_t sat_mul(std::uint64_t a, std::uint64_t b) {
    std::uint64_t r = 0;
    return __builtin_mul_overflow(a, b, &r) ? UINT64_MAX : r;
}
std::uint64_t sat_add(std::uint64_t a, std::uint64_t b) {
    std::uint64_t r = 0;
    return __builtin_add_overflow(a, b, &r) ? UINT64_MAX : r;
}

}  // namespace

bool node_count_allowed(std::size_t k) noexcept {
    while (k % 2 == 0) k /= 2;
    return k == 1 || k == 3;
}

namespace {

/// Prefix sums of per-layer forward and backward seconds, per (device class, samples, tp),
/// built on first use and shared by every device order and microbatch size.
class TimeTables {
public:
    /// With `recompute` (activation checkpointing) a layer's backward runs its forward again.
    TimeTables(const Model& model, const CostModel& cost, std::size_t devices, bool recompute)
        : model_(model), cost_(cost), recompute_(recompute) {
        for (std::size_t d = 0; d < devices; ++d) representative_.emplace(cost.device_class(d), d);
    }
    std::size_t index(std::size_t cls, std::uint64_t samples, std::uint32_t tp) {
        const auto key = std::make_tuple(cls, samples, tp);
        if (auto it = index_.find(key); it != index_.end()) return it->second;
        const std::size_t L = model_.layers.size();
        const std::size_t device = representative_.at(cls);
        std::vector<double> f(L + 1, 0), b(L + 1, 0);
        for (std::size_t l = 0; l < L; ++l) {
            const double fwd = cost_.layer_seconds(l, Pass::forward, device, samples, tp);
            f[l + 1] = f[l] + fwd;
            b[l + 1] = b[l] + cost_.layer_seconds(l, Pass::backward, device, samples, tp) + (recompute_ ? fwd : 0.0);
        }
        forward_.push_back(std::move(f));
        backward_.push_back(std::move(b));
        index_.emplace(key, forward_.size() - 1);
        return forward_.size() - 1;
    }
    const std::vector<double>& forward(std::size_t i) const { return forward_[i]; }
    const std::vector<double>& backward(std::size_t i) const { return backward_[i]; }

private:
    const Model& model_;
    const CostModel& cost_;
    bool recompute_;
    std::map<std::size_t, std::size_t> representative_;
    std::map<std::tuple<std::size_t, std::uint64_t, std::uint32_t>, std::size_t> index_;
    std::vector<std::vector<double>> forward_, backward_;
};

/// Prefix sums of per-device parameters and saved activation bytes for one tensor-parallel degree
/// (split ops rounded up per layer, exactly as stage_memory counts them).
struct MemoryTables {
    std::vector<std::uint64_t> params, saved;
    std::vector<std::uint64_t> workspace;  ///< each layer's per rank (the stage needs its largest)
    /// Prefix counts of the layers that cannot be split over this tp (tp_divides): a stage
    /// holding one cannot take it.
    std::vector<std::uint32_t> indivisible;
};

struct TiedCopy {
    std::size_t layer, target;
    std::uint64_t params;  ///< the copy's parameters, on any stage holding the tied layer
    bool split;
};

/// A candidate device block: devices order[start .. start+size) as `replicas` groups of `tp`.
struct Block {
    std::size_t start = 0, size = 0;
    std::uint32_t tp = 1;
    std::size_t replicas = 1;
    std::vector<std::size_t> tables;  ///< TimeTables indices of the distinct (class, share)
    /// Their forward and backward prefix sums (set once every table exists).
    std::vector<std::pair<const double*, const double*>> prefix;
    const MemoryTables* memory = nullptr;  ///< the prefix sums for this tp (a std::map node: stable)
    std::uint64_t max_share = 1;
    AllreduceCost allreduce;
    std::vector<std::size_t> optimizer_devices;  ///< one device per distinct class
    std::uint64_t capacity = UINT64_MAX;
};

/// The shared, order-independent precomputation for a solve.
struct Context {
    const Model& model;
    const Cluster& cluster;
    const CostModel& cost;
    const CostOptions& copt;
    const SolverOptions& sopt;
    ModelCuts cuts;  ///< cut_bytes and the gradients pending at each layer
    std::map<std::uint32_t, MemoryTables> memory;  ///< by tp
    std::vector<TiedCopy> tied;
    TimeTables times;
    std::uint64_t deficit = UINT64_MAX;  ///< smallest memory excess seen
    bool conservative = false;  ///< some search counted every stage's in-flight microbatches as the first's
    double best_surrogate = std::numeric_limits<double>::infinity();  ///< across all searches so far
    std::size_t evaluations = 0;
    std::size_t level_runs = 0;     ///< DP runs over stage levels
    std::size_t threaded_runs = 0;  ///< DP runs shared among threads

    Context(const Model& m, const Cluster& c, const CostModel& cm, const CostOptions& co, const SolverOptions& so)
        : model(m), cluster(c), cost(cm), copt(co), sopt(so), cuts(model_cuts(m)), times(m, cm, c.devices.size(), co.recompute) {
        for (std::size_t l = 0; l < m.layers.size(); ++l)
            if (const auto* linear = std::get_if<LinearOp>(&m.layers[l].op); linear && linear->tied_to) {
                tied.push_back({l, *linear->tied_to, held_params(m.layers[l], m.dtype), tp_splits(m.layers[l].op, co.vocab_parallel)});
            }
    }

    const MemoryTables& memory_tables(std::uint32_t tp) {
        auto it = memory.find(tp);
        if (it != memory.end()) return it->second;
        const std::size_t L = model.layers.size();
        MemoryTables t;
        t.params.assign(L + 1, 0);
        t.saved.assign(L + 1, 0);
        t.indivisible.assign(L + 1, 0);
        for (std::size_t l = 0; l < L; ++l) {
            const LayerCost& c = model.layers[l].cost;
            t.indivisible[l + 1] = t.indivisible[l] + (tp_divides(model.layers[l].op, tp) ? 0 : 1);
            const bool split = tp > 1 && tp_splits(model.layers[l].op, copt.vocab_parallel);
            t.params[l + 1] = sat_add(t.params[l], split ? (c.params + tp - 1) / tp : c.params);
            t.saved[l + 1] = sat_add(t.saved[l], saved_per_rank(model.layers[l], tp, copt.fused_attention,
                                                                copt.vocab_parallel));
            t.workspace.push_back(sat_add(
                workspace_per_rank(model.layers[l], model.dtype, tp, copt.fused_attention, copt.vocab_parallel),
                cuts.pending[l]));
        }
        return memory.emplace(tp, std::move(t)).first->second;
    }
};

/// Stage cost as the DP sees it; equals estimate_plan's StageEstimate::stage_s.
struct StageEval {
    double compute = 0;  ///< forward + backward of the slowest replica
    double time = 0;     ///< the full per-microbatch stage time
    std::uint64_t memory = 0;
    bool fits = true;
};

class Search {
public:
    Search(Context& ctx, std::vector<std::size_t> order, std::uint64_t b)
        : ctx_(ctx), order_(std::move(order)), b_(b), M_(ctx.model.global_batch / b),
          L_(ctx.model.layers.size()), D_(order_.size()) {
        build_blocks();
    }

    std::uint64_t microbatches() const { return M_; }

    /// Forward + backward of layers [i, i2) on the block; infinite when one of them cannot be
    /// split over the block's tp (it stays so for every larger i2: the DP's scan stops there).
    double compute_seconds(const Block& blk, std::size_t i, std::size_t i2) const {
        if (blk.memory->indivisible[i2] != blk.memory->indivisible[i]) return inf;
        if (blk.prefix.size() == 1) {  // one device class and share: the common case
            const auto& [F, B] = blk.prefix.front();
            return (F[i2] - F[i]) + (B[i2] - B[i]);
        }
        double f = 0, bw = 0;
        for (const auto& [F, B] : blk.prefix) {
            f = std::max(f, F[i2] - F[i]);
            bw = std::max(bw, B[i2] - B[i]);
        }
        return f + bw;
    }

    std::uint64_t params(const Block& blk, std::size_t i, std::size_t i2) const {
        const MemoryTables& mt = *blk.memory;
        std::uint64_t p = mt.params[i2] - mt.params[i];
        for (const TiedCopy& t : ctx_.tied)
            if (t.layer >= i && t.layer < i2)  // its own copy, next to its embedding too (as dpart run keeps it)
                p = sat_add(p, t.split && blk.tp > 1 ? (t.params + blk.tp - 1) / blk.tp : t.params);
        return p;
    }

    /// `workspace`: the largest workspace_bytes of layers [i, i2) (the DP's scan keeps it).
    std::uint64_t memory(const Block& blk, std::size_t i, std::size_t i2, std::uint64_t in_flight,
                         std::uint64_t workspace) const {
        const MemoryTables& mt = *blk.memory;
        const CostOptions& o = ctx_.copt;
        const std::uint64_t state = state_bytes(params(blk, i, i2), o, ctx_.model.dtype, blk.replicas);
        const std::uint64_t saved = mt.saved[i2] - mt.saved[i];
        std::uint64_t act = 0;
        if (o.recompute) {
            const std::uint64_t input = i == 0 ? 0 : ctx_.cuts.cuts[i];
            act = sat_add(sat_mul(sat_mul(in_flight, blk.max_share), input), sat_mul(blk.max_share, saved));
        } else {
            act = sat_mul(sat_mul(in_flight, blk.max_share), saved);
        }
        return sat_add(sat_add(state, act), sat_mul(blk.max_share, workspace));
    }

    /// The stage's full time (memory checked separately).
    double stage_seconds(const Block& blk, std::size_t i, std::size_t i2, double compute) const {
        double t = compute;
        if (i2 < L_)
            t += ctx_.cost.transfer_seconds(order_[blk.start + blk.size - 1], order_[blk.start + blk.size],
                                            ctx_.cuts.cuts[i2] * blk.max_share);
        if (i > 0)
            t += ctx_.cost.transfer_seconds(order_[blk.start], order_[blk.start - 1], ctx_.cuts.cuts[i] * blk.max_share);
        const std::uint64_t p = params(blk, i, i2);
        double allreduce = blk.allreduce(sat_mul(p, gradient_value_bytes(ctx_.copt, ctx_.model.dtype)));
        if (ctx_.copt.overlap_allreduce) {
            double bwd = 0;
            for (const auto& [F, B] : blk.prefix) bwd = std::max(bwd, B[i2] - B[i]);
            allreduce = exposed_allreduce(allreduce, bwd, true, ctx_.copt.shard_optimizer && blk.replicas > 1);
        }
        double opt = 0;
        const std::uint64_t stepped = optimizer_params(p, blk.replicas, ctx_.copt.shard_optimizer);
        for (std::size_t d : blk.optimizer_devices) opt = std::max(opt, ctx_.cost.optimizer_seconds(d, stepped));
        return t + (allreduce + opt) / static_cast<double>(M_);
    }

    struct Result {
        double value = inf;
        std::vector<Stage> stages;
        double max_stage = 0, sum_stage = 0;
        double max_compute = 0;  ///< forward + backward of the slowest stage: M x it bounds the makespan
    };
    /// The DP. `minmax`: minimise the bottleneck, every stage <= bound; otherwise minimise the
    /// sum of stage times with every stage <= bound. `exact_in_flight`: track the number of
    /// stages after each one (1F1B memory); otherwise every stage keeps `fixed_in_flight`.
    Result run(bool minmax, double bound, bool exact_in_flight, std::uint64_t fixed_in_flight) {
        const std::size_t max_stages = std::min(L_, D_);
        // Levels: k = stages from this one to the last, inclusive; level K means ">= K" when K = M.
        std::size_t K = exact_in_flight ? std::min<std::uint64_t>(max_stages, M_) : 1;
        const bool capped = exact_in_flight && K == M_ && max_stages > M_;
        const std::size_t W = (L_ + 1) * (D_ + 1);
        value_.assign((K + 1) * W, inf);
        choice_.resize((K + 1) * W);  // read only where value_ is finite, i.e. written this run
        if (exact_in_flight) {
            for (std::size_t j = 0; j <= D_; ++j) value_[at(0, L_, j)] = 0;
        }
        // Without levels, level 1 holds "any number of stages" and the terminal is level 1 at L.
        if (!exact_in_flight)
            for (std::size_t j = 0; j <= D_; ++j) value_[at(1, L_, j)] = 0;

        if (exact_in_flight) {
            ++ctx_.level_runs;
            fill<true>(minmax, bound, K, capped, 0);
        } else {
            fill<false>(minmax, bound, 1, false, fixed_in_flight);
        }
        Result r;
        std::size_t best_k = 1;
        for (std::size_t k = 1; k <= K; ++k)
            if (value_[at(k, 0, 0)] < r.value) {
                r.value = value_[at(k, 0, 0)];
                best_k = k;
            }
        if (r.value == inf) {
            release();
            return r;
        }
        // Walk the choices.
        std::size_t i = 0, j = 0, k = best_k;
        while (i < L_) {
            const Choice c = choice_[at(k, i, j)];
            const Block& blk = blocks_[c.block];
            Stage st;
            st.first_layer = i;
            st.last_layer = c.i2 - 1;
            st.tp = blk.tp;
            st.devices.assign(order_.begin() + static_cast<std::ptrdiff_t>(blk.start),
                              order_.begin() + static_cast<std::ptrdiff_t>(blk.start + blk.size));
            const double compute = compute_seconds(blk, i, c.i2);
            ++ctx_.evaluations;
            const double t = stage_seconds(blk, i, c.i2, compute);
            r.max_compute = std::max(r.max_compute, compute);
            r.max_stage = std::max(r.max_stage, t);
            r.sum_stage += t;
            r.stages.push_back(std::move(st));
            j = blk.start + blk.size;
            i = c.i2;
            if (exact_in_flight) k = c.level == 1 ? K : k - 1;
        }
        release();
        return r;
    }

    /// j-major, so that scanning the layer end i2 for one device position reads contiguously.
    std::size_t at(std::size_t k, std::size_t i, std::size_t j) const {
        return k * (L_ + 1) * (D_ + 1) + j * (L_ + 1) + i;
    }

    /// What a DP run tallies besides its tables: per thread, merged after the run.
    struct Tally {
        std::size_t evaluations = 0;
        std::uint64_t deficit = UINT64_MAX;  ///< smallest memory excess seen
    };

    /// One state of the DP: the best first stage for layers i.. on the devices from position j,
    /// with k stages to go (with levels). It reads only states of later layers.
    template <bool Levels>
    void solve_state(std::size_t k, std::size_t i, std::size_t j, bool minmax, double bound, std::size_t K,
                     bool capped, std::uint64_t flight, Tally& tally) {
        if (i > 0 && j == 0) return;  // unreachable: earlier layers need earlier devices
        if (i == 0 && j > 0) return;  // unread: the first layer starts on the first device
        // With levels, k stages (at least k at the cap) each need a layer and a device: the state
        // is infeasible below that, and its first stage must leave k - 1 layers and devices to
        // the others (level 0 is finite only at L).
        if (Levels && (k > L_ - i || k > D_ - j)) return;
        const std::size_t last_i2 = Levels ? L_ - (k - 1) : L_;
        double best = inf;
        Choice pick;
        for (std::uint32_t bi = 0; bi < blocks_at_[j].size(); ++bi) {
            const Block& blk = blocks_[blocks_at_[j][bi]];
            const std::size_t next_j = j + blk.size;
            if (Levels && k - 1 > D_ - next_j) continue;
            std::size_t first_i2 = i + 1;
            // No later stage: no devices left, or exactly one stage (level 1 below the cap).
            if (next_j >= D_ || (Levels && k == 1 && !(capped && K == 1))) first_i2 = L_;
            std::uint64_t workspace = 0;
            const std::vector<std::uint64_t>& ws = blk.memory->workspace;
            for (std::size_t l = i; l + 1 < first_i2; ++l) workspace = std::max(workspace, ws[l]);
            for (std::size_t i2 = first_i2; i2 <= last_i2; ++i2) {
                workspace = std::max(workspace, ws[i2 - 1]);
                // Stage compute grows with i2: past the bound or the best, stop.
                const double compute = compute_seconds(blk, i, i2);
                if (compute > bound || compute >= best) break;
                // Successor levels: exactly k-1 stages follow, or ">= K" again when capped.
                double rest = inf;
                std::uint8_t rest_level = 0;
                if (Levels) {
                    rest = value_[at(k - 1, i2, next_j)];
                    if (capped && k == K && value_[at(K, i2, next_j)] < rest) {
                        rest = value_[at(K, i2, next_j)];
                        rest_level = 1;
                    }
                } else {
                    rest = value_[at(1, i2, next_j)];
                }
                if (rest >= best) continue;  // also when rest is inf
                if (!minmax && compute + rest >= best) continue;
                const std::uint64_t mem = memory(blk, i, i2, flight, workspace);
                if (mem > blk.capacity) {
                    tally.deficit = std::min(tally.deficit, mem - blk.capacity);
                    break;  // more layers never need less memory
                }
                ++tally.evaluations;
                const double t = stage_seconds(blk, i, i2, compute);
                if (t > bound) continue;
                const double v = minmax ? std::max(t, rest) : t + rest;
                if (v < best) {
                    best = v;
                    pick = Choice{static_cast<std::uint32_t>(i2), blocks_at_[j][bi], rest_level};
                }
            }
        }
        value_[at(k, i, j)] = best;
        choice_[at(k, i, j)] = pick;
    }

    /// The DP's tables from the last layer back (a template so that the common search without
    /// levels pays nothing for them). The states of one layer are independent of each other:
    /// with several threads, each layer's device positions are shared out in chunks and the
    /// threads meet before the next layer. Every state is computed as by one thread, so the
    /// result does not depend on the thread count.
    template <bool Levels>
    void fill(bool minmax, double bound, std::size_t K, bool capped, std::uint64_t fixed_in_flight) {
        auto positions = [&](std::size_t i, std::size_t j_begin, std::size_t j_end, Tally& tally) {
            for (std::size_t k = 1; k <= K; ++k) {
                const std::uint64_t flight = Levels ? std::min<std::uint64_t>(k, M_) : fixed_in_flight;
                for (std::size_t j = j_end; j-- > j_begin;)
                    solve_state<Levels>(k, i, j, minmax, bound, K, capped, flight, tally);
            }
        };
        // Below this many block scans per layer a thread's share would not pay for the meeting.
        constexpr std::size_t min_parallel_scans = 2048;
        const std::size_t wanted = ctx_.sopt.threads != 0 ? ctx_.sopt.threads : usable_cores();
        const std::size_t threads = blocks_.size() * K < min_parallel_scans ? 1 : std::min(wanted, D_ / 64 + 1);
        std::vector<Tally> tallies(threads);  // threads >= 1
        if (threads == 1) {
            for (std::size_t i = L_; i-- > 0;) positions(i, 0, D_, tallies[0]);
        } else {
            constexpr std::size_t chunk = 16;  // device positions per share
            const std::size_t chunks = (D_ + chunk - 1) / chunk;
            std::size_t layer = L_ - 1;        // written only by the barrier's completion
            std::atomic<std::size_t> next{0};  // the next chunk of this layer
            std::barrier meet(static_cast<std::ptrdiff_t>(threads), [&]() noexcept {
                --layer;
                next.store(0, std::memory_order_relaxed);
            });
            std::exception_ptr error;
            std::mutex error_mutex;
            auto work = [&](std::size_t t) {
                for (std::size_t steps = L_; steps-- > 0;) {
                    const std::size_t i = layer;
                    for (std::size_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
                        try {
                            positions(i, c * chunk, std::min(D_, (c + 1) * chunk), tallies[t]);
                        } catch (...) {  // kept for the caller; the thread still meets the others
                            const std::lock_guard<std::mutex> lock(error_mutex);
                            if (!error) error = std::current_exception();
                        }
                    }
                    meet.arrive_and_wait();
                }
            };
            std::vector<std::thread> pool;
            pool.reserve(threads - 1);  // so that only starting a thread can fail below
            try {
                for (std::size_t t = 1; t < threads; ++t) pool.emplace_back(work, t);
            } catch (const std::system_error&) {
                // The system would start no more: the threads that run share the work, the
                // meeting no longer waits for the others.
                for (std::size_t t = pool.size() + 1; t < threads; ++t) meet.arrive_and_drop();
            }
            if (!pool.empty()) ++ctx_.threaded_runs;
            work(0);
            for (std::thread& th : pool) th.join();
            if (error) std::rethrow_exception(error);
        }
        for (const Tally& t : tallies) {
            ctx_.evaluations += t.evaluations;
            ctx_.deficit = std::min(ctx_.deficit, t.deficit);
        }
    }

    /// Frees large DP tables between runs (many searches stay alive between the two passes);
    /// small ones are kept for the next run.
    void release() {
        if (value_.size() * (sizeof(double) + sizeof(Choice)) <= (std::size_t{16} << 20)) return;
        std::vector<double>().swap(value_);
        std::vector<Choice>().swap(choice_);
    }

    /// Every distinct stage time (for exact bottleneck enumeration on small instances).
    std::vector<double> all_stage_times() const {
        std::vector<double> out;
        for (std::size_t j = 0; j < D_; ++j)
            for (std::size_t bi : blocks_at_[j])
                for (std::size_t i = j == 0 ? 0 : 1; i < (j == 0 ? 1 : L_); ++i)
                    for (std::size_t i2 = i + 1; i2 <= L_; ++i2) {
                        if (i2 < L_ && blocks_[bi].start + blocks_[bi].size >= D_) continue;
                        const double compute = compute_seconds(blocks_[bi], i, i2);
                        if (compute == inf) continue;
                        ++ctx_.evaluations;
                        out.push_back(stage_seconds(blocks_[bi], i, i2, compute));
                    }
        std::sort(out.begin(), out.end());
        out.erase(std::unique(out.begin(), out.end()), out.end());
        return out;
    }

    std::size_t block_count() const { return blocks_.size(); }

    /// The exact 1F1B DP keeps a table per stage level; past 256 MiB of tables it is also too slow.
    bool levels_fit() const {
        const std::size_t K = std::min<std::uint64_t>(std::min(L_, D_), M_);
        return static_cast<double>(K + 1) * static_cast<double>((L_ + 1) * (D_ + 1)) * (sizeof(double) + sizeof(Choice)) <=
               static_cast<double>(1ull << 28);
    }
    /// The conservative stand-in: every stage keeps as many microbatches as the first could.
    std::uint64_t most_in_flight() const { return std::min<std::uint64_t>(std::min(L_, D_), M_); }


private:
    struct Choice {
        std::uint32_t i2 = no_choice;
        std::uint32_t block = no_choice;
        std::uint8_t level = 0;
    };

    void build_blocks() {
        const Cluster& c = ctx_.cluster;
        for (std::size_t d : order_) {
            speed_.push_back(ctx_.cost.device_speed(d));
            class_.push_back(ctx_.cost.device_class(d));
            capacity_.push_back(c.devices[d].mem_bytes());
        }
        // Runs of identical devices (same class, so same speed, and same memory).
        run_end_.assign(D_, D_);
        for (std::size_t x = D_; x-- > 1;)
            if (class_[x - 1] == class_[x] && capacity_[x - 1] == capacity_[x]) run_end_[x - 1] = run_end_[x];
            else run_end_[x - 1] = x;
        blocks_at_.assign(D_, {});
        // Node runs in the order: [run_start, run_end) per position.
        std::vector<std::size_t> run_start(D_), run_end(D_);
        for (std::size_t j = 0; j < D_;) {
            std::size_t e = j;
            while (e < D_ && c.devices[order_[e]].node == c.devices[order_[j]].node) ++e;
            for (std::size_t x = j; x < e; ++x) {
                run_start[x] = j;
                run_end[x] = e;
            }
            j = e;
        }
        const std::uint64_t max_r = ctx_.sopt.max_replicas == 0 ? UINT64_MAX : ctx_.sopt.max_replicas;
        for (std::size_t j = 0; j < D_; ++j) {
            const std::size_t offset = j - run_start[j];
            const std::size_t z = run_end[j] - run_start[j];
            // (size, what a tensor-parallel degree must divide so that no group spans nodes)
            std::vector<std::pair<std::size_t, std::size_t>> sizes;
            for (std::size_t n = 1; n <= z - offset; n *= 2)
                if (offset % n == 0) sizes.push_back({n, n});
            if (offset == 0 && (z & (z - 1)) != 0) sizes.push_back({z, z});
            if (offset == 0) {
                // Whole nodes, in counts of 2^a or 3 x 2^a (2, 3, 4, 6, 8, 12, 16, ...).
                std::size_t end = run_end[j], total = z, g = z, count = 1;
                while (end < D_) {
                    const std::size_t nz = run_end[end] - run_start[end];
                    total += nz;
                    g = std::gcd(g, nz);
                    end = run_end[end];
                    ++count;
                    if (node_count_allowed(count)) sizes.push_back({total, g});
                }
            }
            for (const auto& [n, g] : sizes)
                for (std::uint32_t tp = 1; tp <= ctx_.sopt.max_tp && tp <= n; tp *= 2) {
                    if (n % tp != 0 || g % tp != 0) continue;
                    const std::size_t r = n / tp;
                    if (r > max_r || r > b_) continue;
                    blocks_at_[j].push_back(static_cast<std::uint32_t>(blocks_.size()));
                    blocks_.push_back(make_block(j, n, tp));
                }
        }
        // Tables may have been added while blocks were built: take the pointers now.
        for (Block& blk : blocks_)
            for (std::size_t t : blk.tables)
                blk.prefix.push_back({ctx_.times.forward(t).data(), ctx_.times.backward(t).data()});
    }

    Block make_block(std::size_t start, std::size_t n, std::uint32_t tp) {
        Block blk;
        blk.start = start;
        blk.size = n;
        blk.tp = tp;
        blk.replicas = n / tp;
        std::vector<std::size_t> leaders(blk.replicas);
        for (std::size_t k = 0; k < blk.replicas; ++k) leaders[k] = order_[start + k * tp];
        std::vector<std::pair<std::size_t, std::uint64_t>> pairs;  // distinct (class, share): few
        std::vector<std::size_t> classes;
        auto add_class = [&](std::size_t x) {
            if (std::find(classes.begin(), classes.end(), class_[x]) == classes.end()) {
                classes.push_back(class_[x]);
                blk.optimizer_devices.push_back(order_[x]);
            }
            blk.capacity = std::min(blk.capacity, capacity_[x]);
        };
        auto add_pair = [&](std::size_t cls, std::uint64_t share) {
            if (std::find(pairs.begin(), pairs.end(), std::pair{cls, share}) == pairs.end()) pairs.push_back({cls, share});
        };
        if (run_end_[start] >= start + n) {
            // One run of identical devices (the common case): equal shares, in closed form
            // (the first b % r replicas take one sample more).
            const std::uint64_t lo = b_ / blk.replicas, more = b_ % blk.replicas;
            blk.max_share = lo + (more > 0 ? 1 : 0);
            if (more > 0) add_pair(class_[start], lo + 1);
            if (more < blk.replicas) add_pair(class_[start], lo);
            add_class(start);
        } else {
            std::vector<double> speeds(blk.replicas, inf);
            for (std::size_t x = 0; x < n; ++x) speeds[x / tp] = std::min(speeds[x / tp], speed_[start + x]);
            const std::vector<std::uint64_t> shares = replica_shares(b_, speeds);
            blk.max_share = *std::max_element(shares.begin(), shares.end());
            for (std::size_t x = 0; x < n; ++x) {
                add_pair(class_[start + x], shares[x / tp]);
                add_class(start + x);
            }
        }
        std::sort(pairs.begin(), pairs.end());
        for (const auto& [cls, share] : pairs) blk.tables.push_back(ctx_.times.index(cls, share, tp));
        blk.allreduce = ctx_.cost.allreduce_cost(leaders);
        blk.memory = &ctx_.memory_tables(tp);
        return blk;
    }

    Context& ctx_;
    std::vector<std::size_t> order_;
    std::uint64_t b_, M_;
    std::size_t L_, D_;
    std::vector<double> speed_;            ///< per position in the order
    std::vector<std::size_t> class_;       ///< per position
    std::vector<std::uint64_t> capacity_;  ///< per position
    std::vector<std::size_t> run_end_;     ///< per position: end of its run of identical devices
    std::vector<Block> blocks_;
    std::vector<std::vector<std::uint32_t>> blocks_at_;
    std::vector<double> value_;
    std::vector<Choice> choice_;
};

Plan make_plan(const SolverOptions& o, std::uint64_t b, std::uint64_t M, std::vector<Stage> stages) {
    Plan p;
    p.objective = o.objective;
    p.schedule = o.schedule;
    p.microbatch_size = b;
    p.microbatches = M;
    p.stages = std::move(stages);
    return p;
}

struct Candidate {
    Plan plan;
    double objective = inf;
    double surrogate = inf;
    double makespan_bound = 0;  ///< M x the slowest stage's compute: no schedule is faster
};

/// 1F1B's memory, exactly, from the relaxed solution (every stage keeping one microbatch):
/// if the relaxed plan fits it is optimal; else if the conservative DP (every stage keeping as
/// many as the first could) reaches the same value, that plan is; else the DP over stage levels,
/// unless its tables would pass 256 MiB: then the conservative plan, flagged as such.
Search::Result exact_1f1b(Context& ctx, Search& search, bool minmax, double bound, Search::Result relaxed) {
    const std::uint64_t M = search.microbatches();
    if (relaxed.value == inf) return relaxed;
    if (plan_fits(make_plan(ctx.sopt, ctx.model.global_batch / M, M, relaxed.stages), ctx.model, ctx.cluster,
                  ctx.cost, ctx.copt))
        return relaxed;
    Search::Result conservative = search.run(minmax, bound, false, search.most_in_flight());
    if (conservative.value <= relaxed.value) return conservative;
    if (!search.levels_fit()) {
        ctx.conservative = true;
        return conservative;
    }
    // The conservative plan fits as well when each stage keeps only its own count: the least
    // bottleneck is at most its value, and no stage of the optimum is slower (a sum gives no
    // such bound).
    return search.run(minmax, minmax ? std::min(bound, conservative.value) : bound, true, 1);
}

/// A memory-feasible DP result for one search, handling 1F1B's per-stage in-flight counts:
/// first with every stage keeping one microbatch (a relaxation); if the plan found really fits
/// it is optimal, otherwise the exact DP with stage levels is run.
Search::Result run_memory_aware(Context& ctx, Search& search, bool minmax, double bound) {
    const std::uint64_t M = search.microbatches();
    if (ctx.sopt.schedule == ScheduleKind::gpipe) return search.run(minmax, bound, false, M);
    return exact_1f1b(ctx, search, minmax, bound, search.run(minmax, bound, false, 1));
}

/// The least bottleneck of one search. With 1F1B, first the relaxation where every stage keeps
/// one microbatch; if its plan fits it is optimal, otherwise the exact DP over stage levels.
/// The first pass of a search: the least bottleneck with every stage keeping one microbatch
/// (1F1B's relaxation; exact for GPipe), among plans whose stages all take <= cap. It bounds
/// every plan of the search from below.
Search::Result first_pass(Context& ctx, Search& search, double cap) {
    const std::uint64_t M = search.microbatches();
    if (ctx.sopt.schedule == ScheduleKind::gpipe) return search.run(true, cap, false, M);
    return search.run(true, cap, false, 1);
}

/// The least bottleneck given the first pass: the relaxed plan when it fits (then it is
/// optimal), otherwise the exact DP over stage levels.
Search::Result least_bottleneck(Context& ctx, Search& search, Search::Result relaxed) {
    if (ctx.sopt.schedule == ScheduleKind::gpipe) return relaxed;
    return exact_1f1b(ctx, search, true, inf, std::move(relaxed));
}

/// Best plans of one (device order, microbatch size) search for the objective.
std::vector<Candidate> search_candidates(Context& ctx, Search& search, Search::Result relaxed) {
    std::vector<Candidate> out;
    const Search::Result best_bottleneck = least_bottleneck(ctx, search, std::move(relaxed));
    if (best_bottleneck.value == inf) return out;
    const std::uint64_t M = search.microbatches();
    const std::uint64_t b = ctx.model.global_batch / M;
    auto surrogate = [M](const Search::Result& r) { return r.sum_stage + static_cast<double>(M - 1) * r.max_stage; };
    out.push_back({make_plan(ctx.sopt, b, M, best_bottleneck.stages), best_bottleneck.value, surrogate(best_bottleneck),
                   static_cast<double>(M) * best_bottleneck.max_compute});
    if (ctx.sopt.objective == Objective::throughput) return out;
    // Every plan of this search has a surrogate >= M x its bottleneck >= M x the least bottleneck.
    if (static_cast<double>(M) * best_bottleneck.value >= ctx.best_surrogate) return out;

    // Iteration objective: enumerate the bottleneck bound B upwards from the optimum (Alpa's
    // method): for each B the plan with the least sum of stage times whose stages all take <= B.
    // Small instances enumerate every distinct stage time; large ones a geometric grid of at most
    // 10 bounds (at least 2% apart) up to the last bound that can still win, left after three
    // bounds in a row improve nothing.
    const double b0 = best_bottleneck.value;
    std::vector<double> bounds;
    const bool small = search.block_count() * ctx.model.layers.size() * ctx.model.layers.size() <= 20000;
    if (small) {
        for (double t : search.all_stage_times())
            if (t >= b0) bounds.push_back(t);
    } else {
        // A geometric grid up to the bound past which no plan can win (M x B >= best surrogate).
        const double top = std::min(out.front().surrogate, ctx.best_surrogate) / static_cast<double>(M);
        const double ratio = std::max(1.02, std::pow(std::max(top / b0, 1.0), 1.0 / 8));
        for (double x = b0; x <= top && bounds.size() < 10; x *= ratio) bounds.push_back(x);
    }
    // Last, the least sum with no bound of its own: a stage over best / M cannot be in a winner.
    bounds.push_back(inf);
    double best_surrogate = std::min(out.front().surrogate, ctx.best_surrogate);
    std::size_t stale = 0;  // grid bounds in a row that improved nothing
    for (double bound : bounds) {
        if (bound == inf) bound = best_surrogate / static_cast<double>(M) * (1 + 1e-12);
        else if (static_cast<double>(M) * bound >= best_surrogate || (!small && stale >= 3)) continue;
        const Search::Result r = run_memory_aware(ctx, search, false, bound);
        ++stale;
        if (r.value == inf) continue;
        const double s = surrogate(r);
        if (s < best_surrogate) stale = 0;
        best_surrogate = std::min(best_surrogate, s);
        out.push_back({make_plan(ctx.sopt, b, M, r.stages), inf, s, static_cast<double>(M) * r.max_compute});
    }
    std::stable_sort(out.begin(), out.end(), [](const Candidate& x, const Candidate& y) { return x.surrogate < y.surrogate; });
    // Distinct plans only, the best few by surrogate.
    std::vector<Candidate> kept;
    for (auto& c : out) {
        bool seen = false;
        for (const auto& k : kept) seen = seen || k.plan == c.plan;
        if (!seen) kept.push_back(std::move(c));
        if (kept.size() >= std::max<std::size_t>(ctx.sopt.rerank, 1)) break;
    }
    return kept;
}

[[noreturn]] void throw_infeasible(const Context& ctx) {
    std::string msg = "no plan fits in memory";
    std::vector<std::string> hints;
    if (ctx.deficit != UINT64_MAX)
        msg += fmt::format(": the closest stage needs {} more than its device holds", bytes_iec(static_cast<double>(ctx.deficit)));
    const LayerCost total = ctx.model.total();
    const double state = static_cast<double>(total.params) * static_cast<double>(ctx.copt.bytes_per_param);
    double capacity = 0, largest = 0;
    std::string largest_kind;
    for (const Device& d : ctx.cluster.devices) {
        capacity += static_cast<double>(d.mem_bytes());
        if (static_cast<double>(d.mem_bytes()) > largest) {
            largest = static_cast<double>(d.mem_bytes());
            largest_kind = d.kind.empty() ? d.name : d.kind;
        }
    }
    if (state > capacity && largest > 0)
        hints.push_back(fmt::format("the training state alone is {} but the cluster holds {}: at least {} devices like "
                                    "{} are needed",
                                    bytes_iec(state), bytes_iec(capacity),
                                    static_cast<std::uint64_t>(std::ceil(state / largest)), largest_kind));
    else if (largest > 0)
        hints.push_back(fmt::format("more devices like {}", largest_kind));
    if (!ctx.copt.recompute) hints.push_back("--recompute (keep only stage inputs, recompute activations)");
    if (!ctx.copt.shard_optimizer) hints.push_back("--shard-optimizer (split optimizer state across replicas)");
    if (ctx.sopt.microbatch_size > 1 || ctx.sopt.microbatch_size == 0)
        hints.push_back("a smaller --microbatch-size");
    if (ctx.sopt.max_tp < 8) hints.push_back("a larger --max-tp");
    msg += "; what would help: ";
    for (std::size_t i = 0; i < hints.size(); ++i) msg += (i ? "; " : "") + hints[i];
    throw InfeasibleError(msg);
}

}  // namespace

double objective_value(Objective objective, const Plan& plan, const PlanEstimate& estimate) noexcept {
    return objective == Objective::throughput ? estimate.bottleneck_s / static_cast<double>(plan.microbatch_size)
                                              : estimate.iteration_s;
}

std::vector<std::vector<std::size_t>> device_orders(const Cluster& cluster, const CostModel& cost) {
    // Group nodes by the classes of their devices.
    std::map<std::vector<std::size_t>, std::vector<std::size_t>> groups;  // signature -> nodes
    std::vector<std::vector<std::size_t>> signatures;
    for (std::size_t n = 0; n < cluster.nodes.size(); ++n) {
        if (cluster.nodes[n].devices.empty()) continue;
        std::vector<std::size_t> sig;
        for (std::size_t d : cluster.nodes[n].devices) sig.push_back(cost.device_class(d));
        sig.push_back(cluster.nodes[n].devices.size());
        if (groups.find(sig) == groups.end()) signatures.push_back(sig);
        groups[sig].push_back(n);
    }
    std::vector<std::size_t> kinds(signatures.size());
    std::iota(kinds.begin(), kinds.end(), std::size_t{0});
    auto speed = [&](std::size_t k) { return cost.device_speed(cluster.nodes[groups[signatures[k]].front()].devices.front()); };
    std::vector<std::vector<std::size_t>> kind_orders;
    if (kinds.size() <= 4) {
        do kind_orders.push_back(kinds);
        while (std::next_permutation(kinds.begin(), kinds.end()));
    } else {
        std::stable_sort(kinds.begin(), kinds.end(), [&](std::size_t a, std::size_t b) { return speed(a) > speed(b); });
        kind_orders.push_back(kinds);
        std::reverse(kinds.begin(), kinds.end());
        kind_orders.push_back(kinds);
    }
    std::vector<std::vector<std::size_t>> orders;
    for (const auto& ko : kind_orders) {
        std::vector<std::size_t> order;
        for (std::size_t k : ko)
            for (std::size_t n : groups[signatures[k]])
                for (std::size_t d : cluster.nodes[n].devices) order.push_back(d);
        orders.push_back(std::move(order));
    }
    return orders;
}

std::vector<std::uint64_t> microbatch_candidates(std::uint64_t global_batch, const SolverOptions& o) {
    if (o.microbatch_size != 0 && o.microbatches != 0 && o.microbatch_size * o.microbatches != global_batch)
        throw InputError(fmt::format("--microbatch-size {} x --microbatches {} is not the global batch {}",
                                     o.microbatch_size, o.microbatches, global_batch));
    if (o.microbatch_size != 0) {
        if (global_batch % o.microbatch_size != 0)
            throw InputError(fmt::format("--microbatch-size {} does not divide the global batch {}", o.microbatch_size,
                                         global_batch));
        return {o.microbatch_size};
    }
    if (o.microbatches != 0) {
        if (global_batch % o.microbatches != 0)
            throw InputError(
                fmt::format("--microbatches {} does not divide the global batch {}", o.microbatches, global_batch));
        return {global_batch / o.microbatches};
    }
    std::vector<std::uint64_t> out;
    for (std::uint64_t d = 1; d * d <= global_batch; ++d)
        if (global_batch % d == 0) {
            out.push_back(d);
            if (d != global_batch / d) out.push_back(global_batch / d);
        }
    std::sort(out.begin(), out.end());
    return out;
}

namespace {
SolveResult solve_optimal(const Model& model, const Cluster& cluster, const CostModel& cost, const CostOptions& copt,
                          const SolverOptions& sopt) {
    Context ctx(model, cluster, cost, copt, sopt);
    const bool throughput = sopt.objective == Objective::throughput;
    // Pass 1: every (microbatch size, device order) search's relaxed least bottleneck, a lower
    // bound on all its plans. Pass 2 visits the searches from the most promising bound and skips
    // those whose bound cannot beat the best found (exact: the skipped plans are all worse).
    // The middle microbatch size goes through both passes first, so that its best plan caps the
    // other searches' first passes (a search whose every plan exceeds the cap is skipped whole).
    struct Pending {
        std::unique_ptr<Search> search;
        Search::Result relaxed;
        double lower = inf;
        std::uint64_t b = 1;
    };
    SolveResult best;
    bool found = false;
    double best_objective = inf;
    double search_optimum = inf;  // the search objective's optimum so far (per sample, or surrogate)
    auto second_pass = [&](Pending& p) {
        if (p.lower >= search_optimum) return;
        const std::uint64_t b = p.b;
        for (Candidate& c : search_candidates(ctx, *p.search, std::move(p.relaxed))) {
            const double per_sample = c.objective / static_cast<double>(b);
            search_optimum = std::min(search_optimum, throughput ? per_sample : c.surrogate);
            ctx.best_surrogate = std::min(ctx.best_surrogate, c.surrogate);
            // Only a candidate that can win is worth its task graph.
            if (found &&
                (throughput ? per_sample > best_objective * (1 + 1e-9) : c.makespan_bound >= best_objective))
                continue;
            PlanEstimate e = estimate_plan(c.plan, model, cluster, cost, copt);
            if (!e.fits) continue;
            const double objective = objective_value(sopt.objective, c.plan, e);
            // Strictly better only (ties keep the earlier candidate).
            if (!found || objective < best_objective * (1 - 1e-12)) {
                found = true;
                best_objective = objective;
                best.plan = std::move(c.plan);
                best.estimate = std::move(e);
                best.objective_s = throughput ? per_sample : c.surrogate;
            }
        }
        p.search.reset();
    };

    // Middle microbatch sizes first, then outwards.
    const std::vector<std::uint64_t> sizes = microbatch_candidates(model.global_batch, sopt);
    std::vector<std::uint64_t> visit;
    for (std::size_t step = 0; visit.size() < sizes.size(); ++step) {
        const std::size_t mid = sizes.size() / 2;
        if (step <= mid) visit.push_back(sizes[mid - step]);
        if (step > 0 && mid + step < sizes.size()) visit.push_back(sizes[mid + step]);
    }
    std::vector<Pending> pending;
    for (std::size_t v = 0; v < visit.size(); ++v) {
        const std::uint64_t b = visit[v];
        for (const auto& order : device_orders(cluster, cost)) {
            auto search = std::make_unique<Search>(ctx, order, b);
            const double M = static_cast<double>(search->microbatches());
            const double cap =
                (throughput ? search_optimum * static_cast<double>(b) : search_optimum / M) * (1 + 1e-12);
            Search::Result relaxed = first_pass(ctx, *search, cap);
            if (relaxed.value == inf) continue;
            const double lower = throughput ? relaxed.value / static_cast<double>(b) : M * relaxed.value;
            pending.push_back({std::move(search), std::move(relaxed), lower, b});
        }
        if (v == 0) {
            for (Pending& p : pending) second_pass(p);
            pending.clear();
        }
    }
    std::stable_sort(pending.begin(), pending.end(), [](const Pending& x, const Pending& y) { return x.lower < y.lower; });
    for (Pending& p : pending) second_pass(p);

    best.plans_evaluated = ctx.evaluations;
    best.level_runs = ctx.level_runs;
    best.threaded_runs = ctx.threaded_runs;
    best.search_optimum_s = search_optimum;
    best.exact = !ctx.conservative;
    if (!found) throw_infeasible(ctx);
    return best;
}
}  // namespace

}  // namespace dpart

namespace dpart {
namespace {

/// Splits weights into `parts` contiguous non-empty ranges minimising the largest sum (binary
/// search on the bound with a greedy check, then splitting ranges until there are `parts`).
/// Returns the exclusive end index of each range.
std::vector<std::size_t> balanced_partition(const std::vector<double>& w, std::size_t parts) {
    const std::size_t n = w.size();
    auto greedy = [&](double bound) {
        std::vector<std::size_t> ends;
        double acc = 0;
        for (std::size_t i = 0; i < n; ++i) {
            if (acc > 0 && acc + w[i] > bound) {
                ends.push_back(i);
                acc = 0;
            }
            acc += w[i];
        }
        ends.push_back(n);
        return ends;
    };
    double lo = *std::max_element(w.begin(), w.end()), hi = std::accumulate(w.begin(), w.end(), 0.0);
    for (int it = 0; it < 100 && hi - lo > 1e-12 * std::max(1.0, hi); ++it) {
        const double mid = (lo + hi) / 2;
        (greedy(mid).size() <= parts ? hi : lo) = mid;
    }
    std::vector<std::size_t> ends = greedy(hi);
    // Too few ranges: split the first range holding more than one layer.
    while (ends.size() < parts) {
        std::size_t start = 0;
        for (std::size_t k = 0; k < ends.size(); ++k) {
            if (ends[k] - start >= 2) {
                ends.insert(ends.begin() + static_cast<std::ptrdiff_t>(k), start + 1);
                break;
            }
            start = ends[k];
        }
    }
    return ends;
}

std::vector<std::size_t> uniform_partition(std::size_t n, std::size_t parts) {
    std::vector<std::size_t> ends;
    std::size_t end = 0;
    for (std::size_t k = 0; k < parts; ++k) {
        end += n / parts + (k < n % parts ? 1 : 0);
        ends.push_back(end);
    }
    return ends;
}

/// Baselines: each splits the layers by its rule into S stages on S equal device blocks (the
/// first device order), for every S, tensor-parallel degree and microbatch size; the best
/// feasible plan under the same cost model is reported.
SolveResult solve_baseline(const Model& model, const Cluster& cluster, const CostModel& cost, const CostOptions& copt,
                           const SolverOptions& sopt) {
    const std::size_t L = model.layers.size();
    const std::vector<std::size_t> order = device_orders(cluster, cost).front();
    const std::size_t D = order.size();
    std::size_t node_size = D;
    for (const Node& n : cluster.nodes)
        if (!n.devices.empty()) node_size = std::gcd(node_size == D ? n.devices.size() : node_size, n.devices.size());
    const std::uint64_t max_r = sopt.max_replicas == 0 ? UINT64_MAX : sopt.max_replicas;

    std::vector<double> params(L), times(L);
    for (std::size_t l = 0; l < L; ++l) {
        params[l] = static_cast<double>(model.layers[l].cost.params);
        times[l] = cost.layer_seconds(l, Pass::forward, order.front(), 1, 1) * (copt.recompute ? 2 : 1) +
                   cost.layer_seconds(l, Pass::backward, order.front(), 1, 1);
    }
    SolveResult best;
    bool found = false;
    double best_objective = inf;
    std::size_t evaluated = 0;
    const std::size_t max_stages = sopt.strategy == Strategy::data_parallel ? 1 : std::min(L, D);
    for (std::size_t S = 1; S <= max_stages; ++S) {
        std::size_t n = D / S;
        if (sopt.strategy != Strategy::data_parallel) {
            if (n >= node_size) n = n / node_size * node_size;
            else {
                std::size_t p = 1;
                while (p * 2 <= n) p *= 2;
                n = p;
            }
        }
        if (n == 0) continue;
        std::vector<std::size_t> ends;
        switch (sopt.strategy) {
            case Strategy::uniform: ends = uniform_partition(L, S); break;
            case Strategy::parameters: ends = balanced_partition(params, S); break;
            case Strategy::time: ends = balanced_partition(times, S); break;
            default: ends = {L}; break;
        }
        for (std::uint32_t tp = 1; tp <= sopt.max_tp && tp <= n; tp *= 2) {
            if (n % tp != 0 || node_size % tp != 0) continue;
            if (!std::all_of(model.layers.begin(), model.layers.end(),
                             [tp](const Layer& l) { return tp_divides(l.op, tp); }))
                continue;  // every stage has this tp: every layer must take it
            const std::size_t r = n / tp;
            if (r > max_r) continue;
            for (std::uint64_t b : microbatch_candidates(model.global_batch, sopt)) {
                if (b < r) continue;
                Plan p = make_plan(sopt, b, model.global_batch / b, {});
                std::size_t first = 0;
                for (std::size_t k = 0; k < S; ++k) {
                    Stage st;
                    st.first_layer = first;
                    st.last_layer = ends[k] - 1;
                    st.tp = tp;
                    st.devices.assign(order.begin() + static_cast<std::ptrdiff_t>(k * n),
                                      order.begin() + static_cast<std::ptrdiff_t>((k + 1) * n));
                    first = ends[k];
                    p.stages.push_back(std::move(st));
                }
                PlanEstimate e = estimate_plan(p, model, cluster, cost, copt);
                ++evaluated;
                if (!e.fits) continue;
                const double objective = objective_value(sopt.objective, p, e);
                if (!found || objective < best_objective * (1 - 1e-12)) {
                    found = true;
                    best_objective = objective;
                    best.objective_s = objective;
                    best.plan = std::move(p);
                    best.estimate = std::move(e);
                }
            }
        }
    }
    best.plans_evaluated = evaluated;
    if (!found)
        throw InfeasibleError(fmt::format("the {} strategy finds no plan that fits in memory on this cluster",
                                          to_string(sopt.strategy)));
    return best;
}

}  // namespace

SolveResult solve(const Model& model, const Cluster& cluster, const CostModel& cost, const CostOptions& copt,
                  const SolverOptions& sopt) {
    if (sopt.max_tp == 0) throw InputError("--max-tp must be at least 1");
    const std::size_t L = model.layers.size(), D = cluster.devices.size();
    if (L > max_plan_layers)
        throw InputError(fmt::format("model \"{}\" has {} layers; the planner searches at most {} (its time grows faster "
                                     "than the layer count): merge consecutive layers into custom layers",
                                     model.name, L, max_plan_layers));
    if (D > max_plan_devices)
        throw InputError(fmt::format("cluster \"{}\" has {} devices; the planner searches at most {} (its time and memory "
                                     "grow faster than the device count): plan for a part of the cluster",
                                     cluster.name, D, max_plan_devices));
    if (L * D > max_plan_layers_x_devices)
        throw InputError(fmt::format("{} layers on {} devices is beyond what the planner searches (layers x devices at "
                                     "most {}): merge layers, or plan for a part of the cluster",
                                     L, D, max_plan_layers_x_devices));
    SolveResult r = sopt.strategy == Strategy::optimal ? solve_optimal(model, cluster, cost, copt, sopt)
                                                       : solve_baseline(model, cluster, cost, copt, sopt);
    r.plan.recompute = copt.recompute;  // the plan says how it is to be run
    r.plan.shard_optimizer = copt.shard_optimizer;
    r.plan.fused_attention = copt.fused_attention;
    r.plan.vocab_parallel = copt.vocab_parallel;
    return r;
}

}  // namespace dpart
