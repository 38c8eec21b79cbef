// Simulation speed: building and simulating schedule task graphs. Run: build/bench/dpart_bench_sim
#include <benchmark/benchmark.h>

#include "dpart/sim/schedule.hpp"

namespace {

std::vector<dpart::StageDurations> stages(std::int64_t n) {
    std::vector<dpart::StageDurations> s;
    for (std::int64_t i = 0; i < n; ++i)
        s.push_back({1.0 + 0.01 * static_cast<double>(i % 7), 2.0 + 0.02 * static_cast<double>(i % 5), 0.1, 0.1, 0.5, 0.2});
    return s;
}

/// One iteration: build the graph and simulate it (what replay does per iteration).
void BM_Iteration(benchmark::State& state, dpart::ScheduleKind kind) {
    const auto s = stages(state.range(0));
    const auto M = static_cast<std::uint32_t>(state.range(1));
    std::size_t tasks = 0;
    for (auto _ : state) {
        const dpart::TaskGraph g = dpart::build_schedule(kind, s, M);
        tasks += g.tasks.size();
        benchmark::DoNotOptimize(dpart::simulate(g).makespan);
    }
    state.counters["tasks_per_s"] = benchmark::Counter(static_cast<double>(tasks), benchmark::Counter::kIsRate);
}
BENCHMARK_CAPTURE(BM_Iteration, one_f_one_b, dpart::ScheduleKind::one_f_one_b)
    ->Args({4, 32})
    ->Args({64, 32})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_Iteration, gpipe, dpart::ScheduleKind::gpipe)->Args({64, 32})->Unit(benchmark::kMicrosecond);

/// 1000 iterations of 64 stages x 32 microbatches, as `dpart replay -n 1000` simulates them.
void BM_Thousand_64x32(benchmark::State& state) {
    const auto s = stages(64);
    for (auto _ : state) {
        double total = 0;
        for (int it = 0; it < 1000; ++it) total += dpart::simulate(dpart::build_schedule(dpart::ScheduleKind::one_f_one_b, s, 32)).makespan;
        benchmark::DoNotOptimize(total);
    }
}
BENCHMARK(BM_Thousand_64x32)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
