#include <doctest/doctest.h>

#include "dpart/cluster/cluster.hpp"

using namespace dpart;

namespace {

Cluster two_nodes() {
    Cluster c;
    c.name = "t";
    c.nodes = {Node{"n0", std::nullopt, {0, 1}, {}}, Node{"n1", LinkSpec{64, 10}, {2, 3}, {}}};
    for (int i = 0; i < 4; ++i) {
        Device d;
        d.name = "gpu" + std::to_string(i);
        d.node = static_cast<std::size_t>(i / 2);
        d.tflops = 100;
        d.mem_gib = 80;
        d.mem_bw_gbs = 2000;
        c.devices.push_back(d);
    }
    c.intra_default = LinkSpec{370, 3};
    c.inter_default = LinkSpec{50, 8};
    c.overrides[Cluster::pair_key(3, 0)] = LinkSpec{25, 5};
    return c;
}

}  // namespace

TEST_CASE("links resolve: override, then the node's own, then the network defaults") {
    const Cluster c = two_nodes();
    CHECK(c.link(0, 1) == LinkSpec{370, 3});  // intra, network default
    CHECK(c.link(2, 3) == LinkSpec{64, 10});  // intra, node n1's own
    CHECK(c.link(1, 2) == LinkSpec{50, 8});   // inter
    CHECK(c.link(0, 3) == LinkSpec{25, 5});   // override, both directions
    CHECK(c.link(3, 0) == LinkSpec{25, 5});
    CHECK(c.link_kind(0, 1) == LinkKind::intra_node);
    CHECK(c.link_kind(1, 2) == LinkKind::inter_node);
    CHECK(c.link_kind(0, 3) == LinkKind::override_);
    CHECK_THROWS_AS((void)c.link(1, 1), RuntimeError);
    CHECK(c.find_device("gpu2") == 2);
    CHECK_FALSE(c.find_device("gpu9").has_value());
}

TEST_CASE("transfer time is latency plus bytes over bandwidth, GB = 1e9 B") {
    CHECK(transfer_seconds(LinkSpec{50, 8}, 0) == doctest::Approx(8e-6));
    CHECK(transfer_seconds(LinkSpec{50, 8}, 1000000000) == doctest::Approx(0.02 + 8e-6));
    CHECK(transfer_seconds(LinkSpec{370, 0}, 370000000) == doctest::Approx(1e-3));
}

TEST_CASE("device figures per dtype and memory in bytes") {
    Device d;
    d.tflops = 790;
    d.tflops_by_dtype[static_cast<std::size_t>(DType::fp32)] = 51;
    d.mem_gib = 80;
    CHECK(d.tflops_for(DType::bf16) == 790);
    CHECK(d.tflops_for(DType::fp32) == 51);
    CHECK(d.mem_bytes() == 80ull * 1073741824ull);
}
