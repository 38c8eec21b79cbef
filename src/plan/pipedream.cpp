#include "dpart/plan/pipedream.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>

namespace dpart {
namespace {

/// A set of small integers (layers or states).
class Bits {
public:
    explicit Bits(std::size_t n = 0) : words_((n + 63) / 64, 0) {}
    void set(std::size_t i) { words_[i / 64] |= std::uint64_t{1} << (i % 64); }
    void reset(std::size_t i) { words_[i / 64] &= ~(std::uint64_t{1} << (i % 64)); }
    [[nodiscard]] bool test(std::size_t i) const { return (words_[i / 64] >> (i % 64)) & 1u; }
    Bits& operator|=(const Bits& o) {
        for (std::size_t w = 0; w < words_.size(); ++w) words_[w] |= o.words_[w];
        return *this;
    }
    [[nodiscard]] bool intersects(const Bits& o) const {
        for (std::size_t w = 0; w < words_.size(); ++w)
            if (words_[w] & o.words_[w]) return true;
        return false;
    }
    [[nodiscard]] std::size_t count() const {
        std::size_t c = 0;
        for (std::uint64_t w : words_) c += static_cast<std::size_t>(std::popcount(w));
        return c;
    }
    template <class F>
    void for_each(F&& f) const {
        for (std::size_t w = 0; w < words_.size(); ++w)
            for (std::uint64_t bits = words_[w]; bits != 0; bits &= bits - 1)
                f(w * 64 + static_cast<std::size_t>(std::countr_zero(bits)));
    }
    friend bool operator==(const Bits&, const Bits&) = default;
    friend auto operator<=>(const Bits& a, const Bits& b) { return a.words_ <=> b.words_; }

private:
    std::vector<std::uint64_t> words_;
};

/// The layer DAG with PipeDream's per-node figures.
struct Graph {
    std::size_t n = 0;
    std::vector<std::vector<std::size_t>> out;  ///< successors by edge
    std::vector<Bits> pred;                     ///< all predecessors (transitive, strict)
    std::vector<Bits> succ;                     ///< all successors
    std::vector<double> compute_s;              ///< (forward + backward) / 1000, per node
    std::vector<double> activation_bytes;       ///< of the node's output, one minibatch
    std::vector<double> parameter_bytes;
};

Graph graph_of(const Model& model) {
    Graph g;
    g.n = model.layers.size();
    g.out.resize(g.n);
    g.pred.assign(g.n, Bits(g.n));
    g.succ.assign(g.n, Bits(g.n));
    const MeasuredAt* at = model.measured ? &*model.measured : nullptr;
    for (std::size_t v = 0; v < g.n; ++v) {
        const Layer& l = model.layers[v];
        const auto* custom = std::get_if<CustomOp>(&l.op);
        if (custom == nullptr || !custom->measured || at == nullptr)
            throw InputError(l.where, fmt::format("layer \"{}\" has no measured times (fwd_ms, bwd_ms): the pipedream "
                                                  "cost model plans from a measured profile (dpart import pipedream)",
                                                  l.name));
        // As PipeDream sums a state: (forward_compute_time + backward_compute_time) / 1000.0.
        g.compute_s.push_back((custom->fwd_ms + custom->bwd_ms) / 1000.0);
        g.activation_bytes.push_back(static_cast<double>(l.cost.out_bytes) * static_cast<double>(at->batch));
        g.parameter_bytes.push_back(static_cast<double>(l.cost.params) * static_cast<double>(dtype_bytes(model.dtype)));
        for (std::size_t u : l.inputs) {
            g.out[u].push_back(v);
            g.pred[v] |= g.pred[u];
            g.pred[v].set(u);
        }
    }
    for (std::size_t v = g.n; v-- > 0;)
        for (std::size_t w : g.out[v]) {
            g.succ[v] |= g.succ[w];
            g.succ[v].set(w);
        }
    return g;
}

/// One of PipeDream's states: an antichain of the layer DAG.
struct State {
    Bits antichain;
    Bits augmented;  ///< + predecessors whose outputs are still read after the cut (graph.py augment_antichain)
    Bits down;       ///< every layer up to and including the antichain
    std::vector<std::size_t> next;
};

/// graph.py's antichain_dag: breadth first from the first layer, each step moving one node of
/// the augmented antichain to one of its successors.
std::vector<State> antichain_states(const Graph& g) {
    // extra[a]: predecessors p of a with an edge to a node that is neither a nor before a.
    std::vector<Bits> extra(g.n, Bits(g.n));
    for (std::size_t a = 0; a < g.n; ++a)
        g.pred[a].for_each([&](std::size_t p) {
            for (std::size_t o : g.out[p])
                if (o != a && !g.pred[a].test(o)) {
                    extra[a].set(p);
                    break;
                }
        });
    std::vector<State> states;
    std::map<Bits, std::size_t> index;
    auto intern = [&](const Bits& antichain) {
        const auto [it, inserted] = index.emplace(antichain, states.size());
        if (inserted) {
            State s;
            s.antichain = antichain;
            s.augmented = antichain;
            s.down = antichain;
            antichain.for_each([&](std::size_t a) {
                s.augmented |= extra[a];
                s.down |= g.pred[a];
            });
            states.push_back(std::move(s));
        }
        return it->second;
    };
    Bits first(g.n);
    first.set(0);
    intern(first);
    for (std::size_t s = 0; s < states.size(); ++s) {  // states grows: a breadth-first queue
        std::vector<std::size_t> next;
        const Bits augmented = states[s].augmented;
        const Bits antichain = states[s].antichain;
        augmented.for_each([&](std::size_t x) {
            for (std::size_t y : g.out[x]) {
                if (antichain.test(y) || g.succ[y].intersects(augmented)) continue;
                // Replace x by y, then keep the maximal nodes (deaugment_augmented_antichain).
                Bits members = augmented;
                members.reset(x);
                members.set(y);
                Bits maximal(g.n);
                members.for_each([&](std::size_t v) {
                    if (!g.succ[v].intersects(members)) maximal.set(v);
                });
                next.push_back(intern(maximal));
            }
        });
        std::sort(next.begin(), next.end());
        next.erase(std::unique(next.begin(), next.end()), next.end());
        states[s].next = std::move(next);
    }
    return states;
}

constexpr double none = std::numeric_limits<double>::infinity();  // PipeDream's None

struct Cell {
    double time = none;
    std::int32_t split_state = -1;   ///< the state before the last stage, -1 = one stage
    std::int32_t split_workers = 0;  ///< workers index (m - m') of the rest
    std::int32_t replicas = 0;       ///< m' (or m + 1 for one stage)
};

struct Problem {
    std::vector<double> compute, activation, parameter, output;  ///< per state, cumulative
    std::vector<std::vector<std::size_t>> preds;                 ///< per state, all predecessors, DP order
    std::vector<bool> allowed;
    std::size_t final_state = 0;
};

/// compute_partitioning for the final level (i = 0): A[j][m] over states j and workers m + 1.
std::vector<Cell> partition(const Problem& p, const PipeDreamOptions& o) {
    const std::size_t S = p.compute.size();
    const std::size_t N = o.workers;
    const double B = o.bandwidth;
    std::vector<Cell> A(S * N);
    auto at = [&](std::size_t j, std::size_t m) -> Cell& { return A[j * N + m]; };
    auto ceil_div = [](std::size_t a, std::size_t b) { return static_cast<double>((a + b - 1) / b); };
    for (std::size_t j = 0; j < S; ++j) {
        if (!p.allowed[j]) continue;
        const std::size_t max_m = o.straight_pipeline ? 1 : N;
        for (std::size_t m = 0; m < max_m; ++m) {
            const double stashed = ceil_div(N - (m + 1), m + 1) * (p.activation[j] + p.parameter[j]);
            if (o.memory_bytes && stashed > *o.memory_bytes) continue;
            const double dp = (static_cast<double>(4 * m) * p.parameter[j]) / (B * static_cast<double>(m + 1));
            at(j, m) = Cell{(p.compute[j] + dp) / static_cast<double>(m + 1), -1, 0, static_cast<std::int32_t>(m + 1)};
        }
    }
    // The last stage (k, j] on m' replicas, its transfers included, does not depend on how many
    // workers the stages before it use: computed once per (k, j, m'). max is exact, so taking it
    // in this order gives PipeDream's value bit for bit.
    const std::size_t max_mp = o.straight_pipeline ? 1 : N - 1;
    std::vector<std::size_t> offset(S + 1, 0);
    for (std::size_t j = 0; j < S; ++j) offset[j + 1] = offset[j] + p.preds[j].size() * max_mp;
    std::vector<double> last_stage(offset[S]);
    for (std::size_t j = 1; j < S; ++j) {
        const bool final = j == p.final_state;
        for (std::size_t i = 0; i < p.preds[j].size(); ++i) {
            const std::size_t k = p.preds[j][i];
            const double dT = p.compute[j] - p.compute[k];
            const double dP = p.parameter[j] - p.parameter[k];
            for (std::size_t mp = 1; mp <= max_mp; ++mp) {
                const double r = static_cast<double>(mp);
                double t = (dT + (static_cast<double>(4 * (mp - 1)) * dP) / (B * r)) / r;
                t = std::max(t, (2.0 * p.output[k]) / (B * r));              // input transfer
                if (!final) t = std::max(t, (2.0 * p.output[j]) / (B * r));  // output transfer
                last_stage[offset[j] + i * max_mp + mp - 1] = t;
            }
        }
    }
    for (std::size_t m = 1; m < N; ++m) {
        for (std::size_t j = 1; j < S; ++j) {
            if (!p.allowed[j]) continue;
            Cell best = at(j, m);
            for (std::size_t i = 0; i < p.preds[j].size(); ++i) {
                const std::size_t k = p.preds[j][i];
                const double* costs = &last_stage[offset[j] + i * max_mp];
                const std::size_t mps = std::min(max_mp, m);
                const double dA = p.activation[j] - p.activation[k];
                const double dP = p.parameter[j] - p.parameter[k];
                for (std::size_t mp = 1; mp <= mps; ++mp) {
                    const double rest = at(k, m - mp).time;
                    if (rest == none) continue;
                    if (o.memory_bytes && (dA + dP) * ceil_div(N - (m + 1), mp) > *o.memory_bytes) continue;
                    const double t = std::max(rest, costs[mp - 1]);
                    if (best.time == none || best.time > t)
                        best = Cell{t, static_cast<std::int32_t>(k), static_cast<std::int32_t>(m - mp),
                                    static_cast<std::int32_t>(mp)};
                }
            }
            at(j, m) = best;
        }
    }
    return A;
}

}  // namespace

PipeDreamResult solve_pipedream(const Model& model, const PipeDreamOptions& o) {
    if (o.workers == 0) throw InputError("--workers must be positive");
    if (!(o.bandwidth > 0) || !std::isfinite(o.bandwidth)) throw InputError("--bandwidth-bytes must be positive");
    const Graph g = graph_of(model);
    std::vector<State> states = antichain_states(g);

    // A topological order of the states: each step adds at least one layer. The last is the
    // whole model (PipeDream's states[-1]).
    std::vector<std::size_t> order(states.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::vector<std::size_t> size(states.size());
    for (std::size_t i = 0; i < states.size(); ++i) size[i] = states[i].down.count();
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return size[a] < size[b]; });
    std::vector<std::size_t> rank(states.size());
    for (std::size_t i = 0; i < order.size(); ++i) rank[order[i]] = i;
    const std::size_t S = states.size();
    if (size[order.back()] != g.n || (S > 1 && size[order[S - 2]] == g.n))
        throw InputError(model.where, "the layer graph has no single last state: PipeDream plans graphs with one sink");

