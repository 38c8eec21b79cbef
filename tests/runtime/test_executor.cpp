// The executor: a plan split into stages, replicas or tensor-parallel groups trains the same
// model as one worker does (bitwise for pipelines, within 1e-6 for all-reduced sums).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <thread>

#include "dpart/io/cluster_toml.hpp"
#include "dpart/io/model_toml.hpp"
#include "dpart/plan/estimate.hpp"
#include "dpart/runtime/executor.hpp"

using namespace dpart;
using namespace dpart::rt;

namespace {

const std::string plans_dir = std::string(DPART_SOURCE_DIR) + "/plans/";

struct StageSpec {
    std::size_t first, last;
    std::vector<std::size_t> devices;
    std::uint32_t tp = 1;
};

Plan make_plan(ScheduleKind schedule, std::uint64_t microbatches, std::uint64_t global_batch,
               const std::vector<StageSpec>& stages) {
    Plan p;
    p.schedule = schedule;
    p.microbatches = microbatches;
    p.microbatch_size = global_batch / microbatches;
    for (const StageSpec& s : stages) {
        Stage st;
        st.first_layer = s.first;
        st.last_layer = s.last;
        st.devices = s.devices;
        st.tp = s.tp;
        p.stages.push_back(st);
    }
    return p;
}

struct Fixture {
    Model model;
    Cluster cluster = load_cluster(plans_dir + "clusters/cpu-4workers.toml");
    explicit Fixture(const std::string& name) : model(load_model(plans_dir + "models/" + name + ".toml")) {}

    RunResult run(const Plan& plan, std::uint64_t iterations = 3, OptimizerKind opt = OptimizerKind::adam) const {
        const AnalyticalCostModel cost(model, cluster, {});
        const PlanEstimate est = estimate_plan(plan, model, cluster, cost, {});
        RunOptions o;
        o.iterations = iterations;
        o.seed = 7;
        o.optimizer.kind = opt;
        o.optimizer.lr = opt == OptimizerKind::sgd ? 0.1f : 1e-3f;
        o.timeout = std::chrono::milliseconds(20000);
        const Execution ex(plan, model, est, o);
        return run_in_process(ex);
    }
};

double max_relative_difference(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
    double diff = 0, scale = 0;
    REQUIRE(a.size() == b.size());
    for (std::size_t l = 0; l < a.size(); ++l) {
        REQUIRE(a[l].size() == b[l].size());
        for (std::size_t i = 0; i < a[l].size(); ++i) {
            diff = std::max(diff, std::abs(static_cast<double>(a[l][i]) - b[l][i]));
            scale = std::max(scale, std::abs(static_cast<double>(a[l][i])));
        }
    }
    return scale == 0 ? diff : diff / scale;
}

void check_losses_close(const std::vector<double>& a, const std::vector<double>& b, double rel) {
    REQUIRE(a.size() == b.size());
    for (std::size_t i = 0; i < a.size(); ++i) CHECK(std::abs(a[i] - b[i]) <= rel * std::abs(b[i]));
}

}  // namespace

TEST_CASE("executor: worker places are numbered by stage, replica, then tensor-parallel rank") {
    const Plan p = make_plan(ScheduleKind::one_f_one_b, 1, 8, {{0, 1, {3}}, {2, 3, {0, 1, 2, 5}, 2}});
    const auto places = worker_places(p);
    REQUIRE(places.size() == 5);
    CHECK(places[0].stage == 0);
    CHECK(places[0].device == 3);
    CHECK(places[3].stage == 1);
    CHECK(places[3].replica == 1);
    CHECK(places[3].tp_rank == 0);
    CHECK(places[4].tp_rank == 1);
    CHECK(places[4].device == 5);
}

