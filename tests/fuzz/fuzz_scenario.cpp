// scenario.toml: parse_scenario on arbitrary text for a bundled cluster (h100-4x8), then the
// conditions the events make at a few iterations, and a short static replay of a fixed plan
// (gpt2-small on node0) under them: extreme factors must give a clear answer, never a crash.
#include <cmath>

#include "dpart/cost/cost_model.hpp"
#include "dpart/io/plan_toml.hpp"
#include "dpart/plan/estimate.hpp"
#include "dpart/sim/policy.hpp"
#include "dpart/sim/scenario.hpp"
#include "fuzz_common.hpp"

namespace {

/// Two pipeline stages on node0 and node1 (4 data-parallel replicas each): the events of a
/// fuzzed scenario hit devices inside and outside the plan and a link between the stages.
const dpart::Plan& fixture_plan() {
    using namespace dpart;
    static const Plan plan = [] {
        const Cluster& c = fuzz::fixture_cluster();
        Plan p;
        p.microbatch_size = 8;
        p.microbatches = fuzz::fixture_model().global_batch / 8;
        Stage a, b;
        a.first_layer = 0;
        a.last_layer = 7;
        b.first_layer = 8;
        b.last_layer = fuzz::fixture_model().layers.size() - 1;
        for (std::size_t d = 0; d < c.devices.size(); ++d) {
            if (c.devices[d].name.rfind("node0.gpu", 0) == 0 && a.devices.size() < 4) a.devices.push_back(d);
            if (c.devices[d].name.rfind("node1.gpu", 0) == 0 && b.devices.size() < 4) b.devices.push_back(d);
        }
        p.stages = {a, b};
        validate_plan(p, fuzz::fixture_model(), c);
        return p;
    }();
    return plan;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    using namespace dpart;
    const Model& model = fuzz::fixture_model();
    const Cluster& cluster = fuzz::fixture_cluster();
    static const CostOptions options;
    static const AnalyticalCostModel cost(model, cluster, options);
    const Plan& plan = fixture_plan();
    const std::string text = fuzz::text_of(data, size);
    fuzz::expect_input_errors([&] {
        const Scenario sc = parse_scenario(text, fuzz::input_name, cluster);
        for (std::size_t i = 1; i < sc.events.size(); ++i)
            if (sc.events[i].iteration < sc.events[i - 1].iteration) fuzz::finding("events out of iteration order");
        for (const ScenarioEvent& e : sc.events) (void)describe(e, cluster);
        for (std::uint64_t it : {std::uint64_t{0}, std::uint64_t{3}, ~std::uint64_t{0}})
            (void)conditions_at(sc, cluster.devices.size(), it);
        PolicyOptions po;
        const PolicyReplay r = replay_policy(plan, model, cluster, cost, options, sc, 4, po);
        for (const IterationRecord& rec : r.result.iterations)
            if (std::isnan(rec.iteration_s) || rec.iteration_s < 0) fuzz::finding("a replayed iteration took NaN or < 0 s");
    });
    return 0;
}
