// model.toml: parse_model on arbitrary text (the [[layer]] and [transformer] forms, the op
// library's shape and cost checks, the graph checks of build_model). A model that loads is then
// costed on a bundled cluster as one stage on one H100: every time must be finite and positive.
#include <cmath>

#include "dpart/cost/cost_model.hpp"
#include "dpart/plan/estimate.hpp"
#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    using namespace dpart;
    const std::string text = fuzz::text_of(data, size);
    if (fuzz::too_large_to_fuzz(text)) return 0;
    const Cluster& cluster = fuzz::fixture_cluster();
    fuzz::expect_input_errors([&] {
        const Model m = parse_model(text, fuzz::input_name);
        if (m.layers.empty()) fuzz::finding("a model without layers was accepted");
        if (m.global_batch == 0) fuzz::finding("a model with global_batch 0 was accepted");
        if (m.layers.size() > 4096) return;
        Plan plan;
        plan.microbatch_size = m.global_batch;
        plan.microbatches = 1;
        Stage all;
        all.first_layer = 0;
        all.last_layer = m.layers.size() - 1;
        all.devices = {0};
        plan.stages = {all};
        const CostOptions options;
        const AnalyticalCostModel cost(m, cluster, options);
        const PlanEstimate e = estimate_plan(plan, m, cluster, cost, options);
        if (!std::isfinite(e.iteration_s) || e.iteration_s <= 0)
            fuzz::finding("a model that loads is estimated to a time that is not finite and positive");
    });
    return 0;
}
