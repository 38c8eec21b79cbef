// Hardening: what the fuzzers found (tests/fuzz/), and the limits of docs/LIMITS.md that are
// cheap enough for a unit test (the large generated inputs are in tests/cli/limits.sh).
#include <doctest/doctest.h>

#include <cmath>
#include <string>

#include "dpart/io/cluster_toml.hpp"
#include "dpart/io/csv.hpp"
#include "dpart/io/model_toml.hpp"
#include "dpart/io/trace.hpp"
#include "dpart/report/compare.hpp"
#include "dpart/sim/scenario.hpp"

using namespace dpart;

namespace {

template <class F>
std::string error_of(F&& parse) {
    try {
        parse();
    } catch (const InputError& e) {
        return e.what();
    }
    return "no error";
}

const std::string model_header = "[model]\nname = \"m\"\ndtype = \"fp32\"\nglobal_batch = 8\n";
const std::string cluster_text = R"([cluster]
name = "c"
[network]
intra_node_gbs = 10.0
intra_node_latency_us = 1.0
[[device]]
name = "d0"
node = "n"
tflops = 1.0
mem_gib = 1.0
mem_bw_gbs = 10.0
[[device]]
name = "d1"
node = "n"
tflops = 1.0
mem_gib = 1.0
mem_bw_gbs = 10.0
)";

}  // namespace

TEST_CASE("fuzz finding: a non-ASCII letter where toml++ looks for whitespace is a syntax error") {
    // toml++ 3.3.0 reached __builtin_unreachable() for U+00A1..U+0499 after a value (UBSan
    // aborted here in the cluster, plan and scenario fuzzers); include/dpart/io/toml.hpp.
    for (const std::string letter : {"\xc4\xa8", "\xc3\xa9", "\xc2\xa1", "\xd2\x98"}) {
        CAPTURE(letter);
        const std::string e = error_of([&] { (void)parse_cluster("[cluster]\nname = \"x\"\nfoo = 3" + letter + "\n", "c.toml"); });
        CHECK(e.find("c.toml:3:8: TOML syntax error") == 0);
    }
    // U+00A0 (the one code point of that range the table gets right) is still a located error.
    CHECK(error_of([] { (void)parse_cluster("[cluster]\nname = \"x\"\xc2\xa0\n", "c.toml"); }) ==
          "c.toml:2:11: TOML syntax error: Error while parsing key-value pair: expected space or tab, saw '\\u00A0'");
}

TEST_CASE("fuzz finding: a table header that starts with a non-ASCII letter is a syntax error") {
    // toml++ 3.3.0 asserted (Debug) or assumed (clang release: undefined behaviour) that a key
    // starts after '['; the plan fuzzer found it, the Debug sanitizer suite aborted on it.
    for (const std::string header : {"[\xcf\xa7]\n", "[ \xc3\xa9]\n", "[[\xc3\xa9]]\n"}) {
        CAPTURE(header);
        const std::string e = error_of([&] { (void)parse_cluster(header, "c.toml"); });
        CHECK(e.find("TOML syntax error: Error while parsing key: expected bare key starting character or string "
                     "delimiter") != std::string::npos);
    }
}

TEST_CASE("limits: figures outside the range dpart accepts are located errors") {
    auto with = [](const std::string& from, const std::string& to) {
        std::string t = cluster_text;
        t.replace(t.find(from), from.size(), to);
        return t;
    };
    CHECK(error_of([&] { (void)parse_cluster(with("tflops = 1.0", "tflops = 1e-300"), "c.toml"); }) ==
          "c.toml:9:10: device \"d0\": \"tflops\" = 1e-300 is below 1e-06 TFLOP/s, the least dpart accepts");
    CHECK(error_of([&] { (void)parse_cluster(with("mem_bw_gbs = 10.0", "mem_bw_gbs = 1e300"), "c.toml"); }) ==
          "c.toml:11:14: device \"d0\": \"mem_bw_gbs\" = 1e+300 is above 1000000000 GB/s, the most dpart accepts");
    CHECK(error_of([&] { (void)parse_cluster(with("intra_node_gbs = 10.0", "intra_node_gbs = 1e-9"), "c.toml"); }) ==
          "c.toml:4:18: [network]: \"intra_node_gbs\" = 1e-09 is below 1e-06 GB/s, the least dpart accepts");
    CHECK(error_of([&] { (void)parse_cluster(with("intra_node_latency_us = 1.0", "intra_node_latency_us = 1e10"), "c.toml"); }) ==
          "c.toml:5:25: [network]: \"intra_node_latency_us\" = 10000000000 is above 1000000000 us, the most dpart accepts");
    // At the bounds, accepted.
    CHECK(parse_cluster(with("tflops = 1.0", "tflops = 1e9"), "c.toml").devices.size() == 2);
    CHECK(parse_cluster(with("tflops = 1.0", "tflops = 1e-6"), "c.toml").devices.size() == 2);

    const Cluster c = parse_cluster(cluster_text, "c.toml");
    const std::string slow = "[[event]]\niteration = 1\nkind = \"slowdown\"\ndevice = \"d0\"\nfactor = 1e308\n";
    CHECK(error_of([&] { (void)parse_scenario(slow, "s.toml", c); }) ==
          "s.toml:5:10: [[event]] #1: \"factor\" = 1e+308 is above 1000000, the most dpart accepts");
    const std::string link = "[[event]]\niteration = 1\nkind = \"link\"\na = \"d0\"\nb = \"d1\"\nfactor = 1e-7\n";
    CHECK(error_of([&] { (void)parse_scenario(link, "s.toml", c); }) ==
          "s.toml:6:10: [[event]] #1: \"factor\" = 1e-07 is below 1e-06, the least dpart accepts");
    const std::string nan = "[[event]]\niteration = 1\nkind = \"slowdown\"\ndevice = \"d0\"\nfactor = nan\n";
    CHECK(error_of([&] { (void)parse_scenario(nan, "s.toml", c); }) ==
          "s.toml:5:10: [[event]] #1: \"factor\" must be a finite number, got NaN");
}

