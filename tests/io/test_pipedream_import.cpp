// dpart import pipedream: PipeDream's graph.txt becomes measured custom layers, branches kept as
// inputs; the cost model scales the measured times; malformed profiles are located.
#include <doctest/doctest.h>

#include <fmt/format.h>

#include <filesystem>

#include "dpart/cluster/cluster.hpp"
#include "dpart/cost/cost_model.hpp"
#include "dpart/io/cluster_toml.hpp"
#include "dpart/io/model_toml.hpp"
#include "dpart/io/pipedream_import.hpp"

using namespace dpart;
namespace fs = std::filesystem;

namespace {

const fs::path plans = fs::path(DPART_SOURCE_DIR) / "plans";

std::string node(const std::string& id, const std::string& desc, double f, double b, double act, double params) {
    return fmt::format(
        "{} -- {} -- forward_compute_time={:.3f}, backward_compute_time={:.3f}, activation_size={:.3f}, "
        "parameter_size={:.3f}\n",
        id, desc, f, b, act, params);
}

/// Input -> conv -> (relu, shortcut) -> add -> __getitem__ (unused sink): a residual branch.
const std::string residual =
    node("node1", "Input", 9.0, 0.0, 4096.0, 0.0) + node("node3", "ReLU(inplace)", 1.0, 2.0, 2048.0, 0.0) +
    node("node2", "Conv2d(3, 8, kernel_size=(3, 3))", 5.5, 11.25, 2048.0, 896.0) +
    node("node4", "Conv2d(8, 8, kernel_size=(1, 1))", 2.0, 4.0, 2048.0, 288.0) +
    node("node5", "Add(inplace)", 0.5, 0.5, 2048.0, 0.0) + node("node6", "__getitem__(0)", 0.0, 0.0, 8.0, 0.0) +
    "\tnode1 -- node2\n\tnode2 -- node3\n\tnode2 -- node4\n\tnode3 -- node5\n"
    "\tnode4 -- node5\n\tnode5 -- node6\n";

PipeDreamImport import_text(const std::string& text, PipeDreamImportOptions o = {}) {
    return import_pipedream_text(text, "graph.txt", o, Meta{"test", {}});
}

std::string error_of(const std::string& text, PipeDreamImportOptions o = {}) {
    try {
        (void)import_text(text, o);
    } catch (const InputError& e) {
        return e.what();
    }
    return "no error";
}

}  // namespace

TEST_CASE("a profile with a branch becomes measured custom layers with inputs") {
    const PipeDreamImport r = import_text(residual);
    CHECK(r.nodes == 6);
    CHECK(r.dropped == 2);  // the Input source and the __getitem__ sink, as PipeDream's optimizer does
    const Model& m = r.model;
    REQUIRE(m.layers.size() == 4);
    CHECK(m.layers[0].name == "node2");
    CHECK(m.layers[1].name == "node3");
    CHECK(m.layers[2].name == "node4");
    CHECK(m.layers[3].name == "node5");
    CHECK(m.layers[2].inputs == std::vector<std::size_t>{0});     // the shortcut reads the conv
    CHECK(m.layers[3].inputs == std::vector<std::size_t>{1, 2});  // the join reads both branches
    const auto& conv = std::get<CustomOp>(m.layers[0].op);
    CHECK(conv.measured);
    CHECK(conv.fwd_ms == 5.5);
    CHECK(conv.bwd_ms == 11.25);
    CHECK(m.layers[0].cost.params == 224);  // 896 bytes of fp32
    CHECK(m.layers[0].cost.out_bytes == 2048);
    REQUIRE(m.measured);
    CHECK(m.measured->batch == 1);
    CHECK(m.global_batch == 1);
    CHECK(r.toml.find("Left out as PipeDream's optimizer does: node1 (Input, forward 9.0 ms)") != std::string::npos);
}

TEST_CASE("--batch divides the sizes per sample, rounding up what is not whole") {
    PipeDreamImportOptions o;
    o.batch = 8;
    const std::string text =
        node("node1", "Conv", 1, 1, 2048, 0) + node("node2", "Size(0)", 0, 0, 4, 0) + "\tnode1 -- node2\n";
    const PipeDreamImport r = import_text(text, o);
    CHECK(r.model.layers[0].cost.out_bytes == 256);
    CHECK(r.model.layers[1].cost.out_bytes == 1);
    CHECK(r.model.global_batch == 8);
    CHECK(r.toml.find("out_bytes = 1  # 4 bytes per minibatch of 8, rounded up") != std::string::npos);
}

TEST_CASE("the shipped PipeDream profiles load with their published sizes") {
    const Model vgg = load_model((plans / "pipedream/vgg16.toml").string());
    CHECK(vgg.layers.size() == 40);
    CHECK(vgg.total().params == 138'357'544ull);  // VGG-16 (Simonyan and Zisserman 2015; torchvision)
    const Model resnet = load_model((plans / "pipedream/resnet50.toml").string());
    CHECK(resnet.layers.size() == 176);
    CHECK(resnet.total().params == 25'557'032ull);  // ResNet-50 (torchvision)
    for (const Model* m : {&vgg, &resnet})
        for (const Layer& l : m->layers) CHECK(std::get<CustomOp>(l.op).measured);
}

