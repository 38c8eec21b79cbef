// The DP against exhaustive search on random small instances, and the planner's contracts.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <random>

#include "dpart/io/cluster_toml.hpp"
#include "dpart/io/model_toml.hpp"
#include "dpart/plan/solver.hpp"

using namespace dpart;

namespace {

constexpr double inf = std::numeric_limits<double>::infinity();

struct Instance {
    Model model;
    Cluster cluster;
};

/// `in_flight`: instances where 1F1B's in-flight microbatches decide what fits (memory always
/// tight, activations outweighing parameters, up to 16 microbatches on up to 4 devices), so that
/// the solver needs its DP over stage levels.
Instance random_instance(std::mt19937_64& rng, bool in_flight = false) {
    auto uniform = [&](double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(rng); };
    auto pick = [&](std::uint64_t lo, std::uint64_t hi) { return std::uniform_int_distribution<std::uint64_t>(lo, hi)(rng); };
    ModelSpec spec;
    spec.name = "random";
    spec.dtype = pick(0, 1) ? DType::bf16 : DType::fp32;
    const std::uint64_t batches[] = {1, 2, 4, 6, 8};
    const std::uint64_t deep[] = {4, 8, 16};
    spec.global_batch = in_flight ? deep[pick(0, 2)] : batches[pick(0, 4)];
    const std::size_t L = pick(1, 8);
    std::uint64_t total_params = 0, total_saved = 0, largest_workspace = 0;
    for (std::size_t l = 0; l < L; ++l) {
        CustomOp c;
        c.fwd_flops = static_cast<std::uint64_t>(uniform(1e9, 1e11));
        c.bwd_flops = static_cast<std::uint64_t>(static_cast<double>(c.fwd_flops) * uniform(1.5, 2.5));
        c.params = static_cast<std::uint64_t>(in_flight ? uniform(1e5, 5e6) : uniform(1e5, 5e7));
        c.out_bytes = static_cast<std::uint64_t>(uniform(1e4, 5e7));
        c.saved_bytes = static_cast<std::uint64_t>(uniform(1e5, 2e8));
        c.fwd_mem_bytes = static_cast<std::uint64_t>(uniform(0, 1e8));
        c.bwd_mem_bytes = 2 * c.fwd_mem_bytes;
        c.workspace_bytes = static_cast<std::uint64_t>(uniform(0, 4e8));  // the stage holds its largest
        total_params += c.params;
        total_saved += c.saved_bytes;
        largest_workspace = std::max(largest_workspace, c.workspace_bytes);
        LayerSpec ls;
        ls.name = "l" + std::to_string(l);
        ls.op = c;
        spec.layers.push_back(std::move(ls));
    }
    Instance in{build_model(spec), {}};
    Cluster& c = in.cluster;
    c.name = "random";
    const std::size_t nodes = in_flight ? 1 : pick(1, 2);
    // A third of the instances get memory small enough to bind.
    const bool tight = in_flight || pick(0, 2) == 0;
    const double need = static_cast<double>(total_params) * 16 +
                        static_cast<double>((total_saved + largest_workspace) * spec.global_batch);
    const double kinds[2][2] = {{100, 1500}, {300, 3000}};  // TFLOP/s, GB/s
    for (std::size_t n = 0; n < nodes; ++n) {
        Node node;
        node.name = "n" + std::to_string(n);
        const std::size_t devices = pick(in_flight ? 2 : 1, nodes == 1 ? 4 : 2);
        for (std::size_t d = 0; d < devices; ++d) {
            Device dev;
            dev.name = node.name + ".d" + std::to_string(d);
            dev.node = n;
            const auto k = pick(0, 1);
            dev.tflops = kinds[k][0];
            dev.mem_bw_gbs = kinds[k][1];
            dev.mem_gib = tight ? need * uniform(in_flight ? 0.05 : 0.2, in_flight ? 0.6 : 1.2) / 1073741824.0 : 1000;
            node.devices.push_back(c.devices.size());
            c.devices.push_back(dev);
        }
        c.nodes.push_back(node);
    }
    c.intra_default = LinkSpec{uniform(50, 400), uniform(1, 5)};
    c.inter_default = LinkSpec{uniform(5, 50), uniform(5, 20)};
    return in;
}

struct Exhaustive {
    double best_objective = inf;  ///< the search objective: bottleneck or surrogate
    double best_makespan = inf;
    std::size_t plans = 0;
};

/// Every plan of the documented search space, evaluated with estimate_plan: an implementation
/// independent of the DP's (it shares only device_orders and the cost functions).
Exhaustive exhaustive(const Model& model, const Cluster& cluster, const CostModel& cost, const CostOptions& copt,
                      const SolverOptions& sopt) {
    Exhaustive ex;
    const std::size_t L = model.layers.size();
    for (std::uint64_t b : microbatch_candidates(model.global_batch, sopt)) {
        const std::uint64_t M = model.global_batch / b;
        for (const auto& order : device_orders(cluster, cost)) {
            const std::size_t D = order.size();
            auto node_of = [&](std::size_t j) { return cluster.devices[order[j]].node; };
            std::vector<Stage> stages;
            std::function<void(std::size_t, std::size_t)> rec = [&](std::size_t i, std::size_t j) {
                if (i == L) {
                    Plan p;
                    p.objective = sopt.objective;
                    p.schedule = sopt.schedule;
                    p.microbatch_size = b;
                    p.microbatches = M;
                    p.stages = stages;
                    const PlanEstimate e = estimate_plan(p, model, cluster, cost, copt);
                    ++ex.plans;
                    if (!e.fits) return;
                    double sum = 0, mx = 0;
                    for (const auto& s : e.stages) {
                        sum += s.stage_s;
                        mx = std::max(mx, s.stage_s);
                    }
                    const double objective = sopt.objective == Objective::throughput
                                                 ? mx / static_cast<double>(b)
                                                 : sum + static_cast<double>(M - 1) * mx;
                    ex.best_objective = std::min(ex.best_objective, objective);
                    ex.best_makespan = std::min(ex.best_makespan, e.iteration_s);
                    return;
                }
                if (j >= D) return;
                std::size_t start = j;
                while (start > 0 && node_of(start - 1) == node_of(j)) --start;
                std::size_t end = j;
                while (end < D && node_of(end) == node_of(j)) ++end;
                const std::size_t offset = j - start, z = end - start;
                std::vector<std::pair<std::size_t, std::size_t>> sizes;
                for (std::size_t n = 1; offset + n <= z; n *= 2)
                    if (offset % n == 0) sizes.push_back({n, n});
                if (offset == 0 && (z & (z - 1)) != 0) sizes.push_back({z, z});
                if (offset == 0) {
                    std::size_t e2 = end, g = z;
                    while (e2 < D) {
                        std::size_t e3 = e2;
                        while (e3 < D && node_of(e3) == node_of(e2)) ++e3;
                        g = std::gcd(g, e3 - e2);
                        sizes.push_back({e3 - j, g});
                        e2 = e3;
                    }
                }
                for (const auto& [n, g] : sizes)
                    for (std::uint32_t t = 1; t <= sopt.max_tp && t <= n; t *= 2) {
                        if (n % t != 0 || g % t != 0 || n / t > b) continue;
                        if (sopt.max_replicas != 0 && n / t > sopt.max_replicas) continue;
                        for (std::size_t i2 = i + 1; i2 <= L; ++i2) {
                            if (i2 < L && j + n >= D) continue;
                            Stage st;
                            st.first_layer = i;
                            st.last_layer = i2 - 1;
                            st.tp = t;
                            st.devices.assign(order.begin() + static_cast<std::ptrdiff_t>(j),
                                              order.begin() + static_cast<std::ptrdiff_t>(j + n));
                            stages.push_back(st);
                            rec(i2, j + n);
                            stages.pop_back();
                        }
                    }
            };
            rec(0, 0);
        }
    }
    return ex;
}

bool close(double a, double b) { return std::fabs(a - b) <= 1e-9 * std::max(std::fabs(a), std::fabs(b)); }

}  // namespace

