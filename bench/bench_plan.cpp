// Planner speed: layers x devices grid, the Llama-3-70B target on 1024 heterogeneous GPUs, and
// a 64-device re-plan. Run: build/bench/dpart_bench_plan  (docs/METHOD.md has the table)
#include <benchmark/benchmark.h>
#include <fmt/format.h>

#include "dpart/cost/cost_model.hpp"
#include "dpart/io/cluster_toml.hpp"
#include "dpart/io/model_toml.hpp"
#include "dpart/plan/solver.hpp"

namespace {

const std::string plans = std::string(DPART_SOURCE_DIR) + "/plans/";

/// A decoder of `blocks` Llama-3-8B-sized blocks (seq 2048), with embedding, norm, head, loss.
dpart::Model transformer(std::int64_t blocks) {
    return dpart::parse_model(fmt::format(R"([model]
name = "t{}"
dtype = "bf16"
global_batch = 512
[transformer]
layers = {}
hidden = 4096
heads = 32
kv_heads = 8
ffn_hidden = 14336
vocab = 128256
seq_len = 2048
norm = "rmsnorm"
mlp = "gated"
position = "rope"
bias = false
)",
                                          blocks, blocks),
                              "bench.toml");
}

/// `devices` GPUs in nodes of 8 (fewer when smaller), half H100 and half A100 when heterogeneous.
dpart::Cluster cluster(std::int64_t devices, bool heterogeneous) {
    const std::int64_t per_node = std::min<std::int64_t>(8, devices);
    const std::int64_t nodes = devices / per_node;
    std::string text = R"([cluster]
name = "bench"
[network]
intra_node_gbs = 370.0
intra_node_latency_us = 3.0
inter_node_gbs = 50.0
inter_node_latency_us = 8.0
)";
    const std::int64_t fast = heterogeneous ? std::max<std::int64_t>(1, nodes / 2) : nodes;
    text += fmt::format("[[device_group]]\nnodes = {}\nnode_prefix = \"h\"\ndevices_per_node = {}\nkind = \"H100\"\n"
                        "tflops = 801.0\nmem_gib = 79.2\nmem_bw_gbs = 3013.0\n",
                        fast, per_node);
    if (nodes - fast > 0)
        text += fmt::format("[[device_group]]\nnodes = {}\nnode_prefix = \"a\"\ndevices_per_node = {}\nkind = \"A100\"\n"
                            "tflops = 250.0\nmem_gib = 79.2\nmem_bw_gbs = 1630.0\n",
                            nodes - fast, per_node);
    return dpart::parse_cluster(text, "bench.toml");
}

void run(benchmark::State& state, const dpart::Model& model, const dpart::Cluster& c, dpart::SolverOptions o,
         bool fused_attention = false) {
    dpart::CostOptions copt;
    copt.recompute = true;
    copt.fused_attention = fused_attention;
    const dpart::AnalyticalCostModel cost(model, c, copt);
    std::size_t stages = 0;
    double iteration = 0;
    for (auto _ : state) {
        try {
            const dpart::SolveResult r = dpart::solve(model, c, cost, copt, o);
            stages = r.plan.stages.size();
            iteration = r.estimate.iteration_s;
            benchmark::DoNotOptimize(r);
        } catch (const dpart::InfeasibleError&) {
            state.SkipWithError("infeasible: the model fits on no plan");
            break;
        }
    }
    state.counters["stages"] = static_cast<double>(stages);
    state.counters["iteration_ms"] = iteration * 1e3;
}

/// The grid: blocks x devices (heterogeneous), microbatch size 8, iteration objective.
void BM_PlanGrid(benchmark::State& state) {
    const dpart::Model model = transformer(state.range(0));
    const dpart::Cluster c = cluster(state.range(1), true);
    dpart::SolverOptions o;
    o.microbatch_size = 8;
    run(state, model, c, o);
}
BENCHMARK(BM_PlanGrid)
    ->ArgsProduct({{32, 80, 256, 1024}, {8, 64, 512, 1024, 4096}})
    ->Unit(benchmark::kMillisecond)
    ->Iterations(1);

/// Llama-3-70B on 1024 GPUs (64 nodes of H100, 64 of A100), default options (every microbatch
/// size); arguments: objective (0 iteration, 1 throughput), attention (0 materialised, as dpart
/// run's kernels keep it: 8.6 GB of probabilities per sample and layer at sequence 8192; 1 fused,
/// as Megatron-LM trains it), the DP's threads (SolverOptions::threads; wall time).
void BM_Llama70B_1024Hetero(benchmark::State& state) {
    const dpart::Model model = dpart::load_model(plans + "models/llama3-70b.toml");
    const dpart::Cluster c = cluster(1024, true);
    dpart::SolverOptions o;
    o.objective = state.range(0) == 0 ? dpart::Objective::iteration : dpart::Objective::throughput;
    o.threads = static_cast<std::size_t>(state.range(2));
    run(state, model, c, o, state.range(1) == 1);
}
BENCHMARK(BM_Llama70B_1024Hetero)
    ->ArgsProduct({{0, 1}, {0, 1}, {1, 2}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(1);

/// A re-plan of Llama-3-70B on 64 H100s with the running job's microbatch size.
void BM_Replan64(benchmark::State& state) {
    const dpart::Model model = dpart::load_model(plans + "models/llama3-70b.toml");
    const dpart::Cluster c = cluster(64, false);
    dpart::SolverOptions o;
    o.microbatch_size = 1;
    o.objective = state.range(0) == 0 ? dpart::Objective::iteration : dpart::Objective::throughput;
    run(state, model, c, o, state.range(1) == 1);
}
BENCHMARK(BM_Replan64)->ArgsProduct({{0, 1}, {0, 1}})->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