TEST_CASE("executor: a stage receives every output read at or after it, skip connections included") {
    const Model model = load_model(plans_dir + "models/resnet-block.toml");
    // Find a layer whose output is read by a later, non-adjacent layer (the residual).
    std::size_t skip_from = 0, skip_to = 0;
    for (std::size_t l = 0; l < model.layers.size(); ++l)
        for (std::size_t i : model.layers[l].inputs)
            if (i + 1 < l) skip_from = i, skip_to = l;
    REQUIRE(skip_to > skip_from + 1);
    const Plan p = make_plan(ScheduleKind::one_f_one_b, 1, model.global_batch,
                             {{0, skip_from, {0}}, {skip_from + 1, model.layers.size() - 1, {1}}});
    const Cluster cluster = load_cluster(plans_dir + "clusters/cpu-4workers.toml");
    const AnalyticalCostModel cost(model, cluster, {});
    const PlanEstimate est = estimate_plan(p, model, cluster, cost, {});
    try {
        const Execution ex(p, model, est, {});
        CHECK(ex.live_in(1) == std::vector<std::size_t>{skip_from});
    } catch (const InputError& e) {
        // The CPU backend may not run convolutions; the boundary logic is what this tests.
        CHECK(std::string(e.what()).find("no CPU kernel") != std::string::npos);
    }
}

TEST_CASE("executor: replicas split each microbatch as the estimate does") {
    const Fixture f("seed-mlp");
    const Plan p = make_plan(ScheduleKind::one_f_one_b, 2, 64, {{0, 1, {0, 1, 2}}, {2, 3, {3}}});
    const AnalyticalCostModel cost(f.model, f.cluster, {});
    const PlanEstimate est = estimate_plan(p, f.model, f.cluster, cost, {});
    const Execution ex(p, f.model, est, {});
    CHECK(ex.shares(0) == std::vector<std::uint64_t>{11, 11, 10});
    CHECK(ex.offsets(0) == std::vector<std::uint64_t>{0, 11, 22});
    CHECK(ex.live_in(1) == std::vector<std::size_t>{1});
}

TEST_CASE("executor: pipeline splits of the seed MLP train bitwise like one stage") {
    const Fixture f("seed-mlp");
    for (ScheduleKind sched : {ScheduleKind::one_f_one_b, ScheduleKind::gpipe}) {
        CAPTURE(to_string(sched));
        const RunResult one = f.run(make_plan(sched, 4, 64, {{0, 3, {0}}}), 4);
        REQUIRE(one.loss.size() == 4);
        CHECK(one.loss[0] > 2.0);  // about ln(10) at the start
        CHECK(one.loss.back() < one.loss.front());
        const RunResult two = f.run(make_plan(sched, 4, 64, {{0, 1, {0}}, {2, 3, {1}}}), 4);
        const RunResult four = f.run(make_plan(sched, 4, 64, {{0, 0, {0}}, {1, 1, {1}}, {2, 2, {2}}, {3, 3, {3}}}), 4);
        CHECK(two.loss == one.loss);
        CHECK(four.loss == one.loss);
        CHECK(two.weights_digest == one.weights_digest);
        CHECK(four.weights_digest == one.weights_digest);
    }
}

TEST_CASE("executor: pipeline splits of small transformers train bitwise like one stage") {
    for (const char* name : {"tiny-gpt", "tiny-llama", "tiny-mixtral"}) {
        CAPTURE(name);
        const Fixture f(name);
        const std::size_t L = f.model.layers.size();
        const RunResult one = f.run(make_plan(ScheduleKind::one_f_one_b, 4, 8, {{0, L - 1, {0}}}));
        const RunResult three = f.run(
            make_plan(ScheduleKind::one_f_one_b, 4, 8, {{0, 1, {0}}, {2, 4, {1}}, {5, L - 1, {2}}}));
        CHECK(one.loss.back() < one.loss.front());
        CHECK(three.loss == one.loss);
        CHECK(three.weights_digest == one.weights_digest);
    }
}

TEST_CASE("executor: data-parallel replicas agree with one worker within 1e-6") {
    const Fixture f("seed-mlp");
    const RunResult one = f.run(make_plan(ScheduleKind::one_f_one_b, 2, 64, {{0, 3, {0}}}), 3, OptimizerKind::sgd);
    const RunResult dp = f.run(make_plan(ScheduleKind::one_f_one_b, 2, 64, {{0, 1, {0, 1, 2}}, {2, 3, {3}}}), 3,
                               OptimizerKind::sgd);
    check_losses_close(dp.loss, one.loss, 1e-6);
    CHECK(max_relative_difference(dp.weights, one.weights) < 1e-6);
}