    Problem p;
    p.final_state = S - 1;
    p.compute.assign(S, 0);
    p.activation.assign(S, 0);
    p.parameter.assign(S, 0);
    p.output.assign(S, 0);
    p.allowed.assign(S, true);
    std::vector<bool> prefix(S);
    std::vector<Bits> state_preds(S, Bits(S));
    for (std::size_t r = 0; r < S; ++r) {
        const State& s = states[order[r]];
        s.down.for_each([&](std::size_t v) {
            p.compute[r] += g.compute_s[v];
            p.activation[r] += g.activation_bytes[v];
            p.parameter[r] += g.parameter_bytes[v];
        });
        s.augmented.for_each([&](std::size_t v) { p.output[r] += g.activation_bytes[v]; });
        // A prefix of the model's layer order: a stage ending here is a contiguous range.
        bool is_prefix = true;
        s.down.for_each([&](std::size_t v) { is_prefix = is_prefix && v < size[order[r]]; });
        prefix[r] = is_prefix;
    }
    for (std::size_t r = 0; r < S; ++r)
        for (std::size_t nxt : states[order[r]].next) {
            state_preds[rank[nxt]] |= state_preds[r];
            state_preds[rank[nxt]].set(r);
        }
    p.preds.resize(S);
    for (std::size_t r = 0; r < S; ++r) {
        // Prefix states first: on ties (the DP keeps the first strictly better split) a
        // contiguous stage wins.
        state_preds[r].for_each([&](std::size_t k) {
            if (prefix[k]) p.preds[r].push_back(k);
        });
        state_preds[r].for_each([&](std::size_t k) {
            if (!prefix[k]) p.preds[r].push_back(k);
        });
    }

