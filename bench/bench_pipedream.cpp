// PipeDream's planner on PipeDream's published profiles (plans/pipedream/), for every row of
// ../shared/data/pipedream/README.md, against the solve times listed there.
// Run: build/bench/dpart_bench_pipedream  (docs/METHOD.md has the table)
#include <benchmark/benchmark.h>

#include <vector>

#include "dpart/io/model_toml.hpp"
#include "dpart/plan/pipedream.hpp"

namespace {

const std::string plans = std::string(DPART_SOURCE_DIR) + "/plans/pipedream/";

/// Arguments: model (0 vgg16, 1 resnet50), workers, straight pipeline.
void BM_PipeDream(benchmark::State& state, bool include_load) {
    const std::string file = plans + (state.range(0) == 0 ? "vgg16.toml" : "resnet50.toml");
    const dpart::Model loaded = dpart::load_model(file);
    dpart::PipeDreamOptions o;
    o.workers = static_cast<std::size_t>(state.range(1));
    o.bandwidth = 1e9;
    o.straight_pipeline = state.range(2) != 0;
    double time_per_stage = 0;
    for (auto _ : state) {
        if (include_load) {
            const dpart::Model m = dpart::load_model(file);
            time_per_stage = dpart::solve_pipedream(m, o).time_per_stage_s;
        } else {
            time_per_stage = dpart::solve_pipedream(loaded, o).time_per_stage_s;
        }
        benchmark::DoNotOptimize(time_per_stage);
    }
    state.counters["time_per_stage_s"] = time_per_stage;
}

void rows(benchmark::internal::Benchmark* b) {
    b->ArgNames({"model", "workers", "straight"});
    const std::vector<std::vector<std::int64_t>> readme_rows{{0, 4, 0}, {0, 8, 0}, {0, 16, 0}, {0, 32, 0},
                                                             {0, 4, 1}, {1, 4, 0}, {1, 16, 0}};
    for (const auto& r : readme_rows) b->Args(r);
    b->Unit(benchmark::kMillisecond);
}

}  // namespace

BENCHMARK_CAPTURE(BM_PipeDream, solve, false)->Apply(rows);
BENCHMARK_CAPTURE(BM_PipeDream, load_and_solve, true)->Apply(rows);

BENCHMARK_MAIN();
