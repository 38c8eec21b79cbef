// Measured layer times: interpolation, the CSV they travel in, the cost model that uses them,
// and their measurement with the CPU kernels and with the device layers (on the host DeviceOps).
#include <doctest/doctest.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

#include "dpart/cost/layer_times.hpp"
#include "dpart/io/cluster_toml.hpp"
#include "dpart/io/model_toml.hpp"
#include "dpart/profile/layers.hpp"
#include "dpart/runtime/device.hpp"

using namespace dpart;

namespace {
const std::string plans_dir = std::string(DPART_SOURCE_DIR) + "/plans/";

/// A file of this process's own (several test processes may run at once).
std::string write_temp(const std::string& name, const std::string& text) {
    const auto path = std::filesystem::temp_directory_path() / (std::to_string(::getpid()) + "-" + name);
    std::ofstream(path) << text;
    return path.string();
}
}  // namespace

TEST_CASE("layer times: piecewise linear between sizes, extended linearly, proportional with one point") {
    LayerTimes t;
    t.layers[0] = {{2, 1.0, 2.0}, {4, 1.5, 3.0}, {8, 3.5, 7.0}};
    t.layers[1] = {{4, 2.0, 4.0}};
    CHECK(*t.seconds(0, Pass::forward, 2) == doctest::Approx(1.0));
    CHECK(*t.seconds(0, Pass::forward, 3) == doctest::Approx(1.25));
    CHECK(*t.seconds(0, Pass::backward, 6) == doctest::Approx(5.0));
    CHECK(*t.seconds(0, Pass::forward, 16) == doctest::Approx(7.5));  // beyond: the last segment's slope
    CHECK(*t.seconds(0, Pass::forward, 1) == doctest::Approx(0.75));  // below: the first segment's
    CHECK(*t.seconds(1, Pass::forward, 2) == doctest::Approx(1.0));
    CHECK_FALSE(t.seconds(2, Pass::forward, 2).has_value());
}

TEST_CASE("layer times: written and read back; bad rows named by file and line") {
    const Model model = load_model(plans_dir + "models/seed-mlp.toml");
    LayerTimes t;
    t.model = model.name;
    t.kind = "test cpu";
    t.layers[0] = {{16, 0.001, 0.002}, {64, 0.003, 0.006}};
    const std::string good = write_temp("dpart_layer_times_ok.csv", layer_times_table(t, model).str());
    const LayerTimes back = load_layer_times(good, model);
    CHECK(back.kind == "test cpu");
    REQUIRE(back.layers.at(0).size() == 2);
    CHECK(back.layers.at(0)[1].samples == 64);
    CHECK(back.layers.at(0)[1].backward_s == doctest::Approx(0.006));

    const std::string header = "model,kind,layer,samples,fwd_ms,bwd_ms\n";
    const auto fails = [&](const std::string& rows, const std::string& text) {
        const std::string path = write_temp("dpart_layer_times_bad.csv", header + rows);
        CHECK_THROWS_WITH_AS((void)load_layer_times(path, model), doctest::Contains(text.c_str()), InputError);
    };
    fails("other,cpu,fc1,4,1,2\n", "not \"seed-mlp\"");
    fails("seed-mlp,cpu,nope,4,1,2\n", "has no layer \"nope\"");
    fails("seed-mlp,cpu,fc1,0,1,2\n", "not a positive whole number");
    fails("seed-mlp,cpu,fc1,4,-1,2\n", "between 0 and 1e9 ms");
    fails("seed-mlp,cpu,fc1,4,1,2\nseed-mlp,gpu,fc1,8,1,2\n", ":3");
    fails("seed-mlp,cpu,fc1,4,1,2\nseed-mlp,cpu,fc1,4,1,2\n", "given twice");
}

