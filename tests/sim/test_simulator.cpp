#include <doctest/doctest.h>

#include "dpart/io/cluster_toml.hpp"
#include "dpart/io/model_toml.hpp"
#include "dpart/plan/solver.hpp"
#include "dpart/sim/simulator.hpp"

using namespace dpart;

namespace {

const std::string plans_dir = std::string(DPART_SOURCE_DIR) + "/plans/";

struct Fixture {
    Model model = load_model(plans_dir + "models/llama3-8b.toml");
    Cluster cluster = load_cluster(plans_dir + "clusters/h100-4x8.toml");
    AnalyticalCostModel cost{model, cluster, {}};
    SolveResult solved = solve(model, cluster, cost, {}, {});
};

std::string error_of(const std::string& text, const Cluster& c) {
    try {
        (void)parse_scenario(text, "s.toml", c);
    } catch (const InputError& e) {
        return e.what();
    }
    return "no error";
}

}  // namespace

TEST_CASE("scenario events are read, located and ordered by iteration") {
    const Cluster c = load_cluster(plans_dir + "clusters/dgx-h100.toml");
    const Scenario s = parse_scenario(R"([[event]]
iteration = 30
kind = "recover"
device = "dgx0.gpu1"
[[event]]
iteration = 20
kind = "slowdown"
device = "dgx0.gpu1"
factor = 3.0
[[event]]
iteration = 25
kind = "link"
a = "dgx0.gpu0"
b = "dgx0.gpu1"
factor = 4
)",
                                      "s.toml", c);
    REQUIRE(s.events.size() == 3);
    CHECK(s.events[0].iteration == 20);
    CHECK(s.events[0].kind == EventKind::slowdown);
    CHECK(s.events[0].device == 1);
    CHECK(s.events[1].kind == EventKind::link);
    const Conditions at25 = conditions_at(s, c.devices.size(), 25);
    CHECK(at25.slowdown[1] == 3.0);
    CHECK(at25.link(1, 0) == 4.0);
    CHECK(conditions_at(s, c.devices.size(), 30).slowdown[1] == 1.0);
    CHECK(conditions_at(s, c.devices.size(), 19).slowdown[1] == 1.0);

    CHECK(error_of("[[event]]\niteration = 1\nkind = \"slowdown\"\ndevice = \"gpu1\"\nfactor = 2\n", c) ==
          "s.toml:4:10: [[event]] #1: device \"gpu1\" is not in cluster \"dgx-h100\"");
    CHECK(error_of("[[event]]\niteration = 1\nkind = \"slowdwn\"\ndevice = \"dgx0.gpu1\"\n", c)
              .find("s.toml:3:8: [[event]] #1: unknown kind \"slowdwn\" (did you mean \"slowdown\"?)") == 0);
    CHECK(error_of("[[event]]\niteration = 1\nkind = \"slowdown\"\ndevice = \"dgx0.gpu1\"\nfactor = 0\n", c) ==
          "s.toml:5:10: [[event]] #1: \"factor\" must be positive, got 0");
    CHECK(error_of("[[event]]\nkind = \"fail\"\ndevice = \"dgx0.gpu1\"\n", c) ==
          "s.toml:1:1: [[event]] #1: missing required key \"iteration\"");
    CHECK(parse_scenario("", "s.toml", c).events.empty());
}

TEST_CASE("without a scenario every simulated iteration is the plan's predicted iteration time") {
    const Fixture f;
    const ReplayResult r = replay_static(f.solved.plan, f.solved.estimate, f.cluster, {}, 20);
    REQUIRE(r.iterations.size() == 20);
    CHECK_FALSE(r.stopped);
    for (const auto& it : r.iterations) CHECK(it.iteration_s == f.solved.estimate.iteration_s);
}