TEST_CASE("the analytical cost model scales measured times by samples and device speed") {
    const std::string text =
        node("node1", "Conv", 4.0, 8.0, 2048, 0) + node("node2", "ReLU", 1.0, 1.0, 2048, 0) + "\tnode1 -- node2\n";
    PipeDreamImportOptions o;
    o.batch = 8;
    o.tflops = 100;
    const Model m = import_text(text, o).model;
    const Cluster c = parse_cluster(R"([cluster]
name = "two"
[network]
intra_node_gbs = 100.0
intra_node_latency_us = 1.0
[[device]]
name = "fast"
node = "n0"
tflops = 200.0
mem_gib = 80.0
mem_bw_gbs = 3000.0
[[device]]
name = "reference"
node = "n0"
tflops = 100.0
mem_gib = 80.0
mem_bw_gbs = 3000.0
)",
                                    "c.toml");
    const AnalyticalCostModel cost(m, c);
    CHECK(cost.layer_seconds(0, Pass::forward, 1, 8, 1) == doctest::Approx(4.0e-3));   // as measured
    CHECK(cost.layer_seconds(0, Pass::backward, 1, 4, 1) == doctest::Approx(4.0e-3));  // half the samples
    CHECK(cost.layer_seconds(0, Pass::forward, 0, 8, 1) == doctest::Approx(2.0e-3));   // twice the speed
    o.tflops = 0;  // reference speed unknown: the times are used as measured everywhere
    const Model unscaled = import_text(text, o).model;
    const AnalyticalCostModel same(unscaled, c);
    CHECK(same.layer_seconds(0, Pass::forward, 0, 8, 1) == doctest::Approx(4.0e-3));
}

TEST_CASE("measured layers need a [measured] table, and both times") {
    const std::string head = "[model]\nname = \"m\"\ndtype = \"fp32\"\nglobal_batch = 8\n";
    const std::string layer = "[[layer]]\nname = \"a\"\nop = \"custom\"\nparams = 0\nout_bytes = 4\n";
    auto error = [](const std::string& text) {
        try {
            (void)parse_model(text, "m.toml");
        } catch (const InputError& e) {
            return std::string(e.what());
        }
        return std::string("no error");
    };
    CHECK(error(head + layer + "fwd_ms = 1.0\nbwd_ms = 2.0\n") ==
          "m.toml:5:1: layer \"a\" gives measured times (fwd_ms, bwd_ms): say in a [measured] table the batch they "
          "were measured at");
    CHECK(error(head + "[measured]\nbatch = 8\n" + layer + "fwd_ms = 1.0\n") ==
          "m.toml:7:1: layer \"a\": missing required key \"bwd_ms\" (a measured layer gives both fwd_ms and bwd_ms)");
    CHECK(error(head + "[measured]\nbatch = 8\n" + layer + "fwd_ms = -1.0\nbwd_ms = 2.0\n")
              .find("\"fwd_ms\" must not be negative") != std::string::npos);
    CHECK(error(head + "[measured]\nbatch = 8\n" + layer + "fwd_ms = 1.0\nbwd_ms = 2.0\n") == "no error");
}

TEST_CASE("malformed profiles are located") {
    CHECK(error_of("") == "graph.txt: no node lines: not a PipeDream graph.txt");
    CHECK(error_of("node1 -- Conv\n").rfind("graph.txt:1:1: a node line is", 0) == 0);
    CHECK(error_of("node1 -- Conv -- forward_compute_time=1.0, backward_compute_time=x, activation_size=4.0, "
                   "parameter_size=0.0\n") == "graph.txt:1:44: backward_compute_time: \"x\" is not a number");
    CHECK(error_of("node1 -- Conv -- forward_compute_time=-1.0, backward_compute_time=1.0, activation_size=4.0, "
                   "parameter_size=0.0\n") == "graph.txt:1:18: forward_compute_time must not be negative, got -1.0");
    CHECK(error_of("node1 -- Conv -- forward_compute_time=1.0, backward_compute_time=1.0, activation_size=4.0\n") ==
          "graph.txt:1:18: node node1: expected 4 comma-separated measurements, got 3");
    CHECK(error_of(node("node1", "Conv", 1, 1, 4, 0) + "\tnode1 -- node9\n") ==
          "graph.txt:2:11: edge names node node9, which no node line defines");
    CHECK(error_of(node("node1", "Conv", 1, 1, 4, 0) + node("node1", "Conv", 1, 1, 4, 0)) ==
          "graph.txt:2:1: node node1 is defined twice (first at line 1)");
    CHECK(error_of(node("node1", "Conv", 1, 1, 4, 6) + node("node2", "ReLU", 1, 1, 4, 0) + "\tnode1 -- node2\n") ==
          "graph.txt:1:1: node node1: parameter_size 6.0 is not a whole number of 4-byte parameters (give --dtype)");
    CHECK(error_of(node("node0", "Conv", 1, 1, 4, 0) + node("node1", "A", 1, 1, 4, 0) + node("node2", "B", 1, 1, 4, 0) +
                   "\tnode0 -- node1\n\tnode1 -- node2\n\tnode2 -- node1\n") ==
          "graph.txt:2:1: node node1 is on a cycle: a profile is a DAG");
    CHECK(error_of(node("node1", "Conv", 1, 1, 4, 0) + node("node2", "Conv", 1, 1, 4, 0) +
                   node("node3", "Add", 1, 1, 4, 0) + "\tnode1 -- node3\n\tnode2 -- node3\n")
              .find("2 nodes read only the input (node1, ...)") != std::string::npos);
    CHECK(error_of("\tnode1 -- node2\n" + node("node1", "Conv", 1, 1, 4, 0)) ==
          "graph.txt:1:2: edge names node node1, which no node line defines");
}
