// The adaptive runtime: the controller's speed estimate, the start-of-iteration vote, and a live
// job that slows down, repartitions, loses a device and ends with the weights of a static run.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <thread>

#include "dpart/io/cluster_toml.hpp"
#include "dpart/io/model_toml.hpp"
#include "dpart/plan/estimate.hpp"
#include "dpart/runtime/adaptive.hpp"
#include "dpart/runtime/device_comm.hpp"
#include "dpart/runtime/device_stage.hpp"
#include "dpart/runtime/executor.hpp"
#include "dpart/sim/policy.hpp"

using namespace dpart;
using namespace dpart::rt;

namespace {

const std::string plans_dir = std::string(DPART_SOURCE_DIR) + "/plans/";

Plan pipeline(std::uint64_t microbatches, std::uint64_t global_batch, const std::vector<std::pair<std::size_t, std::size_t>>& ranges) {
    Plan p;
    p.microbatches = microbatches;
    p.microbatch_size = global_batch / microbatches;
    for (std::size_t s = 0; s < ranges.size(); ++s) {
        Stage st;
        st.first_layer = ranges[s].first;
        st.last_layer = ranges[s].second;
        st.devices = {s};
        p.stages.push_back(st);
    }
    return p;
}

/// An adaptive job of `plan` deciding every 3 iterations, moving for any gain, its re-plans
/// pipeline-only (so that its weights stay bitwise those of a static run).
AdaptiveJob pipeline_only_job(const Model& model, const Cluster& cluster, const CostModel& cost, const Plan& plan,
                              const RunOptions& o) {
    AdaptiveJob job{model, cluster, cost, {}, plan, o, {}};
    job.adaptive.window = 3;
    job.adaptive.copy_every = 3;
    job.adaptive.policy.policy = Policy::adaptive;
    job.adaptive.policy.min_gain = 0;
    job.adaptive.policy.solver.max_replicas = 1;
    job.adaptive.policy.solver.max_tp = 1;
    return job;
}

/// tiny-gpt as 4 pipeline stages on 4 CPU workers: its static run, and adaptive jobs of it.
struct TinyPipeline {
    Model model = load_model(plans_dir + "models/tiny-gpt.toml");
    Cluster cluster = load_cluster(plans_dir + "clusters/cpu-4workers.toml");
    AnalyticalCostModel cost{model, cluster, {}};
    Plan plan = pipeline(4, model.global_batch, {{0, 1}, {2, 3}, {4, 5}, {6, 7}});

    static RunOptions options(std::uint64_t iterations, std::uint64_t seed) {
        RunOptions o;
        o.iterations = iterations;
        o.seed = seed;
        o.dataset_batches = 2;
        o.timeout = std::chrono::milliseconds(60000);
        return o;
    }
    [[nodiscard]] RunResult static_run(const RunOptions& o) const {
        return run_in_process(Execution(plan, model, estimate_plan(plan, model, cluster, cost, {}), o));
    }
    [[nodiscard]] AdaptiveJob job(const RunOptions& o) const { return pipeline_only_job(model, cluster, cost, plan, o); }
};

ScenarioEvent event(std::uint64_t it, EventKind kind, std::size_t device, double factor = 1) {
    ScenarioEvent e;
    e.iteration = it;
    e.kind = kind;
    e.device = device;
    e.factor = factor;
    return e;
}

}  // namespace