TEST_CASE("measured cost model: measured times on devices of their kind, the roofline elsewhere") {
    const Model model = load_model(plans_dir + "models/seed-mlp.toml");
    Cluster cluster = load_cluster(plans_dir + "clusters/cpu-4workers.toml");
    cluster.devices[3].kind = "other";
    const AnalyticalCostModel base(model, cluster, {});
    LayerTimes t;
    t.model = model.name;
    t.kind = cluster.devices[0].kind;
    t.layers[0] = {{8, 0.008, 0.016}};
    const MeasuredCostModel m(base, model, cluster, t);
    CHECK(m.measured_devices() == 3);
    CHECK(m.layer_seconds(0, Pass::forward, 0, 4, 1) == doctest::Approx(0.004));
    CHECK(m.layer_seconds(0, Pass::backward, 1, 8, 1) == doctest::Approx(0.016));
    CHECK(m.layer_seconds(0, Pass::forward, 3, 4, 1) == doctest::Approx(base.layer_seconds(0, Pass::forward, 3, 4, 1)));
    CHECK(m.layer_seconds(1, Pass::forward, 0, 4, 1) == doctest::Approx(base.layer_seconds(1, Pass::forward, 0, 4, 1)));
    CHECK(m.device_class(0) == m.device_class(1));
    CHECK(m.device_class(0) != m.device_class(3));
}

TEST_CASE("layer timing: the planner's microbatch sizes, and every layer timed with the CPU kernels") {
    CHECK(profile::layer_timing_sizes(8) == std::vector<std::uint64_t>{1, 2, 4, 8});
    const auto many = profile::layer_timing_sizes(512, 4);
    REQUIRE(many.size() == 4);
    CHECK(many.front() == 1);
    CHECK(many.back() == 512);
    const Model model = load_model(plans_dir + "models/seed-mlp.toml");
    const LayerTimes t = profile::time_layers(model, {2, 8}, 1, "test cpu");
    CHECK(t.kind == "test cpu");
    REQUIRE(t.layers.size() == model.layers.size());
    for (const auto& [layer, points] : t.layers) {
        REQUIRE(points.size() == 2);
        CHECK(points[0].samples == 2);
        CHECK(points[1].forward_s >= 0);
        CHECK(points[1].backward_s >= 0);
    }
    CHECK(t.layers.at(0)[1].forward_s > 0);  // the first linear layer takes some time
}

TEST_CASE("layer timing with the device layers: a chain, a DAG whose gradients meet, a mixture of experts") {
    // The host DeviceOps stands in for a GPU: the same passes, each timed from an idle stream.
    const auto ops = rt::make_host_ops();
    for (const char* name : {"tiny-gpt", "resnet-block", "tiny-mixtral"}) {
        CAPTURE(name);
        const Model model = load_model(plans_dir + "models/" + name + ".toml");
        for (const rt::Elem e : {rt::Elem::f32, rt::Elem::bf16}) {
            const LayerTimes t = profile::time_device_layers(model, {1, 2}, 2, "test gpu", *ops, e);
            CHECK(t.kind == "test gpu");
            CHECK(t.model == model.name);
            REQUIRE(t.layers.size() == model.layers.size());
            double fwd = 0, bwd = 0;
            for (const auto& [layer, points] : t.layers) {
                REQUIRE(points.size() == 2);
                CHECK(points[1].samples == 2);
                CHECK(points[1].forward_s > 0);  // every layer computes something
                CHECK(points[1].backward_s >= 0);
                fwd += points[1].forward_s;
                bwd += points[1].backward_s;
            }
            CHECK(bwd > 0);
            // Written as the CSV plan reads, then used for devices of that kind.
            const std::string csv = write_temp(std::string(name) + "-device-times.csv", "");
            layer_times_table(t, model).write(csv);
            const LayerTimes back = load_layer_times(csv, model);
            CHECK(back.kind == "test gpu");
            CHECK(back.layers.size() == t.layers.size());
            std::filesystem::remove(csv);
        }
    }
}
