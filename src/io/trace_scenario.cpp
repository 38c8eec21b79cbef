#include "dpart/io/trace_scenario.hpp"

#include <fmt/format.h>

#include <cmath>
#include <filesystem>

#include "dpart/io/csv.hpp"
#include "dpart/io/plan_toml.hpp"
#include "dpart/io/trace.hpp"
#include "dpart/plan/estimate.hpp"

namespace dpart {

Scenario scenario_from_run(const std::string& run_dir, const Model& model, const Cluster& cluster,
                           const CostModel& cost, const CostOptions& options, double tolerance) {
    const std::filesystem::path dir(run_dir);
    const Plan plan = load_plan((dir / "plan.toml").string(), model, cluster);
    // The run's times are compared with its plan priced as it ran: in the precision it
    // recorded, which must be the model's as priced here.
    if (plan.precision && *plan.precision != model.dtype)
        throw InputError(plan.where, fmt::format("the run computed in {}, but its conditions are read here with the "
                                                 "model priced in {}: replay {} itself, or a plan for {}",
                                                 to_string(*plan.precision), to_string(model.dtype),
                                                 (dir / "plan.toml").string(), to_string(*plan.precision)));
    const PlanEstimate est = estimate_plan(plan, model, cluster, cost, options);
    const CsvFile rows = read_csv((dir / "stages.csv").string(), stage_trace_columns());
    const auto M = static_cast<double>(plan.microbatches);
    std::vector<double> in_force(cluster.devices.size(), 1.0);
    Scenario scenario;
    for (std::size_t r = 0; r < rows.rows.size(); ++r) {
        const SourceLocation where{rows.path, rows.lines[r], 0};
        const double iteration = csv_number(rows, r, 0), stage = csv_number(rows, r, 1);
        if (iteration < 0 || stage < 0 || iteration != std::floor(iteration) || stage != std::floor(stage) ||
            iteration > 9007199254740992.0 || stage >= static_cast<double>(plan.stages.size()))
            throw InputError(where, fmt::format("iteration {} stage {} is not a stage of {}", rows.rows[r][0],
                                                rows.rows[r][1], (dir / "plan.toml").string()));
        const auto s = static_cast<std::size_t>(stage);
        if (rows.rows[r][2] != device_cell(plan.stages[s], cluster))
            throw InputError(where, fmt::format("stage {} ran on \"{}\", but plan.toml puts it on \"{}\"", s,
                                                rows.rows[r][2], device_cell(plan.stages[s], cluster)));
        const StageEstimate& e = est.stages[s];
        const double predicted_ms = (M * (e.forward_s + e.backward_s) + e.optimizer_s) * 1e3;
        const double measured_ms = csv_number(rows, r, 3);
        if (measured_ms < 0)
            throw InputError(where, fmt::format("column \"{}\": {} ms is negative", rows.header[3], rows.rows[r][3]));
        if (predicted_ms <= 0 || measured_ms == 0) continue;
        const double factor = measured_ms / predicted_ms;
        if (factor < min_event_factor || factor > max_event_factor)
            throw InputError(where, fmt::format("column \"{}\": {} ms against the {:.6g} ms predicted is a slowdown "
                                                "outside the {:g} to {:g} a scenario's factor may be",
                                                rows.header[3], rows.rows[r][3], predicted_ms, min_event_factor,
                                                max_event_factor));
        for (std::size_t d : plan.stages[s].devices) {
            if (std::abs(factor / in_force[d] - 1.0) <= tolerance) continue;
            in_force[d] = factor;
            ScenarioEvent ev;
            ev.iteration = static_cast<std::uint64_t>(iteration);
            ev.kind = EventKind::slowdown;
            ev.device = d;
            ev.factor = factor;
            ev.where = where;
            scenario.events.push_back(ev);
        }
    }
    std::stable_sort(scenario.events.begin(), scenario.events.end(),
                     [](const ScenarioEvent& a, const ScenarioEvent& b) { return a.iteration < b.iteration; });
    return scenario;
}

}  // namespace dpart
