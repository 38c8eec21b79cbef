// Loading and costing speed: model and cluster files, and models far larger than real ones.
// Run: ./build/dpart_bench   (see docs/METHOD.md for what each case measures)
#include <benchmark/benchmark.h>
#include <fmt/format.h>

#include "dpart/graph/model.hpp"
#include "dpart/io/cluster_toml.hpp"
#include "dpart/io/model_toml.hpp"

namespace {

const std::string plans = std::string(DPART_SOURCE_DIR) + "/plans/";

void BM_LoadModelFile(benchmark::State& state, const std::string& file) {
    for (auto _ : state) benchmark::DoNotOptimize(dpart::load_model(plans + file));
}
BENCHMARK_CAPTURE(BM_LoadModelFile, gpt2_small, std::string("models/gpt2-small.toml"))->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_LoadModelFile, llama3_70b, std::string("models/llama3-70b.toml"))->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_LoadModelFile, vgg16, std::string("models/vgg16.toml"))->Unit(benchmark::kMicrosecond);

/// A chain of N linear layers built in memory: validation and costing without TOML parsing.
void BM_BuildChain(benchmark::State& state) {
    dpart::ModelSpec spec;
    spec.name = "chain";
    spec.global_batch = 8;
    for (std::int64_t i = 0; i < state.range(0); ++i) {
        dpart::LayerSpec l;
        l.name = fmt::format("fc{}", i);
        l.op = dpart::LinearOp{1024, 1024, true, std::nullopt};
        spec.layers.push_back(std::move(l));
    }
    for (auto _ : state) benchmark::DoNotOptimize(dpart::build_model(spec));
    state.SetItemsProcessed(state.iterations() * state.range(0));
}
BENCHMARK(BM_BuildChain)->Arg(1000)->Arg(100000)->Unit(benchmark::kMillisecond);

/// A model file of N [[layer]] tables, parsed from text.
void BM_ParseLayerFile(benchmark::State& state) {
    std::string text = "[model]\nname = \"chain\"\ndtype = \"bf16\"\nglobal_batch = 8\n";
    for (std::int64_t i = 0; i < state.range(0); ++i)
        text += fmt::format("[[layer]]\nname = \"fc{}\"\nop = \"linear\"\nin_features = 512\nout_features = 512\n", i);
    for (auto _ : state) benchmark::DoNotOptimize(dpart::parse_model(text, "chain.toml"));
    state.SetItemsProcessed(state.iterations() * state.range(0));
    state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(text.size()));
}
BENCHMARK(BM_ParseLayerFile)->Arg(1000)->Arg(20000)->Unit(benchmark::kMillisecond);

void BM_LoadClusterFile(benchmark::State& state, const std::string& file) {
    for (auto _ : state) benchmark::DoNotOptimize(dpart::load_cluster(plans + file));
}
BENCHMARK_CAPTURE(BM_LoadClusterFile, h100_4x8, std::string("clusters/h100-4x8.toml"))->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_LoadClusterFile, hetero, std::string("clusters/hetero-3kinds.toml"))->Unit(benchmark::kMicrosecond);

/// The compact form: nodes x 8 GPUs expanded into devices.
void BM_CompactCluster(benchmark::State& state) {
    const std::string text = fmt::format(
        "[cluster]\nname = \"big\"\n[network]\nintra_node_gbs = 370.0\nintra_node_latency_us = 3.0\n"
        "inter_node_gbs = 50.0\ninter_node_latency_us = 8.0\n[[device_group]]\nnodes = {}\ndevices_per_node = 8\n"
        "tflops = 790.0\nmem_gib = 80.0\nmem_bw_gbs = 3000.0\n",
        state.range(0));
    for (auto _ : state) benchmark::DoNotOptimize(dpart::parse_cluster(text, "big.toml"));
    state.SetItemsProcessed(state.iterations() * state.range(0) * 8);
}
BENCHMARK(BM_CompactCluster)->Arg(128)->Arg(12500)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
