// dpart profile: probe selection, waivers and failures, CSV rows, and the cluster file the CPU
// probes write (read back by the cluster loader).
#include <doctest/doctest.h>

#include <stdexcept>

#include "dpart/core/error.hpp"
#include "dpart/io/cluster_toml.hpp"
#include "dpart/profile/probe.hpp"

using namespace dpart;
using namespace dpart::profile;

namespace {
std::vector<Probe> fakes() {
    return {{"cpu.a", "ok", [] {
                 ProbeResult r;
                 r.figures = {{"x", 2.5, "GB/s"}};
                 return r;
             }},
            {"cpu.b", "waived", []() -> ProbeResult { throw Waived{"not here"}; }},
            {"gpu.c", "fails", []() -> ProbeResult { throw std::runtime_error("device lost"); }}};
}
}  // namespace

TEST_CASE("profile: probes are selected by key and by prefix, and unknown ones are bad input") {
    const auto all = fakes();
    CHECK(select_probes(all, {}, {}).size() == 3);
    CHECK(select_probes(all, {"gpu.c"}, {}).size() == 1);
    const auto cpu = select_probes(all, {}, {"cpu."});
    REQUIRE(cpu.size() == 2);
    CHECK(cpu[1].key == "cpu.b");
    try {
        (void)select_probes(all, {"cpu.aa"}, {});
        FAIL("accepted an unknown key");
    } catch (const InputError& e) {
        CHECK(std::string(e.what()).find("did you mean \"cpu.a\"") != std::string::npos);
    }
    CHECK_THROWS_AS((void)select_probes(all, {}, {"tpu."}), InputError);
}

TEST_CASE("profile: one probe failing or waived never stops the others") {
    std::vector<ProbeResult> results;
    for (const Probe& p : fakes()) results.push_back(run_probe(p));
    CHECK(results[0].status == ProbeResult::Status::ok);
    CHECK(results[0].key == "cpu.a");
    CHECK(results[1].status == ProbeResult::Status::waived);
    CHECK(results[1].reason == "not here");
    CHECK(results[2].status == ProbeResult::Status::failed);
    CHECK(results[2].reason == "device lost");
    CsvTable csv(result_columns());
    for (const ProbeResult& r : results) add_result_rows(csv, r);
    CHECK(csv.rows() == 3);
}

TEST_CASE("profile: the CPU probes measure positive figures and make a cluster the planner reads") {
    ProbeSettings tiny;
    tiny.repeats = 1;
    tiny.scale = 0.02;
    std::vector<ProbeResult> results;
    for (const Probe& p : cpu_probes(tiny)) results.push_back(run_probe(p));
    for (const ProbeResult& r : results) {
        CAPTURE(r.key);
        CHECK(r.status == ProbeResult::Status::ok);
        for (const Figure& f : r.figures) CHECK(f.value > 0);
    }
    const std::string text = cpu_cluster_toml(results, "measured", "host1", Meta{});
    const Cluster c = parse_cluster(text, "measured.toml");
    CHECK(c.name == "measured");
    CHECK(c.devices.size() == static_cast<std::size_t>(results[0].find("cores")->value));
    CHECK(c.devices[0].name == "cpu0");
    CHECK(c.devices[0].tflops == doctest::Approx(results[1].find("gflops_per_core_all_busy")->value / 1e3).epsilon(1e-3));
    // Without the probes it needs, no cluster file is made up.
    CHECK_THROWS_AS((void)cpu_cluster_toml({results[0]}, "x", "h", Meta{}), RuntimeError);
}

TEST_CASE("profile: a median ignores one slow repeat") {
    int calls = 0;
    const double t = median_seconds(3, [&] {
        if (++calls == 3) {
            volatile double x = 0;
            for (int i = 0; i < 3'000'000; ++i) x = x + 1;
        }
    });
    CHECK(calls == 4);  // one warm-up, three timed
    CHECK(t < 1e-3);
}