TEST_CASE("executor: tensor-parallel stages agree with tp = 1 within 1e-6") {
    for (const char* name : {"tiny-gpt", "tiny-llama", "tiny-mixtral"}) {
        CAPTURE(name);
        const Fixture f(name);
        const std::size_t L = f.model.layers.size();
        const RunResult one = f.run(make_plan(ScheduleKind::one_f_one_b, 2, 8, {{0, L - 1, {0}}}), 3, OptimizerKind::sgd);
        const RunResult tp = f.run(make_plan(ScheduleKind::one_f_one_b, 2, 8, {{0, 2, {0, 1}, 2}, {3, L - 1, {2, 3}, 2}}),
                                   3, OptimizerKind::sgd);
        check_losses_close(tp.loss, one.loss, 1e-6);
        CHECK(max_relative_difference(tp.weights, one.weights) < 1e-6);
    }
}

TEST_CASE("executor: the tied head and its embedding stay equal across stages") {
    const Fixture f("tiny-gpt");
    const std::size_t L = f.model.layers.size();
    // Embedding on stage 0, tied head on stage 1: their gradients are exchanged each step.
    const RunResult split = f.run(make_plan(ScheduleKind::gpipe, 2, 8, {{0, 2, {0}}, {3, L - 1, {1}}}));
    const RunResult one = f.run(make_plan(ScheduleKind::gpipe, 2, 8, {{0, L - 1, {0}}}));
    CHECK(split.loss == one.loss);
    CHECK(split.weights_digest == one.weights_digest);
}

TEST_CASE("executor: every worker's tasks are timed in schedule order") {
    const Fixture f("seed-mlp");
    const RunResult r = f.run(make_plan(ScheduleKind::one_f_one_b, 4, 64, {{0, 1, {0}}, {2, 3, {1}}}), 2);
    REQUIRE(r.workers.size() == 2);
    for (const WorkerReport& w : r.workers) {
        std::size_t forwards = 0, backwards = 0;
        for (const TaskRecord& t : w.tasks) {
            CHECK(t.end_s >= t.start_s);
            forwards += t.kind == TaskKind::forward;
            backwards += t.kind == TaskKind::backward;
        }
        CHECK(forwards == 8);
        CHECK(backwards == 8);
        REQUIRE(w.busy_s.size() == 2);
    }
    for (double s : r.iteration_s) CHECK(s > 0);
}

TEST_CASE("transport: messages match by source and tag, whatever their order") {
    InProcessNetwork net(2, std::chrono::milliseconds(5000));
    Bytes a{std::byte{1}}, b{std::byte{2}};
    net.endpoint(0).send(1, {Tag::Kind::gradient, 0, 3, 0}, b);
    net.endpoint(0).send(1, {Tag::Kind::activation, 0, 3, 0}, a);
    CHECK(net.endpoint(1).recv(0, {Tag::Kind::activation, 0, 3, 0}) == a);
    CHECK(net.endpoint(1).recv(0, {Tag::Kind::gradient, 0, 3, 0}) == b);
}

TEST_CASE("transport: a wait for a silent peer ends with a message naming it") {
    InProcessNetwork net(2, std::chrono::milliseconds(50));
    try {
        (void)net.endpoint(1).recv(0, {Tag::Kind::activation, 4, 2, 0});
        FAIL("no timeout");
    } catch (const RuntimeError& e) {
        const std::string m = e.what();
        CHECK(m.find("from worker 0") != std::string::npos);
        CHECK(m.find("iteration 4") != std::string::npos);
    }
    net.endpoint(0).abort("worker 0 failed");
    CHECK_THROWS_AS((void)net.endpoint(1).recv(0, {}), PeerStopped);
}

TEST_CASE("transport: a group sum in chunks is bitwise the sum in group order, for any size") {
    // Each member sums one chunk (reduce-scatter, then all-gather): the bits must be those of
    // x_{g0} + x_{g1} + ... taken in group order, whatever the chunk boundaries.
    const std::vector<std::size_t> group{3, 1, 0, 2};
    for (std::size_t size : {std::size_t{0}, std::size_t{1}, std::size_t{3}, std::size_t{1001}}) {
        InProcessNetwork net(4, std::chrono::milliseconds(5000));
        std::vector<std::vector<float>> data(4, std::vector<float>(size));
        for (std::size_t r = 0; r < 4; ++r)
            for (std::size_t i = 0; i < size; ++i)
                data[r][i] = random_symmetric(7, r, i) * (i % 3 == 0 ? 1e8f : 1.0f);
        std::vector<float> expected(size);
        for (std::size_t i = 0; i < size; ++i) {
            float s = data[group[0]][i];
            for (std::size_t k = 1; k < group.size(); ++k) s += data[group[k]][i];
            expected[i] = s;
        }
        {
            std::vector<std::jthread> t;
            for (std::size_t r = 0; r < 4; ++r)
                t.emplace_back([&, r] {
                    group_allreduce_sum(net.endpoint(r), group, {Tag::Kind::allreduce, 0, 0, 5}, data[r]);
                });
        }
        for (std::size_t r = 0; r < 4; ++r) CHECK(data[r] == expected);
    }
}

