#include <doctest/doctest.h>

#include "dpart/io/cluster_toml.hpp"

using namespace dpart;

namespace {

std::string error_of(const std::string& text) {
    try {
        (void)parse_cluster(text, "c.toml");
    } catch (const InputError& e) {
        return e.what();
    }
    return "no error";
}

const std::string network = R"([cluster]
name = "c"
[network]
intra_node_gbs = 370.0
intra_node_latency_us = 3.0
inter_node_gbs = 50.0
inter_node_latency_us = 8.0
)";

}  // namespace

TEST_CASE("the compact form: 128 nodes x 8 GPUs") {
    const Cluster c = parse_cluster(network + R"([[device_group]]
nodes = 128
devices_per_node = 8
kind = "H100"
tflops = 790.0
tflops_fp32 = 51.0
mem_gib = 80.0
mem_bw_gbs = 3000.0
)",
                                    "c.toml");
    REQUIRE(c.devices.size() == 1024);
    CHECK(c.nodes.size() == 128);
    CHECK(c.devices[0].name == "node0.gpu0");
    CHECK(c.devices[1023].name == "node127.gpu7");
    CHECK(c.devices[9].node == 1);
    CHECK(c.link(0, 7) == LinkSpec{370, 3});
    CHECK(c.link(0, 8) == LinkSpec{50, 8});
    CHECK(c.devices[5].tflops_for(DType::fp32) == 51);
    CHECK(c.find_device("node3.gpu2") == 26);
}

TEST_CASE("declared nodes, per-node links and link overrides") {
    const Cluster c = parse_cluster(network + R"([[node]]
name = "a"
[[node]]
name = "p0"
intra_node_gbs = 25.0
intra_node_latency_us = 10
[[device]]
name = "a0"
node = "a"
tflops = 250
mem_gib = 80
mem_bw_gbs = 1600
[[device]]
name = "a1"
node = "a"
tflops = 250
mem_gib = 80
mem_bw_gbs = 1600
[[device_group]]
nodes = 1
node_prefix = "p"
first_node = 0
devices_per_node = 2
tflops = 290
mem_gib = 44.7
mem_bw_gbs = 690
[[link]]
a = "a1"
b = "p0.gpu1"
gbs = 12.5
latency_us = 20
)",
                                    "c.toml");
    REQUIRE(c.devices.size() == 4);
    CHECK(c.nodes.size() == 2);
    CHECK(c.devices[2].name == "p0.gpu0");
    CHECK(c.link(0, 1) == LinkSpec{370, 3});    // node a: network default
    CHECK(c.link(2, 3) == LinkSpec{25, 10});    // node p0: its own (PCIe)
    CHECK(c.link(1, 3) == LinkSpec{12.5, 20});  // the override
    CHECK(c.link(0, 2) == LinkSpec{50, 8});
    CHECK(c.devices[3].mem_gib == doctest::Approx(44.7));
}

TEST_CASE("cluster errors point at the offending value") {
    CHECK(error_of(network + "[[device]]\nname = \"g\"\nnode = \"n\"\ntflops = 0\nmem_gib = 80\nmem_bw_gbs = 1\n") ==
          "c.toml:11:10: device \"g\": \"tflops\" must be positive, got 0");
    CHECK(error_of(network + "[[device]]\nname = \"g\"\ntflops = 1\nmem_gib = 80\nmem_bw_gbs = 1\n") ==
          "c.toml:8:1: device \"g\": missing required key \"node\" (every device belongs to a node)");
    CHECK(error_of(network) == "c.toml:1:1: the cluster has no devices: add [[device]] or [[device_group]] tables");
    CHECK(error_of("[cluster]\nname = \"c\"\n[[device_group]]\nnodes = 1\ndevices_per_node = 2\ntflops = 1\nmem_gib = 1\nmem_bw_gbs = 1\n") ==
          "c.toml:1:1: node \"node0\" has 2 devices but gives no link between them: add [network] intra_node_gbs and "
          "intra_node_latency_us, or the node's own");
    CHECK(error_of(network + "[[device_group]]\nnodes = 1000000\ndevices_per_node = 8\ntflops = 1\nmem_gib = 1\nmem_bw_gbs = 1\n")
              .find("more than the 1048576 dpart accepts") != std::string::npos);
    CHECK(error_of(network + "[[device]]\nname = \"g\"\nnode = \"n\"\ntflops = 1\nmem_gib = 1\nmem_bw_gbs = 1\n"
                             "[[link]]\na = \"g\"\nb = \"h\"\ngbs = 1\nlatency_us = 1\n") ==
          "c.toml:16:5: link \"g\" - \"h\": device \"h\" is not defined (did you mean \"g\"?)");
}