TEST_CASE("a slowed device slows its stage's iterations until it recovers; a failure stops the static policy") {
    const Fixture f;
    const std::size_t victim = f.solved.plan.stages.front().devices.front();
    const std::string name = f.cluster.devices[victim].name;
    const Scenario s = parse_scenario(
        "[[event]]\niteration = 5\nkind = \"slowdown\"\ndevice = \"" + name + "\"\nfactor = 3\n"
        "[[event]]\niteration = 10\nkind = \"recover\"\ndevice = \"" + name + "\"\n"
        "[[event]]\niteration = 15\nkind = \"fail\"\ndevice = \"" + name + "\"\n",
        "s.toml", f.cluster);
    const ReplayResult r = replay_static(f.solved.plan, f.solved.estimate, f.cluster, s, 20);
    REQUIRE(r.iterations.size() == 15);
    const double nominal = f.solved.estimate.iteration_s;
    CHECK(r.iterations[4].iteration_s == nominal);
    CHECK(r.iterations[5].event == "slowdown " + name + " x3");
    // Stage 0's forward and backward take 3x as long: its device alone is busy M x 3 x (f + b).
    const StageEstimate& s0 = f.solved.estimate.stages.front();
    const double busy = 3 * static_cast<double>(f.solved.plan.microbatches) * (s0.forward_s + s0.backward_s);
    CHECK(r.iterations[5].iteration_s > nominal);
    CHECK(r.iterations[5].iteration_s >= busy);
    CHECK(r.iterations[9].iteration_s == r.iterations[5].iteration_s);
    CHECK(r.iterations[10].iteration_s == nominal);
    CHECK(r.stopped);
    CHECK(r.stop_reason.find("failed at iteration 15") != std::string::npos);
}

TEST_CASE("every bundled scenario loads against the cluster it was written for") {
    const Cluster c = load_cluster(plans_dir + "clusters/h100-4x8.toml");
    const Scenario s = load_scenario(plans_dir + "scenarios/slow-gpu.toml", c);
    CHECK(s.events.size() == 2);
}

TEST_CASE("jitter is deterministic for a seed, the same for every policy, and absent at sigma 0") {
    const Fixture f;
    const Jitter j{0.05, 7};
    const ReplayResult a = replay_static(f.solved.plan, f.solved.estimate, f.cluster, {}, 30, false, {}, j);
    const ReplayResult b = replay_static(f.solved.plan, f.solved.estimate, f.cluster, {}, 30, false, {}, j);
    const ReplayResult c = replay_static(f.solved.plan, f.solved.estimate, f.cluster, {}, 30, false, {}, Jitter{0.05, 8});
    const ReplayResult none = replay_static(f.solved.plan, f.solved.estimate, f.cluster, {}, 30, false, {}, Jitter{0, 7});
    bool differs = false, varies = false;
    for (std::size_t i = 0; i < 30; ++i) {
        CHECK(a.iterations[i].iteration_s == b.iterations[i].iteration_s);
        differs = differs || a.iterations[i].iteration_s != c.iterations[i].iteration_s;
        varies = varies || a.iterations[i].iteration_s != a.iterations[0].iteration_s;
        CHECK(none.iterations[i].iteration_s == f.solved.estimate.iteration_s);
        // 5% noise per device moves an iteration by well under a factor of 1.5.
        CHECK(a.iterations[i].iteration_s / f.solved.estimate.iteration_s == doctest::Approx(1.0).epsilon(0.5));
    }
    CHECK(differs);
    CHECK(varies);
    const Conditions base(4);
    const Conditions x = jittered(base, j, 3), y = jittered(base, j, 3), z = jittered(base, j, 4);
    CHECK(x.slowdown == y.slowdown);
    CHECK(x.slowdown != z.slowdown);
}

TEST_CASE("a device faster than planned (a factor under 1) shortens its stage; jitter goes both ways") {
    const Fixture f;
    Conditions c(f.cluster.devices.size());
    for (std::size_t d : f.solved.plan.stages.front().devices) c.slowdown[d] = 0.5;
    const std::vector<StageDurations> fast = durations_under(f.solved.plan, f.solved.estimate, c);
    const StageEstimate& s0 = f.solved.estimate.stages.front();
    CHECK(fast.front().forward == doctest::Approx(0.5 * s0.forward_s).epsilon(1e-12));
    CHECK(fast.front().backward == doctest::Approx(0.5 * s0.backward_s).epsilon(1e-12));
    CHECK(fast.front().optimizer == doctest::Approx(0.5 * s0.optimizer_s).epsilon(1e-12));
    // On one device, exp(sigma N) is under 1 about half the time: about half the iterations beat
    // the nominal one (the slowest of many devices would rarely be faster).
    Plan one = f.solved.plan;
    one.stages.resize(1);
    one.stages[0].last_layer = f.model.layers.size() - 1;
    one.stages[0].devices = {0};
    one.stages[0].tp = 1;
    const PlanEstimate nominal = estimate_plan(one, f.model, f.cluster, f.cost, {});
    const ReplayResult r = replay_static(one, nominal, f.cluster, {}, 40, false, {}, Jitter{0.2, 3});
    std::size_t faster = 0;
    for (const auto& it : r.iterations) faster += it.iteration_s < nominal.iteration_s ? 1 : 0;
    CHECK(faster >= 10);
    CHECK(faster <= 30);
}
