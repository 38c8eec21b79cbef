// PipeDream's planner: on PipeDream's own published profiles dpart reproduces its optimizer's
// printed "time per stage" for every row of ../shared/data/pipedream/README.md, with stages that
// are contiguous, non-empty layer ranges, deterministically.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "dpart/io/model_toml.hpp"
#include "dpart/plan/pipedream.hpp"

using namespace dpart;
namespace fs = std::filesystem;

namespace {

const fs::path plans = fs::path(DPART_SOURCE_DIR) / "plans" / "pipedream";

PipeDreamResult solve(const Model& m, std::size_t workers, bool straight = false,
                      std::optional<double> memory = std::nullopt) {
    PipeDreamOptions o;
    o.workers = workers;
    o.bandwidth = 1e9;  // PipeDream's default -b
    o.straight_pipeline = straight;
    o.memory_bytes = memory;
    return solve_pipedream(m, o);
}

/// Stages cover the model once, in order, each a non-empty range; replicas use every worker.
void check_plan(const Model& m, const PipeDreamResult& r, std::size_t workers) {
    REQUIRE(!r.stages.empty());
    std::size_t next = 0, used = 0;
    double worst = 0;
    for (const PipeDreamStage& st : r.stages) {
        CHECK(st.first_layer == next);
        CHECK(st.last_layer >= st.first_layer);
        CHECK(st.replicas >= 1);
        next = st.last_layer + 1;
        used += st.replicas;
        worst = std::max({worst, st.time_s, st.input_transfer_s, st.output_transfer_s});
    }
    CHECK(next == m.layers.size());
    CHECK(used == workers);
    CHECK(worst == r.plan_bottleneck_s);
}

}  // namespace

TEST_CASE("PipeDream's published optimizer output, every row, to 1e-9") {
    const Model vgg = load_model((plans / "vgg16.toml").string());
    const Model resnet = load_model((plans / "resnet50.toml").string());
    struct Row {
        const Model* model;
        std::size_t workers;
        bool straight;
        double time_per_stage_s;  // ../shared/data/pipedream/README.md
        std::vector<std::size_t> replicas;
    };
    const Row rows[] = {
        {&vgg, 4, false, 0.205520896, {3, 1}},        {&vgg, 8, false, 0.103833170, {7, 1}},
        {&vgg, 16, false, 0.056529767, {13, 2, 1}},   {&vgg, 32, false, 0.0284456, {26, 5, 1}},
        {&vgg, 4, true, 0.411041792, {1, 1, 1, 1}},   {&resnet, 4, false, 0.162880924, {2, 2}},
        {&resnet, 16, false, 0.047801345, {7, 6, 3}},
    };
    for (const Row& row : rows) {
        CAPTURE(row.model->name);
        CAPTURE(row.workers);
        CAPTURE(row.straight);
        const PipeDreamResult r = solve(*row.model, row.workers, row.straight);
        // The README prints 9 or 10 significant digits: the figure is equal to its last digit.
        CHECK(std::abs(r.time_per_stage_s - row.time_per_stage_s) <= 1e-9 * row.time_per_stage_s + 5e-10);
        CHECK(r.plan_bottleneck_s == r.time_per_stage_s);  // an optimal plan with contiguous stages
        std::vector<std::size_t> replicas;
        for (const PipeDreamStage& st : r.stages) replicas.push_back(st.replicas);
        CHECK(replicas == row.replicas);  // PipeDream's replication factors
        check_plan(*row.model, r, row.workers);
        // Deterministic: the same plan every time.
        const PipeDreamResult again = solve(*row.model, row.workers, row.straight);
        CHECK(again.time_per_stage_s == r.time_per_stage_s);
        REQUIRE(again.stages.size() == r.stages.size());
        for (std::size_t s = 0; s < r.stages.size(); ++s) CHECK(again.stages[s].last_layer == r.stages[s].last_layer);
    }
    CHECK(solve(vgg, 4).states == 40);
    CHECK(solve(resnet, 4).states == 240);  // PipeDream's 240 states for 176 nodes
}

TEST_CASE("PipeDream's exact figures, to the digits its optimizer prints") {
    const Model vgg = load_model((plans / "vgg16.toml").string());
    // 2 x 102,760,448 activation bytes / 1e9 / 1: the cut into the last, unreplicated stage.
    CHECK(std::abs(solve(vgg, 4).time_per_stage_s - 0.205520896) < 1e-15);
    CHECK(std::abs(solve(vgg, 4, true).time_per_stage_s - 0.411041792) < 1e-15);
    const PipeDreamResult one = solve(vgg, 1);  // one worker: the whole model, PipeDream's single stage
    CHECK(one.stages.size() == 1);
    CHECK(one.time_per_stage_s == one.single_stage_s);
}

TEST_CASE("a hand-checked chain: stage times, transfers, replication") {
    // Three layers of 100, 100 and 200 ms (forward + backward), 1e8 parameter bytes on the last,
    // activations of 1e7 bytes; B = 1e9 bytes/s.
    const Model m = parse_model(R"([model]
name = "chain"
dtype = "fp32"
global_batch = 1
[measured]
batch = 1
[[layer]]
name = "a"
op = "custom"
fwd_ms = 40.0
bwd_ms = 60.0
params = 0
out_bytes = 10000000
[[layer]]
name = "b"
op = "custom"
fwd_ms = 50.0
bwd_ms = 50.0
params = 0
out_bytes = 10000000
[[layer]]
name = "c"
op = "custom"
fwd_ms = 100.0
bwd_ms = 100.0
params = 25000000
out_bytes = 10000000
)",
                                "chain.toml");
    // Two workers, straight: {a, b} and {c}: max(200 ms, 200 ms, transfer 2e7 / 1e9 = 20 ms).
    const PipeDreamResult two = solve(m, 2, true);
    CHECK(two.time_per_stage_s == doctest::Approx(0.2));
    REQUIRE(two.stages.size() == 2);
    CHECK(two.stages[0].last_layer == 1);
    CHECK(two.stages[1].input_transfer_s == doctest::Approx(0.02));
    // Three workers, replication allowed: {a, b} x 1 and {c} x 2: (200 + 4 x 1 x 1e8 / 2e9 x 1e3) / 2
    // = (200 + 200) / 2 = 200 ms; or {a, b, c} x 3: (400 + 4 x 2 x 1e8 / 3e9 x 1e3) / 3 = 222.2 ms;
    // or {a} {b} {c}: 200 ms. The DP finds 200 ms.
    CHECK(solve(m, 3).time_per_stage_s == doctest::Approx(0.2));
    // Data parallel on 3 workers, PipeDream's formula: (0.4 + 4 x 2 x 1e8 / 3e9) / 3.
    CHECK(solve(m, 3).data_parallel_s == doctest::Approx((0.4 + 8e8 / 3e9) / 3));
    // Memory: a stage keeps (activations + parameters) x ceil((N - workers so far) / r).
    CHECK_THROWS_AS((void)solve(m, 2, true, 1.0), InfeasibleError);
    CHECK(solve(m, 2, true, 1e12).time_per_stage_s == two.time_per_stage_s);
}

TEST_CASE("the pipedream cost model needs measured layers") {
    const Model m = load_model((fs::path(DPART_SOURCE_DIR) / "plans/models/seed-mlp.toml").string());
    try {
        (void)solve(m, 2);
        FAIL("no error");
    } catch (const InputError& e) {
        CHECK(std::string(e.what()).find("layer \"fc1\" has no measured times") != std::string::npos);
    }
}