TEST_CASE("overlaps_memory: true unless a device says otherwise, and a boolean") {
    const Cluster c = parse_cluster(network + "[[device]]\nname = \"g\"\nnode = \"n\"\ntflops = 1\nmem_gib = 1\n"
                                              "mem_bw_gbs = 1\n[[device]]\nname = \"cpu\"\nnode = \"n\"\ntflops = 1\n"
                                              "mem_gib = 1\nmem_bw_gbs = 1\noverlaps_memory = false\n",
                                    "c.toml");
    CHECK(c.devices.at(0).overlaps_memory);
    CHECK_FALSE(c.devices.at(1).overlaps_memory);
    const std::string err = error_of(network + "[[device]]\nname = \"g\"\nnode = \"n\"\ntflops = 1\nmem_gib = 1\n"
                                               "mem_bw_gbs = 1\noverlaps_memory = \"no\"\n");
    CHECK(err.find("c.toml:14:") == 0);
    CHECK(err.find("overlaps_memory") != std::string::npos);
}

TEST_CASE("with [[node]] tables, every device must be on a declared node") {
    CHECK(error_of(network + "[[node]]\nname = \"n0\"\n[[device]]\nname = \"g\"\nnode = \"n1\"\ntflops = 1\nmem_gib = 1\nmem_bw_gbs = 1\n") ==
          "c.toml:12:8: device \"g\": node \"n1\" is not declared by any [[node]] table (did you mean \"n0\"?)");
}

TEST_CASE("a [[link]] between two nodes joins every pair of their devices; a device pair's own wins") {
    // Three hosts of two devices each: h0 - h1 and h0 - h2 measured, h1 - h2 by the default.
    const std::string hosts = R"([[device_group]]
nodes = 3
node_prefix = "h"
devices_per_node = 2
tflops = 100
mem_gib = 80
mem_bw_gbs = 2000
[[link]]
a = "h0"
b = "h1"
gbs = 22.5
latency_us = 4
[[link]]
a = "h2"
b = "h0"
gbs = 11.0
latency_us = 6
)";
    const Cluster c = parse_cluster(network + hosts + "[[link]]\na = \"h0.gpu1\"\nb = \"h1.gpu0\"\ngbs = 5\nlatency_us = 9\n",
                                    "c.toml");
    REQUIRE(c.devices.size() == 6);
    CHECK(c.link(0, 2) == LinkSpec{22.5, 4});  // h0 - h1
    CHECK(c.link(3, 0) == LinkSpec{22.5, 4});
    CHECK(c.link(1, 2) == LinkSpec{5, 9});     // the device pair's own
    CHECK(c.link(5, 1) == LinkSpec{11, 6});    // h0 - h2, given as h2 - h0
    CHECK(c.link(2, 4) == LinkSpec{50, 8});    // h1 - h2: the network default
    CHECK(c.link(0, 1) == LinkSpec{370, 3});   // inside h0
    CHECK(c.link_kind(0, 2) == LinkKind::override_);
    CHECK(c.link_kind(2, 4) == LinkKind::inter_node);

    // Without an inter-node default, every pair of nodes needs its link.
    const std::string intra_only = "[cluster]\nname = \"c\"\n[network]\nintra_node_gbs = 370.0\nintra_node_latency_us = 3.0\n";
    CHECK(error_of(intra_only + hosts) ==
          "c.toml:3:1: the cluster spans 3 nodes but gives no inter-node link: add [network] inter_node_gbs and "
          "inter_node_latency_us, or a [[link]] between every two nodes");
    const Cluster all = parse_cluster(intra_only + hosts + "[[link]]\na = \"h1\"\nb = \"h2\"\ngbs = 30\nlatency_us = 2\n",
                                      "c.toml");
    CHECK(all.link(2, 5) == LinkSpec{30, 2});
    CHECK(!all.inter_default.has_value());

    // A link names two devices or two nodes, two different ones, once.
    CHECK(error_of(network + hosts + "[[link]]\na = \"h0\"\nb = \"h1.gpu0\"\ngbs = 1\nlatency_us = 1\n")
              .find("a link joins two devices or two nodes, not a device and a node") != std::string::npos);
    CHECK(error_of(network + hosts + "[[link]]\na = \"h1.gpu0\"\nb = \"h0\"\ngbs = 1\nlatency_us = 1\n")
              .find("a link joins two devices or two nodes, not a device and a node") != std::string::npos);
    CHECK(error_of(network + hosts + "[[link]]\na = \"h1\"\nb = \"h1\"\ngbs = 1\nlatency_us = 1\n")
              .find("a link joins two different nodes") != std::string::npos);
    CHECK(error_of(network + hosts + "[[link]]\na = \"h1\"\nb = \"h9\"\ngbs = 1\nlatency_us = 1\n")
              .find("node \"h9\" is not defined (did you mean") != std::string::npos);
    CHECK(error_of(network + hosts + "[[link]]\na = \"h1\"\nb = \"h0\"\ngbs = 1\nlatency_us = 1\n")
              .find("this pair's link is given twice (first at line") != std::string::npos);
}
