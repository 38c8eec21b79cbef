// plan.toml: parse_plan on arbitrary text, checked against a bundled model and cluster
// (gpt2-small on h100-4x8: 16 layers, 32 devices in 4 nodes). A plan that loads is then estimated
// (as replay and run do: predictions are recomputed) and written back with plan_toml, which
// must load again as the same plan.
#include <cmath>

#include "dpart/cost/cost_model.hpp"
#include "dpart/io/meta.hpp"
#include "dpart/io/plan_toml.hpp"
#include "dpart/plan/estimate.hpp"
#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    using namespace dpart;
    const Model& model = fuzz::fixture_model();
    const Cluster& cluster = fuzz::fixture_cluster();
    static const CostOptions options;
    static const AnalyticalCostModel cost(model, cluster, options);
    static const Meta meta{"fuzz_plan", {}};
    const std::string text = fuzz::text_of(data, size);
    fuzz::expect_input_errors([&] {
        const Plan plan = parse_plan(text, fuzz::input_name, model, cluster);
        const PlanEstimate e = estimate_plan(plan, model, cluster, cost, options);
        if (!std::isfinite(e.iteration_s) || e.iteration_s <= 0) fuzz::finding("a plan estimated to a non-finite time");
        const std::string again = plan_toml(plan, e, model, cluster, meta, "fuzz");
        try {
            if (!(parse_plan(again, fuzz::input_name, model, cluster) == plan))
                fuzz::finding("plan_toml does not load back as the same plan");
        } catch (const InputError& err) {
            fuzz::finding(std::string("plan_toml wrote a plan that does not load: ") + err.what());
        }
    });
    return 0;
}