TEST_CASE("limits: a model that computes nothing, too many layers, and ffn_hidden's default overflowing") {
    const std::string zero = model_header + R"([[layer]]
name = "a"
op = "custom"
fwd_flops = 0
bwd_flops = 0
params = 0
out_bytes = 4
)";
    CHECK(error_of([&] { (void)parse_model(zero, "m.toml"); }) ==
          "m.toml:1:1: the model computes nothing: no layer has FLOPs, memory traffic, weights or a measured time, so "
          "every plan of it would take 0 ms");
    const std::string deep = model_header + "[transformer]\nlayers = 1048573\nhidden = 8\nheads = 2\nvocab = 16\nseq_len = 4\n";
    CHECK(error_of([&] { (void)parse_model(deep, "m.toml"); }) ==
          "m.toml:6:10: [transformer]: 1048573 blocks (+ embed, final_norm, head, loss) are more than the 1048576 "
          "layers dpart accepts");
    const std::string wide =
        model_header + "[transformer]\nlayers = 1\nhidden = 4611686018427387904\nheads = 1\nvocab = 1\nseq_len = 1\n";
    CHECK(error_of([&] { (void)parse_model(wide, "m.toml"); }) ==
          "m.toml:7:10: [transformer]: hidden 4611686018427387904 makes the default ffn_hidden (4 x hidden) overflow 64 "
          "bits");
    const std::string slow = model_header + R"([measured]
batch = 1
[[layer]]
name = "a"
op = "custom"
params = 1
out_bytes = 4
fwd_ms = 1e300
bwd_ms = 1
)";
    CHECK(error_of([&] { (void)parse_model(slow, "m.toml"); }) ==
          "m.toml:12:10: layer \"a\": \"fwd_ms\" = 1e+300 is above 1000000000 ms, the most dpart accepts");
}

TEST_CASE("compare: a run's iterations.csv summarised, with every impossible value located") {
    const auto& cols = iteration_columns();
    const std::string header = "iteration,plan_version,iteration_ms,samples_per_s,event\n";
    const RunComparison r =
        summarise_iterations(parse_csv(header + "0,1,10,100,\n1,1,30,33.3,slow\n2,2,10,100,\n", "r.csv", cols));
    CHECK(r.summary.iterations == 3);
    CHECK(r.summary.mean_iteration_ms == doctest::Approx(50.0 / 3));
    CHECK(r.repartitions == 1);
    CHECK(r.excess_ms == doctest::Approx(20));
    CHECK(r.summary.samples_per_s == doctest::Approx(1 / (50.0 / 3 / 1e3)));  // global batch 100 x 10 ms = 1
    auto error = [&](const std::string& rows) {
        return error_of([&] { (void)summarise_iterations(parse_csv(header + rows, "r.csv", cols)); });
    };
    CHECK(error("") == "r.csv: no iterations: the file has only its header");
    CHECK(error("0,1,0,100,\n") == "r.csv:2: column \"iteration_ms\": 0 is not a positive time");
    CHECK(error("0,1,10,-1,\n") == "r.csv:2: column \"samples_per_s\": -1 is negative");
    CHECK(error("0,1,inf,1,\n") == "r.csv:2: column \"iteration_ms\": \"inf\" is not a finite number");
    CHECK(error("0,1,1e308,1e308,\n") ==
          "r.csv:2: samples_per_s 1e308 x iteration_ms 1e308 gives a global batch beyond 64 bits");
    // Finite times whose sum overflows: no infinite mean.
    CHECK(error("0,1,1e308,0,\n1,1,1e308,0,\n") ==
          "r.csv: the iteration times are too large to average (their sum overflows)");
}