TEST_CASE("transport: group sums are the same bits on every member, in group order") {
    InProcessNetwork net(3, std::chrono::milliseconds(5000));
    const std::vector<std::size_t> group{2, 0, 1};
    std::vector<std::vector<float>> data{{1e8f, 1.0f}, {-1e8f, 2.0f}, {1.0f, 3.0f}};
    std::vector<std::vector<float>> all(3, std::vector<float>(6));
    {
        std::vector<std::jthread> t;
        for (std::size_t r = 0; r < 3; ++r)
            t.emplace_back([&, r] {
                std::vector<float> mine = data[r];
                group_allgather(net.endpoint(r), group, {Tag::Kind::allgather, 0, 0, 0}, mine, all[r]);
                group_allreduce_sum(net.endpoint(r), group, {Tag::Kind::allreduce, 0, 0, 0}, data[r]);
            });
    }
    // Group order 2, 0, 1: (1 + 1e8) - 1e8 = 0 in fp32 (the 1 is lost), which a different order
    // would not give.
    for (std::size_t r = 0; r < 3; ++r) {
        CHECK(data[r][0] == 0.0f);
        CHECK(data[r][1] == 6.0f);
        CHECK(all[r] == std::vector<float>{1.0f, 3.0f, 1e8f, 1.0f, -1e8f, 2.0f});
    }
}

TEST_CASE("transport: a reduce-scatter then an all-gather of the parts is the group sum, part by part") {
    const std::vector<std::size_t> group{2, 0, 1};
    for (std::size_t size : {std::size_t{2}, std::size_t{3}, std::size_t{100}, std::size_t{1001}}) {
        CAPTURE(size);
        // The parts tile the values in member order.
        std::size_t next = 0;
        for (std::size_t k = 0; k < group.size(); ++k) {
            const auto [first, count] = group_part(size, k, group.size());
            CHECK(first == next);
            next = first + count;
        }
        CHECK(next == size);
        InProcessNetwork net(3, std::chrono::milliseconds(5000));
        std::vector<std::vector<float>> data(3, std::vector<float>(size)), whole;
        for (std::size_t r = 0; r < 3; ++r)
            for (std::size_t i = 0; i < size; ++i) data[r][i] = random_symmetric(3, r, i) * (i % 4 == 0 ? 1e7f : 1.0f);
        whole = data;
        std::vector<std::vector<float>> scattered = data;
        {
            std::vector<std::jthread> t;
            for (std::size_t r = 0; r < 3; ++r)
                t.emplace_back([&, r] {
                    group_allreduce_sum(net.endpoint(r), group, {Tag::Kind::allreduce, 0, 0, 1}, whole[r]);
                    group_reduce_scatter_sum(net.endpoint(r), group, {Tag::Kind::allreduce, 0, 0, 2}, scattered[r]);
                });
        }
        for (std::size_t k = 0; k < group.size(); ++k) {
            const std::size_t r = group[k];
            const auto [first, count] = group_part(size, k, group.size());
            for (std::size_t i = 0; i < size; ++i) {
                // Its own part summed (the same bits as the all-reduce), the rest untouched.
                const bool mine = i >= first && i < first + count;
                if (mine) CHECK(scattered[r][i] == whole[r][i]);
                else CHECK(scattered[r][i] == data[r][i]);
            }
        }
        {
            std::vector<std::jthread> t;
            for (std::size_t r = 0; r < 3; ++r)
                t.emplace_back([&, r] {
                    group_allgather_parts(net.endpoint(r), group, {Tag::Kind::allgather, 0, 0, 3}, scattered[r]);
                });
        }
        for (std::size_t r = 0; r < 3; ++r) CHECK(scattered[r] == whole[r]);
    }
}

