#include <doctest/doctest.h>

#include <algorithm>

#include "dpart/cost/cost_model.hpp"
#include "dpart/io/cluster_toml.hpp"
#include "dpart/io/model_toml.hpp"

using namespace dpart;

namespace {

const std::string cluster_text = R"([cluster]
name = "c"
[network]
intra_node_gbs = 100.0
intra_node_latency_us = 2.0
inter_node_gbs = 10.0
inter_node_latency_us = 10.0
[[device_group]]
nodes = 2
devices_per_node = 2
tflops = 100.0
mem_gib = 80.0
mem_bw_gbs = 1000.0
)";

}  // namespace

TEST_CASE("roofline: a layer is compute- or memory-bound") {
    const Model m = parse_model(R"([model]
name = "m"
dtype = "fp32"
global_batch = 8
[[layer]]
name = "fc"
op = "linear"
in_features = 4096
out_features = 4096
bias = false
[[layer]]
name = "act"
op = "relu"
)",
                                "m.toml");
    const Cluster c = parse_cluster(cluster_text, "c.toml");
    const AnalyticalCostModel cost(m, c);
    // fc, 8 samples: 2*8*4096^2 FLOP = 268 MFLOP at 100 TFLOP/s = 2.68 us; bytes: weights 64 MiB
    // + 8 * 2 * 4096 * 4 B at 1000 GB/s = 67.4 us: memory-bound.
    const double weights = 4096.0 * 4096 * 4;
    CHECK(cost.layer_seconds(0, Pass::forward, 0, 8, 1) == doctest::Approx((weights + 8 * 8192 * 4.0) / 1e12));
    // With 100,000 samples the FLOPs dominate.
    CHECK(cost.layer_seconds(0, Pass::forward, 0, 100000, 1) == doctest::Approx(2e5 * 4096.0 * 4096 / 1e14));
    CHECK(cost.layer_seconds(0, Pass::backward, 0, 100000, 1) == doctest::Approx(4e5 * 4096.0 * 4096 / 1e14));
    // relu: traffic only, 2 * 4096 * 4 B per sample forward.
    CHECK(cost.layer_seconds(1, Pass::forward, 0, 8, 1) == doctest::Approx(8 * 2 * 4096 * 4.0 / 1e12));
    // Tensor parallelism halves the linear's work and adds a gather of its output on the node's link.
    const double tp2 = cost.layer_seconds(0, Pass::forward, 0, 100000, 2);
    const double allreduce = ring_allreduce_seconds(100000ull * 4096 * 4, 2, LinkSpec{100, 2});
    CHECK(tp2 == doctest::Approx(1e5 * 4096.0 * 4096 / 1e14 + allreduce));
    // relu is not split.
    CHECK(cost.layer_seconds(1, Pass::forward, 0, 8, 2) == cost.layer_seconds(1, Pass::forward, 0, 8, 1));
}

TEST_CASE("roofline on a device that does not overlap memory with arithmetic: the sum") {
    const Model m = parse_model(R"([model]
name = "m"
dtype = "fp32"
global_batch = 16
[[layer]]
name = "fc"
op = "linear"
in_features = 1024
out_features = 1024
bias = false
)",
                                "m.toml");
    std::string text = cluster_text;
    const Cluster overlapped = parse_cluster(text, "c.toml");
    text += "overlaps_memory = false\n";
    const Cluster serial = parse_cluster(text, "c.toml");
    // 16 samples: 2*16*1024^2 FLOP at 100 TFLOP/s, and 4 MiB of weights + 16 * 2 * 1024 * 4 B at
    // 1000 GB/s: memory-bound when they overlap, their sum when not.
    const double compute = 2.0 * 16 * 1024 * 1024 / 1e14;
    const double memory = (1024.0 * 1024 * 4 + 16 * 2048 * 4.0) / 1e12;
    CHECK(AnalyticalCostModel(m, overlapped).layer_seconds(0, Pass::forward, 0, 16, 1) ==
          doctest::Approx(std::max(compute, memory)));
    CHECK(AnalyticalCostModel(m, serial).layer_seconds(0, Pass::forward, 0, 16, 1) ==
          doctest::Approx(compute + memory));
}

TEST_CASE("ring all-reduce: 2(n-1)/n of the bytes over the slowest hop, 2(n-1) latencies") {
    CHECK(ring_allreduce_seconds(1000000000, 4, LinkSpec{100, 0}) == doctest::Approx(1.5e9 / 1e11));
    CHECK(ring_allreduce_seconds(0, 4, LinkSpec{100, 5}) == 0);
    CHECK(ring_allreduce_seconds(1000, 1, LinkSpec{100, 5}) == 0);
    CHECK(ring_allreduce_seconds(8, 2, LinkSpec{1e300, 5}) == doctest::Approx(2 * 5e-6));
    const Cluster c = parse_cluster(cluster_text, "c.toml");
    Model tiny;
    const AnalyticalCostModel cost(tiny, c);
    // Devices 0,1 share node0; 2,3 node1: a ring over 0 and 2 crosses nodes (10 GB/s, 10 us).
    CHECK(cost.allreduce_seconds({0, 2}, 1000000000) == doctest::Approx(1e9 / 1e10 + 2 * 10e-6));
    CHECK(cost.allreduce_seconds({0, 1}, 1000000000) == doctest::Approx(1e9 / 1e11 + 2 * 2e-6));
    CHECK(cost.allreduce_seconds({0}, 1000000000) == 0);
    CHECK(cost.transfer_seconds(0, 3, 1000000) == doctest::Approx(10e-6 + 1e6 / 1e10));
    CHECK(cost.device_class(0) == cost.device_class(3));
}

TEST_CASE("which ops tensor parallelism splits, and its collectives") {
    CHECK(tp_splits(TransformerBlockOp{}));
    CHECK(tp_splits(LinearOp{}));
    CHECK_FALSE(tp_splits(NormOp{}));
    CHECK_FALSE(tp_splits(Conv2dOp{}));
    // The embedding and the loss only when planned vocabulary-parallel (dpart run's are whole).
    CHECK_FALSE(tp_splits(EmbeddingOp{}));
    CHECK_FALSE(tp_splits(SoftmaxXentOp{}));
    CHECK(tp_splits(EmbeddingOp{}, true));
    CHECK(tp_splits(SoftmaxXentOp{}, true));
    CHECK(tp_collectives(TransformerBlockOp{}).forward == 2);
    CHECK(tp_collectives(TransformerBlockOp{}).backward == 2);
    CHECK(tp_collectives(EmbeddingOp{}).backward == 0);
    CHECK(tp_collectives(TransformerBlockOp{}).forward_calls == 2);
    // A mixture of experts sums k experts' outputs per token, expert by expert (8 calls), after
    // gathering its router's logits in forward.
    TransformerBlockOp mixtral;
    mixtral.mlp.experts = 8;
    mixtral.mlp.experts_per_token = 2;
    CHECK(tp_collectives(mixtral).forward == 3);
    CHECK(tp_collectives(mixtral).forward_calls == 1 + 9);
    CHECK(tp_collectives(mixtral.mlp).backward == 2);
    CHECK(tp_collectives(mixtral.mlp).backward_calls == 8);
}