    const std::size_t N = o.workers;
    std::vector<Cell> A = partition(p, o);
    PipeDreamResult result;
    result.states = S;
    result.time_per_stage_s = A[p.final_state * N + N - 1].time;
    if (result.time_per_stage_s == none)
        throw InfeasibleError(
            fmt::format("no PipeDream plan of {} workers fits in {} bytes per worker; what would help: "
                        "more memory per worker (--memory-bytes) or more workers",
                        N, o.memory_bytes.value_or(0)));
    result.single_stage_s = p.compute[p.final_state];
    result.data_parallel_s =
        (p.compute[p.final_state] +
         (static_cast<double>(4 * (N - 1)) * p.parameter[p.final_state]) / (o.bandwidth * static_cast<double>(N))) /
        static_cast<double>(N);

    // The plan, from the last state back; if one of its stages is not a contiguous layer range,
    // the DP again over prefix states only.
    auto walk = [&](const std::vector<Cell>& table) {
        std::vector<PipeDreamStage> stages;
        std::size_t j = p.final_state, m = N - 1;
        while (true) {
            const Cell& c = table[j * N + m];
            PipeDreamStage st;
            st.replicas = static_cast<std::size_t>(c.replicas);
            st.end_state = j + 1;
            st.last_layer = size[order[j]] - 1;
            const double r = static_cast<double>(st.replicas);
            if (c.split_state < 0) {
                st.first_state = 0;
                st.first_layer = 0;
                st.compute_s = p.compute[j];
                st.parameter_bytes = p.parameter[j];
            } else {
                const auto k = static_cast<std::size_t>(c.split_state);
                st.first_state = k + 1;
                st.first_layer = size[order[k]];
                st.compute_s = p.compute[j] - p.compute[k];
                st.parameter_bytes = p.parameter[j] - p.parameter[k];
                st.input_transfer_s = (2.0 * p.output[k]) / (o.bandwidth * r);
                if (j != p.final_state) st.output_transfer_s = (2.0 * p.output[j]) / (o.bandwidth * r);
            }
            st.time_s =
                (st.compute_s + (static_cast<double>(4 * (st.replicas - 1)) * st.parameter_bytes) / (o.bandwidth * r)) /
                r;
            stages.push_back(st);
            if (c.split_state < 0) break;
            j = static_cast<std::size_t>(c.split_state);
            m = static_cast<std::size_t>(c.split_workers);
        }
        std::reverse(stages.begin(), stages.end());
        return stages;
    };
    auto contiguous = [&](const std::vector<PipeDreamStage>& stages) {
        for (const PipeDreamStage& st : stages)
            if (!prefix[st.end_state - 1] || (st.first_state > 0 && !prefix[st.first_state - 1])) return false;
        return true;
    };
    result.stages = walk(A);
    result.plan_bottleneck_s = result.time_per_stage_s;
    if (!contiguous(result.stages)) {
        p.allowed = prefix;
        for (auto& preds : p.preds)
            preds.erase(std::remove_if(preds.begin(), preds.end(), [&](std::size_t k) { return !prefix[k]; }),
                        preds.end());
        A = partition(p, o);
        result.plan_bottleneck_s = A[p.final_state * N + N - 1].time;
        if (result.plan_bottleneck_s == none)
            throw InfeasibleError(
                "no PipeDream plan with stages that are contiguous layer ranges fits: what would "
                "help: more memory per worker (--memory-bytes) or more workers");
        result.stages = walk(A);
    }
    return result;
}

}  // namespace dpart