TEST_CASE("controller: slowdowns are measured against the healthy devices' ratio") {
    // Every device runs 20% slower than predicted (the cost model's error); device 2 three times more.
    const std::vector<DeviceMeasurement> m{{0, 1.2, 1.0}, {1, 2.4, 2.0}, {2, 3.6, 1.0}, {3, 1.26, 1.0}};
    const std::vector<double> s = measured_slowdowns(m, std::vector<double>(5, 1.0));
    REQUIRE(s.size() == 5);
    CHECK(s[0] == doctest::Approx(1.0).epsilon(0.03));
    CHECK(s[1] == doctest::Approx(1.0).epsilon(0.03));
    CHECK(s[2] == doctest::Approx(3.0).epsilon(0.03));
    CHECK(s[3] == doctest::Approx(1.05).epsilon(0.03));
    CHECK(s[4] == 1.0);  // not measured: its previous value
    // Nothing measured: nothing changes.
    CHECK(measured_slowdowns({}, {1.0, 2.5}) == std::vector<double>{1.0, 2.5});
    // An idle device's probe (not a reference) is judged against the workers' pace, and does not
    // set it: a probe far under their ratio does not make the workers look slow.
    const std::vector<DeviceMeasurement> probes{{0, 1.2, 1.0}, {1, 2.4, 2.0}, {2, 0.3, 1.0, false}, {3, 3.6, 1.0, false}};
    const std::vector<double> p = measured_slowdowns(probes, std::vector<double>(4, 5.0));
    CHECK(p[0] == doctest::Approx(1.0));
    CHECK(p[1] == doctest::Approx(1.0));
    CHECK(p[2] == doctest::Approx(1.0));
    CHECK(p[3] == doctest::Approx(3.0));
    // Probes alone give no pace to judge them by: nothing changes.
    CHECK(measured_slowdowns({{2, 0.3, 1.0, false}}, {1.0, 1.0, 4.0}) == std::vector<double>{1.0, 1.0, 4.0});
}

TEST_CASE("transport: the start-of-iteration vote tells every member who leaves") {
    InProcessNetwork net(3, std::chrono::milliseconds(5000));
    std::vector<std::vector<std::uint8_t>> got(3);
    {
        std::vector<std::jthread> threads;
        for (std::size_t r = 0; r < 3; ++r)
            threads.emplace_back([&, r] {
                const std::vector<std::size_t> group{0, 1, 2};
                got[r] = group_vote(net.endpoint(r), group, {Tag::Kind::barrier, 4, 0, 0}, r == 1 ? 1 : 0);
            });
    }
    for (const auto& v : got) CHECK(v == std::vector<std::uint8_t>{0, 1, 0});
}

TEST_CASE("adaptive: a slowdown, repartitions and a failure lose nothing (bitwise the static run's weights)") {
    const TinyPipeline t;
    const RunOptions o = TinyPipeline::options(14, 3);
    const RunResult reference = t.static_run(o);

    RunOptions ao = o;
    ao.scenario.events = {event(2, EventKind::slowdown, 1, 4.0), event(9, EventKind::fail, 2)};
    const AdaptiveJob job = t.job(ao);
    const AdaptiveResult r = run_adaptive_in_process(job);
    REQUIRE(r.writer);
    CHECK(r.failures == 1);
    CHECK(r.rerun_iterations == 9 - 9 / 3 * 3);  // rolled back to the copy at iteration 9 - (9 mod 3)
    CHECK(r.repartitions >= 1);
    CHECK(r.plans.size() == r.repartitions + 1);
    // The last plan runs without the failed device.
    for (const Stage& st : r.plans.back().stages) CHECK(std::find(st.devices.begin(), st.devices.end(), 2u) == st.devices.end());
    CHECK(r.loss == reference.loss);
    CHECK(r.weights_digest == reference.weights_digest);
    // Every iteration ran, in order within each segment, and the rows carry the decisions.
    std::vector<bool> seen(o.iterations, false);
    for (const AdaptiveIteration& it : r.iterations) seen.at(it.iteration) = true;
    CHECK(std::all_of(seen.begin(), seen.end(), [](bool b) { return b; }));
    CHECK(r.migrated_bytes > 0);
    CHECK(r.copy_bytes > 0);
}

TEST_CASE("adaptive: a failed replica is restored from its data-parallel twin") {
    const Model model = load_model(plans_dir + "models/seed-mlp.toml");
    const Cluster cluster = load_cluster(plans_dir + "clusters/cpu-4workers.toml");
    const AnalyticalCostModel cost(model, cluster, {});
    Plan plan = pipeline(2, model.global_batch, {{0, 1}, {2, 3}});
    plan.stages[1].devices = {1, 2};  // two replicas of the second stage
    RunOptions o;
    o.iterations = 8;
    o.seed = 5;
    o.timeout = std::chrono::milliseconds(30000);
    o.scenario.events = {event(5, EventKind::fail, 1)};
    AdaptiveJob job{model, cluster, cost, {}, plan, o, {}};
    job.adaptive.window = 4;
    job.adaptive.copy_every = 2;
    job.adaptive.policy.policy = Policy::adaptive;
    const AdaptiveResult r = run_adaptive_in_process(job);
    REQUIRE(r.writer);
    CHECK(r.failures == 1);
    CHECK(r.rerun_iterations == 1);
    CHECK(r.iterations.back().iteration == 7);
    CHECK(std::isfinite(r.loss.back()));
}