TEST_CASE("the DP finds the exhaustive optimum on 240 random small instances") {
    std::mt19937_64 rng(20261127);
    std::size_t checked = 0, infeasible = 0, plans = 0;
    double worst_makespan_ratio = 1;
    for (int n = 0; n < 240; ++n) {
        const Instance in = random_instance(rng);
        CostOptions copt;
        copt.recompute = n % 7 == 3;
        copt.shard_optimizer = n % 5 == 1;
        SolverOptions sopt;
        sopt.objective = n % 2 == 0 ? Objective::throughput : Objective::iteration;
        sopt.schedule = n % 3 == 0 ? ScheduleKind::gpipe : ScheduleKind::one_f_one_b;
        sopt.max_tp = n % 4 == 0 ? 1 : 2;
        sopt.max_replicas = n % 6 == 5 ? 1 : 0;
        const AnalyticalCostModel cost(in.model, in.cluster, copt);
        const Exhaustive ex = exhaustive(in.model, in.cluster, cost, copt, sopt);
        plans += ex.plans;
        CAPTURE(n);
        CAPTURE(in.model.layers.size());
        CAPTURE(in.cluster.devices.size());
        if (ex.best_objective == inf) {
            CHECK_THROWS_AS((void)solve(in.model, in.cluster, cost, copt, sopt), InfeasibleError);
            ++infeasible;
            continue;
        }
        const SolveResult r = solve(in.model, in.cluster, cost, copt, sopt);
        CHECK(r.estimate.fits);
        CHECK(close(r.search_optimum_s, ex.best_objective));
        if (sopt.objective == Objective::throughput) {
            CHECK(close(objective_value(sopt.objective, r.plan, r.estimate), ex.best_objective));
        } else {
            CHECK(r.estimate.iteration_s >= ex.best_makespan * (1 - 1e-12));
            worst_makespan_ratio = std::max(worst_makespan_ratio, r.estimate.iteration_s / ex.best_makespan);
        }
        ++checked;
    }
    CHECK(checked >= 200);
    std::printf("[brute force] %zu instances solved and checked, %zu infeasible (both agree), %zu plans enumerated; "
                "iteration objective: chosen plan's exact makespan is at worst %.4f x the exhaustive best\n",
                checked, infeasible, plans, worst_makespan_ratio);
}

