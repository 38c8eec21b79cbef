// The GEMM rate of a linear layer's training step on CPU workers, by microbatch rows: the three
// products (y = x W^T, dx = dy W, dW += dy^T x) of a 1024 x 1024 layer through OpenBLAS,
// single-threaded as dpart run's workers call it, on one core and on every core at once
// (->Threads). It is what overlaps_memory = false models (docs/METHOD.md, the cost model):
// compute + memory time predicts the rate's fall at few rows, max(compute, memory) a flat rate.
//   build/bench/dpart_bench_cpu_gemm --benchmark_counters_tabular=true
#include <benchmark/benchmark.h>
#include <cblas.h>

#include <vector>

#include "dpart/runtime/backend.hpp"

namespace {

void BM_LinearStepProducts(benchmark::State& state) {
    if (state.thread_index() == 0) dpart::rt::prepare_cpu_workers();
    const int m = static_cast<int>(state.range(0));
    constexpr int d = 1024;
    std::vector<float> x(static_cast<std::size_t>(m) * d, 0.5f), w(static_cast<std::size_t>(d) * d, 0.25f),
        y(static_cast<std::size_t>(m) * d), dx(static_cast<std::size_t>(m) * d), dw(static_cast<std::size_t>(d) * d);
    for (auto _ : state) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, d, d, 1.0f, x.data(), d, w.data(), d, 0.0f, y.data(), d);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, d, d, 1.0f, y.data(), d, w.data(), d, 0.0f, dx.data(),
                    d);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, d, d, m, 1.0f, y.data(), d, x.data(), d, 1.0f, dw.data(), d);
        benchmark::DoNotOptimize(dw.data());
        benchmark::ClobberMemory();
    }
    // Per core: each thread's products over its own time.
    state.counters["GFLOP"] = benchmark::Counter(6.0 * m * d * d * static_cast<double>(state.iterations()) / 1e9,
                                                   benchmark::Counter::kIsRate | benchmark::Counter::kAvgThreads);
}
BENCHMARK(BM_LinearStepProducts)
    ->RangeMultiplier(2)
    ->Range(8, 1024)
    ->Threads(1)
    ->Threads(2)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