TEST_CASE("adaptive: when every device fails the job stops with a message") {
    const Model model = load_model(plans_dir + "models/seed-mlp.toml");
    const Cluster cluster = load_cluster(plans_dir + "clusters/cpu-4workers.toml");
    const AnalyticalCostModel cost(model, cluster, {});
    const Plan plan = pipeline(2, model.global_batch, {{0, 1}, {2, 3}});
    RunOptions o;
    o.iterations = 6;
    o.timeout = std::chrono::milliseconds(30000);
    // Two agents: each one's copy is on the other, and both fail together.
    o.scenario.events = {event(3, EventKind::fail, 0), event(3, EventKind::fail, 1)};
    AdaptiveJob job{model, cluster, cost, {}, plan, o, {}};
    job.adaptive.policy.policy = Policy::adaptive;
    CHECK_THROWS_WITH_AS((void)run_adaptive_in_process(job), doctest::Contains("every device of the job has failed"),
                         RuntimeError);
}

TEST_CASE("adaptive: device communicators survive a failure by shrinking the world, losing nothing") {
    // Four whole "GPUs" (the host DeviceOps, each its own memory) joined by the host stand-in for
    // NCCL: device 2 fails; the survivors shrink the world they bootstrapped instead of making a
    // new one, and the run ends with the weights of the static run on the device backend.
    const Model model = load_model(plans_dir + "models/tiny-gpt.toml");
    const Cluster cluster = load_cluster(plans_dir + "clusters/cpu-4workers.toml");
    const AnalyticalCostModel cost(model, cluster, {});
    const Plan plan = pipeline(4, model.global_batch, {{0, 1}, {2, 3}, {4, 5}, {6, 7}});
    RunOptions o;
    o.iterations = 8;
    o.seed = 3;
    o.timeout = std::chrono::milliseconds(30000);
    o.backend = make_device_stage_factory([](const WorkerPlace&) { return make_host_ops(); }, Elem::f32);
    const RunResult reference = run_in_process(Execution(plan, model, estimate_plan(plan, model, cluster, cost, {}), o));

    RunOptions ao = o;
    ao.memory_domain = [](const WorkerPlace& p) { return std::optional<std::uint64_t>(p.device); };
    auto fabric = std::make_shared<DeviceFabric>([](Transport& t) { return make_host_comm_library(t); });
    ao.device_fabric = fabric;
    ao.scenario.events = {event(5, EventKind::fail, 2)};
    AdaptiveJob job{model, cluster, cost, {}, plan, ao, {}};
    job.adaptive.window = 100;  // no re-plan but the failure's
    job.adaptive.copy_every = 2;
    job.adaptive.policy.policy = Policy::adaptive;
    job.adaptive.policy.solver.max_replicas = 1;
    job.adaptive.policy.solver.max_tp = 1;
    const AdaptiveResult r = run_adaptive_in_process(job);
    REQUIRE(r.writer);
    CHECK(r.failures == 1);
    CHECK(r.loss == reference.loss);
    CHECK(r.weights_digest == reference.weights_digest);
    // The first plan's 4 ranks bootstrapped once; the next plan's workers, all survivors, shrank it.
    std::size_t workers = 0;
    for (const Stage& st : r.plans.back().stages) workers += st.devices.size();
    const DeviceFabric::Counts c = fabric->counts();
    CHECK(c.bootstraps == 4);
    CHECK(c.shrinks == workers);
}