TEST_CASE("with no replication and an infinitely fast network the bottleneck is the largest stage sum") {
    Instance in;
    ModelSpec spec;
    spec.name = "chain";
    spec.global_batch = 4;
    std::vector<double> flops{3e10, 1e10, 4e10, 1e10, 5e10, 9e10, 2e10, 6e10};
    for (std::size_t l = 0; l < flops.size(); ++l) {
        CustomOp c;
        c.fwd_flops = static_cast<std::uint64_t>(flops[l]);
        c.bwd_flops = 2 * c.fwd_flops;
        c.params = 0;
        c.out_bytes = 1000;
        c.saved_bytes = 1000;
        LayerSpec ls;
        ls.name = "l" + std::to_string(l);
        ls.op = c;
        spec.layers.push_back(ls);
    }
    in.model = build_model(spec);
    Cluster& c = in.cluster;
    c.name = "fast";
    c.nodes.push_back(Node{"n0", std::nullopt, {0, 1, 2}, {}});
    for (int d = 0; d < 3; ++d) c.devices.push_back(Device{"d" + std::to_string(d), "", 0, 100, {}, {}, 80, 3000, {}, {}});
    c.intra_default = LinkSpec{1e300, 0};
    SolverOptions sopt;
    sopt.objective = Objective::throughput;
    sopt.max_replicas = 1;
    sopt.max_tp = 1;
    sopt.microbatch_size = 1;
    const AnalyticalCostModel cost(in.model, in.cluster, {});
    const SolveResult r = solve(in.model, in.cluster, cost, {}, sopt);
    // Per microbatch of one sample, layer l takes 3 * flops / 1e14 s; the optimal 3-way split of
    // {3,1,4,1,5,9,2,6} (x 1e10) is {3,1,4,1,5}{9}{2,6} with the largest part 14.
    double largest = 0;
    for (const auto& st : r.plan.stages) {
        double sum = 0;
        for (std::size_t l = st.first_layer; l <= st.last_layer; ++l) sum += 3 * flops[l] / 1e14;
        largest = std::max(largest, sum);
    }
    CHECK(r.estimate.bottleneck_s == doctest::Approx(largest).epsilon(1e-12));
    CHECK(largest == doctest::Approx(3 * 14e10 / 1e14).epsilon(1e-12));
}

namespace {
const std::string plans_dir = std::string(DPART_SOURCE_DIR) + "/plans/";
}