TEST_CASE("ZeRO-1: optimizer parts cut a stage's values between replicas, and layers into their pieces") {
    CHECK(optimizer_part(10, 0, 3) == ValueRange{0, 4});
    CHECK(optimizer_part(10, 1, 3) == ValueRange{4, 4});
    CHECK(optimizer_part(10, 2, 3) == ValueRange{8, 2});
    CHECK(optimizer_part(5, 3, 4) == ValueRange{5, 0});  // ceil(5 / 4) = 2: the last part is empty
    // A layer of values [4, 8) and the part [6, 10): its values 2 and 3.
    CHECK(layer_part({6, 4}, 4, 4) == ValueRange{2, 2});
    CHECK(layer_part({6, 4}, 0, 4) == ValueRange{});   // before the part
    CHECK(layer_part({6, 4}, 10, 5) == ValueRange{});  // after it
    CHECK(layer_part({0, 100}, 10, 5) == ValueRange{0, 5});
}

namespace {

RunResult run_sharded(const Fixture& f, const Plan& plan, bool shard, OptimizerKind opt, std::uint64_t* state_bytes = nullptr) {
    const AnalyticalCostModel cost(f.model, f.cluster, {});
    const PlanEstimate est = estimate_plan(plan, f.model, f.cluster, cost, {});
    RunOptions o;
    o.iterations = 3;
    o.seed = 7;
    o.dataset_batches = 2;
    o.optimizer.kind = opt;
    o.optimizer.lr = opt == OptimizerKind::sgd ? 0.1f : 1e-3f;
    o.timeout = std::chrono::milliseconds(20000);
    o.shard_optimizer = shard;
    const Execution ex(plan, f.model, est, o);
    if (state_bytes != nullptr) *state_bytes = ex.state_bytes();
    return run_in_process(ex);
}

}  // namespace

TEST_CASE("ZeRO-1: sharded optimizer state trains bitwise like whole replicas, each holding its part of the moments") {
    struct Case {
        std::string model;
        std::vector<StageSpec> stages;
    };
    const std::size_t gpt_layers = load_model(plans_dir + "models/tiny-gpt.toml").layers.size();
    const std::vector<Case> cases{
        // Three replicas of uneven parts, then one stage of two.
        {"seed-mlp", {{0, 1, {0, 1, 2}}, {2, 3, {3}}}},
        {"seed-mlp", {{0, 3, {0, 1}}}},
        // The embedding and its tied head on two stages of two replicas: whole all-reduces there.
        {"tiny-gpt", {{0, 3, {0, 1}}, {4, gpt_layers - 1, {2, 3}}}},
        // Replicas of a tensor-parallel stage: each tp rank's group shards its own values.
        {"tiny-gpt", {{0, gpt_layers - 1, {0, 1, 2, 3}, 2}}},
    };
    for (const Case& c : cases) {
        const Fixture f(c.model);
        const Plan plan = make_plan(ScheduleKind::one_f_one_b, 2, f.model.global_batch, c.stages);
        for (const OptimizerKind opt : {OptimizerKind::adam, OptimizerKind::sgd}) {
            CAPTURE(c.model);
            CAPTURE(c.stages.size());
            CAPTURE(to_string(opt));
            std::uint64_t whole_bytes = 0, sharded_bytes = 0;
            const RunResult whole = run_sharded(f, plan, false, opt, &whole_bytes);
            const RunResult sharded = run_sharded(f, plan, true, opt, &sharded_bytes);
            CHECK(sharded.loss == whole.loss);
            CHECK(sharded.weights_digest == whole.weights_digest);
            CHECK(sharded_bytes < whole_bytes);
            // Each replica keeps the moments of its part only: together, one copy of the stage's.
            const Execution ex(plan, f.model, estimate_plan(plan, f.model, f.cluster, AnalyticalCostModel(f.model, f.cluster, {}), {}), {});
            for (std::size_t s = 0; s < plan.stages.size(); ++s)
                for (std::size_t t = 0; t < plan.stages[s].tp; ++t) {
                    std::size_t params = 0, moments = 0;
                    for (std::size_t w = 0; w < ex.workers(); ++w) {
                        if (ex.places()[w].stage != s || ex.places()[w].tp_rank != t) continue;
                        std::size_t p = 0;
                        for (const ShardState& st : sharded.workers[w].state) {
                            p += st.params.size();
                            moments += st.m.size();
                            CHECK(st.m.size() == st.v.size());
                        }
                        params = p;
                    }
                    CHECK(moments == params);
                }
        }
    }
}