TEST_CASE("adaptive: ZeRO-1 replicas lose nothing either: a failure, a rollback and re-plans, the unsharded run's weights") {
    const Model model = load_model(plans_dir + "models/seed-mlp.toml");
    const Cluster cluster = load_cluster(plans_dir + "clusters/cpu-4workers.toml");
    const AnalyticalCostModel cost(model, cluster, {});
    Plan plan = pipeline(2, model.global_batch, {{0, 1}, {2, 3}});
    plan.stages[0].devices = {0, 3};
    plan.stages[1].devices = {1, 2};
    RunOptions o;
    o.iterations = 9;
    o.seed = 5;
    o.timeout = std::chrono::milliseconds(30000);
    o.scenario.events = {event(5, EventKind::fail, 1)};
    const auto run = [&](bool shard) {
        RunOptions ro = o;
        ro.shard_optimizer = shard;
        CostOptions copt;
        copt.shard_optimizer = shard;
        AdaptiveJob job{model, cluster, cost, copt, plan, ro, {}};
        job.adaptive.window = 4;
        job.adaptive.copy_every = 2;
        job.adaptive.policy.policy = Policy::adaptive;
        job.adaptive.policy.min_gain = 0;
        // Re-plans without replicas: the same plans whether the optimizer is sharded (its
        // predicted step is shorter), so that the runs compare bit for bit.
        job.adaptive.policy.solver.max_replicas = 1;
        return run_adaptive_in_process(job);
    };
    const AdaptiveResult whole = run(false), sharded = run(true);
    REQUIRE(sharded.writer);
    CHECK(sharded.failures == 1);
    CHECK(sharded.rerun_iterations == whole.rerun_iterations);
    CHECK_FALSE(sharded.plans.front().shard_optimizer);
    for (std::size_t k = 1; k < sharded.plans.size(); ++k) CHECK(sharded.plans[k].shard_optimizer);  // solved with it
    // The controller re-plans from measured times, so the two runs may take different plans
    // (and sum replicas' gradients in other groupings): the same training within 1e-6. Moments
    // lost or zeroed on the way would move Adam's steps by far more.
    REQUIRE(sharded.loss.size() == whole.loss.size());
    for (std::size_t i = 0; i < whole.loss.size(); ++i) CHECK(sharded.loss[i] == doctest::Approx(whole.loss[i]).epsilon(1e-5));
    REQUIRE(sharded.weights.size() == whole.weights.size());
    double diff = 0, scale = 0;
    for (std::size_t l = 0; l < whole.weights.size(); ++l) {
        REQUIRE(sharded.weights[l].size() == whole.weights[l].size());
        for (std::size_t i = 0; i < whole.weights[l].size(); ++i) {
            diff = std::max(diff, std::abs(static_cast<double>(sharded.weights[l][i]) - whole.weights[l][i]));
            scale = std::max(scale, std::abs(static_cast<double>(whole.weights[l][i])));
        }
    }
    CHECK(diff <= 1e-6 * scale);
}

TEST_CASE("adaptive: a device left out for being slow measures itself while idle, and is taken back once fast again") {
    const TinyPipeline t;
    const RunOptions o = TinyPipeline::options(24, 5);
    const RunResult reference = t.static_run(o);

    RunOptions ao = o;
    ao.scenario.events = {event(2, EventKind::slowdown, 1, 20.0), event(9, EventKind::recover, 1)};
    const AdaptiveJob job = t.job(ao);
    const AdaptiveResult r = run_adaptive_in_process(job);
    REQUIRE(r.writer);
    const auto uses = [](const Plan& p, std::size_t dev) {
        return std::any_of(p.stages.begin(), p.stages.end(), [&](const Stage& st) {
            return std::find(st.devices.begin(), st.devices.end(), dev) != st.devices.end();
        });
    };
    // The slowed device was left out, and asked to measure itself while out.
    const auto out = std::find_if(r.plans.begin(), r.plans.end(), [&](const Plan& p) { return !uses(p, 1); });
    REQUIRE(out != r.plans.end());
    const auto probed = std::find_if(r.decisions.begin(), r.decisions.end(), [](const Decision& d) {
        return std::find(d.probe.begin(), d.probe.end(), 1u) != d.probe.end();
    });
    REQUIRE(probed != r.decisions.end());
    // Its own measurement, after the recovery, brought the belief back to healthy...
    const auto back = std::find_if(probed, r.decisions.end(), [](const Decision& d) {
        return std::any_of(d.detected.begin(), d.detected.end(),
                           [](const auto& x) { return x.first == 1u && x.second <= slow_device_factor; });
    });
    REQUIRE(back != r.decisions.end());
    CHECK(back->iteration >= 9);
    // ... and the job took it back (a later plan uses it; noise on shared cores may move things
    // again after that), and nothing was lost on the way.
    CHECK(std::any_of(out, r.plans.end(), [&](const Plan& p) { return uses(p, 1); }));
    CHECK(r.failures == 0);
    CHECK(r.loss == reference.loss);
    CHECK(r.weights_digest == reference.weights_digest);
}