TEST_CASE("no baseline beats the optimal plan on the bundled models and clusters") {
    for (const char* m : {"seed-mlp", "gpt2-small", "vgg16", "resnet-block", "llama3-8b"}) {
        const Model model = load_model(plans_dir + "models/" + m + ".toml");
        for (const char* c : {"cpu-local", "h100x1", "dgx-h100", "h100-4x8", "hetero-3kinds"}) {
            const Cluster cluster = load_cluster(plans_dir + "clusters/" + c + ".toml");
            const AnalyticalCostModel cost(model, cluster, {});
            CAPTURE(m);
            CAPTURE(c);
            SolverOptions sopt;
            double optimal = inf;
            try {
                optimal = solve(model, cluster, cost, {}, sopt).estimate.iteration_s;
            } catch (const InfeasibleError&) {
            }
            for (Strategy s : {Strategy::uniform, Strategy::parameters, Strategy::time, Strategy::data_parallel}) {
                sopt.strategy = s;
                try {
                    const SolveResult b = solve(model, cluster, cost, {}, sopt);
                    CHECK(b.estimate.fits);
                    CHECK(b.estimate.iteration_s >= optimal * (1 - 1e-9));
                } catch (const InfeasibleError&) {
                }
            }
        }
    }
}

TEST_CASE("no stage gets a tensor-parallel degree one of its layers cannot split over") {
    // tiny-mixtral's blocks have 2 KV heads: on 4 CPU workers tp 4 looked fastest, and dpart run
    // refused the plan. Every strategy now keeps tp to what each stage's layers divide by.
    CHECK(tp_divides(LinearOp{6, 10, true, std::nullopt}, 2));
    CHECK_FALSE(tp_divides(LinearOp{6, 10, true, std::nullopt}, 4));
    CHECK(tp_divides(LinearOp{6, 10, true, std::size_t{0}}, 4));  // tied: whole on every rank
    CHECK_FALSE(tp_divides(AttentionOp{16, 4, 2, 4, 0, true, true, true}, 4));
    CHECK(tp_divides(NormOp{NormKind::rmsnorm, 6, false}, 8));
    const Model model = load_model(plans_dir + "models/tiny-mixtral.toml");
    const Cluster cluster = load_cluster(plans_dir + "clusters/cpu-4workers.toml");
    const AnalyticalCostModel cost(model, cluster, {});
    for (Strategy s : {Strategy::optimal, Strategy::uniform, Strategy::parameters, Strategy::time}) {
        SolverOptions sopt;
        sopt.strategy = s;
        const SolveResult r = solve(model, cluster, cost, {}, sopt);
        for (const Stage& st : r.plan.stages)
            for (std::size_t l = st.first_layer; l <= st.last_layer; ++l) {
                CAPTURE(l);
                CHECK(tp_divides(model.layers[l].op, st.tp));
            }
    }
}

TEST_CASE("a model that fits nowhere is infeasible, with what would help") {
    const Model model = load_model(plans_dir + "models/llama3-70b.toml");
    const Cluster cluster = load_cluster(plans_dir + "clusters/h100x1.toml");
    const AnalyticalCostModel cost(model, cluster, {});
    try {
        (void)solve(model, cluster, cost, {}, {});
        FAIL("no error");
    } catch (const InfeasibleError& e) {
        const std::string what = e.what();
        CHECK(what.find("no plan fits in memory") != std::string::npos);
        CHECK(what.find("the training state alone is 1.0 TiB") != std::string::npos);
        CHECK(what.find("at least 14 devices like") != std::string::npos);
        CHECK(what.find("--recompute") != std::string::npos);
        CHECK(e.code() == ExitCode::infeasible);
    }
}

TEST_CASE("microbatch candidates") {
    SolverOptions o;
    CHECK(microbatch_candidates(12, o) == std::vector<std::uint64_t>{1, 2, 3, 4, 6, 12});
    o.microbatch_size = 4;
    CHECK(microbatch_candidates(12, o) == std::vector<std::uint64_t>{4});
    o.microbatch_size = 5;
    CHECK_THROWS_AS((void)microbatch_candidates(12, o), InputError);
    o.microbatch_size = 0;
    o.microbatches = 3;
    CHECK(microbatch_candidates(12, o) == std::vector<std::uint64_t>{4});
}

TEST_CASE("under 1F1B's in-flight memory the DP finds the exhaustive optimum on 160 random instances") {
    std::mt19937_64 rng(20261207);
    std::size_t checked = 0, infeasible = 0;
    for (int n = 0; n < 160; ++n) {
        const Instance in = random_instance(rng, true);
        CostOptions copt;
        copt.recompute = n % 4 == 3;
        copt.shard_optimizer = n % 5 == 1;
        SolverOptions sopt;
        sopt.objective = n % 2 == 0 ? Objective::throughput : Objective::iteration;
        sopt.max_tp = n % 3 == 0 ? 2 : 1;
        const AnalyticalCostModel cost(in.model, in.cluster, copt);
        const Exhaustive ex = exhaustive(in.model, in.cluster, cost, copt, sopt);
        CAPTURE(n);
        if (ex.best_objective == inf) {
            CHECK_THROWS_AS((void)solve(in.model, in.cluster, cost, copt, sopt), InfeasibleError);
            ++infeasible;
            continue;
        }
        const SolveResult r = solve(in.model, in.cluster, cost, copt, sopt);
        CHECK(r.exact);
        CHECK(r.estimate.fits);
        CHECK(close(r.search_optimum_s, ex.best_objective));
        if (sopt.objective == Objective::throughput)
            CHECK(close(objective_value(sopt.objective, r.plan, r.estimate), ex.best_objective));
        else
            CHECK(r.estimate.iteration_s >= ex.best_makespan * (1 - 1e-12));
        ++checked;
    }
    CHECK(checked >= 100);
    std::printf("[brute force, 1F1B memory] %zu instances solved and checked, %zu infeasible (both agree)\n", checked,
                infeasible);
}

TEST_CASE("the plan does not depend on the DP's thread count") {
    // Llama-3-8B on 1024 GPUs of 24 GiB in nodes of 8 (half H100-, half A100-fast), microbatches
    // of 64: 7,056 device blocks, so every DP run shares each layer's states among the threads,
    // and the memory is tight enough for the DP over 1F1B stage levels (16 levels) to run too.
    std::string text = "[cluster]\nname = \"half-and-half\"\n[network]\nintra_node_gbs = 370.0\n"
                       "intra_node_latency_us = 3.0\ninter_node_gbs = 50.0\ninter_node_latency_us = 8.0\n";
    for (const char* kind : {"H100", "A100"})
        text += fmt::format("[[device_group]]\nnodes = 64\nnode_prefix = \"{}\"\ndevices_per_node = 8\nkind = \"{}\"\n"
                            "tflops = {}\nmem_gib = 24\nmem_bw_gbs = 2000.0\n",
                            kind[0] == 'H' ? "h" : "a", kind, kind[0] == 'H' ? 801.0 : 250.0);
    const Cluster cluster = parse_cluster(text, "half-and-half.toml");
    const Model model = load_model(plans_dir + "models/llama3-8b.toml");
    std::size_t levels = 0;
    for (const bool fused : {false, true})
        for (const Objective objective : {Objective::iteration, Objective::throughput}) {
            CAPTURE(fused);
            CAPTURE(to_string(objective));
            CostOptions copt;
            copt.recompute = true;
            copt.fused_attention = fused;
            const AnalyticalCostModel cost(model, cluster, copt);
            SolverOptions sopt;
            sopt.objective = objective;
            sopt.microbatch_size = 64;
            const SolveResult one = solve(model, cluster, cost, copt, sopt);
            sopt.threads = 3;
            const SolveResult three = solve(model, cluster, cost, copt, sopt);
            CHECK(three.plan == one.plan);
            CHECK(three.search_optimum_s == one.search_optimum_s);
            CHECK(three.estimate.iteration_s == one.estimate.iteration_s);
            CHECK(three.plans_evaluated == one.plans_evaluated);
            CHECK(three.exact == one.exact);
            CHECK(one.threaded_runs == 0);
            CHECK(three.threaded_runs > 0);  // the case is large enough for the threads to run
            CHECK(three.level_runs == one.level_runs);
            levels += one.level_runs;
        }
    CHECK(levels > 0);  // and tight enough for the DP over stage levels
    // Infeasible: the closest stage's excess is the least over every thread's share.
    const Model big = load_model(plans_dir + "models/llama3-70b.toml");
    const AnalyticalCostModel cost(big, cluster, {});
    SolverOptions sopt;
    sopt.microbatch_size = 64;
    std::string messages[2];
    for (int t = 0; t < 2; ++t) {
        sopt.threads = t == 0 ? 1 : 3;
        try {
            (void)solve(big, cluster, cost, {}, sopt);
        } catch (const InfeasibleError& e) {
            messages[t] = e.what();
        }
    }
    CHECK(messages[0].find("the closest stage needs") != std::string::npos);
    CHECK(messages[1] == messages[0]);
}