TEST_CASE("controller: link factors are measured against the healthy links' ratio") {
    // Every send takes twice its predicted time (the cost model's error); the link 1-2 ten times more.
    const std::vector<LinkMeasurement> m{{0, 1, 2.0, 1.0}, {2, 1, 20.0, 1.0}, {2, 3, 4.0, 2.0}, {2, 3, 4.4, 2.0}};
    const std::map<LinkKey, double> f = measured_link_factors(m, {{{5, 6}, 3.0}});
    REQUIRE(f.size() == 3);  // only the links measured
    // The healthy links' ratios: 2 (0-1) and 2.1 (2-3, the mean of its two); their median 2.05.
    CHECK(f.at({0, 1}) == doctest::Approx(1.0));   // max(1, 2 / 2.05)
    CHECK(f.at({1, 2}) == doctest::Approx(20.0 / 2.05));
    CHECK(f.at({2, 3}) == doctest::Approx(2.1 / 2.05));
    // One link alone is its own reference.
    CHECK(measured_link_factors({{1, 2, 20.0, 1.0}}, {}).at({1, 2}) == doctest::Approx(1.0));
}

TEST_CASE("adaptive on emulated devices: a slowed link is measured from the sends over it, and the job re-plans around it") {
    const Model model = load_model(plans_dir + "models/emu-mlp.toml");
    const Cluster cluster = load_cluster(plans_dir + "clusters/cpu-4emulated.toml");
    const AnalyticalCostModel cost(model, cluster, {});
    SolverOptions so;
    so.max_replicas = 1;
    so.max_tp = 1;
    const Plan plan = solve(model, cluster, cost, {}, so).plan;
    REQUIRE(plan.stages.size() == 4);
    RunOptions o;
    o.iterations = 9;
    o.seed = 2;
    o.emulate = true;
    o.timeout = std::chrono::milliseconds(60000);
    const RunResult reference = run_in_process(Execution(plan, model, estimate_plan(plan, model, cluster, cost, {}), o));

    RunOptions ao = o;
    ScenarioEvent slow;
    slow.iteration = 1;
    slow.kind = EventKind::link;
    slow.a = 1;
    slow.b = 2;
    slow.factor = 1000;
    ao.scenario.events = {slow};
    AdaptiveJob job{model, cluster, cost, {}, plan, ao, {}};
    job.adaptive.window = 3;
    job.adaptive.copy_every = 3;
    job.adaptive.policy.policy = Policy::adaptive;
    job.adaptive.policy.solver = so;
    const AdaptiveResult r = run_adaptive_in_process(job);
    REQUIRE(r.writer);
    REQUIRE(r.decisions.size() >= 1);
    CHECK(r.decisions.front().text.find("measured link dev1-dev2 x") != std::string::npos);
    REQUIRE(r.repartitions >= 1);
    // The new plan no longer sends from dev1 to dev2, and nothing was lost on the way.
    const Plan& last = r.plans.back();
    for (std::size_t s = 0; s + 1 < last.stages.size(); ++s) {
        const std::size_t a = last.stages[s].devices.back(), b = last.stages[s + 1].devices.front();
        CHECK_FALSE((std::min(a, b) == 1 && std::max(a, b) == 2));
    }
    CHECK(r.loss == reference.loss);
    CHECK(r.weights_digest == reference.weights_digest);
}
