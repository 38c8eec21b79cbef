#include "dpart/io/run_trace.hpp"

#include <fmt/format.h>

#include <algorithm>

#include "dpart/io/meta.hpp"
#include "dpart/io/trace.hpp"

namespace dpart {

void add_run_iteration_rows(CsvTable& table, const rt::RunResult& run, std::uint64_t global_batch,
                            const Scenario& scenario, const Cluster& cluster) {
    for (std::size_t i = 0; i < run.iteration_s.size(); ++i) {
        const double s = run.iteration_s[i];
        const std::uint64_t it = run.first_iteration + i;
        std::string event = i == 0 && it > 0 ? fmt::format("resumed at iteration {}", it) : "";
        for (const ScenarioEvent& e : scenario.events)
            if (e.iteration == it) event += (event.empty() ? "" : "; ") + describe(e, cluster);
        table.add_row({std::to_string(it), "1", ms_text(s),
                       fmt::format("{:.6g}", s > 0 ? static_cast<double>(global_batch) / s : 0.0), event});
    }
}

namespace {
struct Split {
    double compute = 0, comm = 0;
};
bool is_compute(TaskKind k) { return k == TaskKind::forward || k == TaskKind::backward || k == TaskKind::optimizer; }
}  // namespace

void add_run_stage_rows(CsvTable& table, const rt::RunResult& run, const rt::Execution& ex, const Cluster& cluster) {
    const Plan& plan = ex.plan();
    const std::size_t N = run.iteration_s.size();
    // per worker, per iteration
    std::vector<std::vector<Split>> split(run.workers.size(), std::vector<Split>(N));
    for (std::size_t w = 0; w < run.workers.size(); ++w)
        for (const rt::TaskRecord& t : run.workers[w].tasks) {
            Split& s = split[w][t.iteration - run.first_iteration];
            (is_compute(t.kind) ? s.compute : s.comm) += t.end_s - t.start_s;
        }
    for (std::size_t it = 0; it < N; ++it)
        for (std::size_t st = 0; st < plan.stages.size(); ++st) {
            Split best;
            for (std::size_t w = 0; w < run.workers.size(); ++w)
                if (ex.places()[w].stage == st && split[w][it].compute >= best.compute) best = split[w][it];
            table.add_row({std::to_string(run.first_iteration + it), std::to_string(st), device_cell(plan.stages[st], cluster),
                           ms_text(best.compute), ms_text(best.comm),
                           ms_text(std::max(0.0, run.iteration_s[it] - best.compute - best.comm))});
        }
}

void add_run_timeline_rows(CsvTable& table, const rt::RunResult& run, const rt::Execution& ex, const Cluster& cluster,
                           bool all_iterations) {
    const std::size_t N = run.iteration_s.size();
    for (std::size_t w = 0; w < run.workers.size(); ++w) {
        const rt::WorkerPlace& p = ex.places()[w];
        for (const rt::TaskRecord& t : run.workers[w].tasks) {
            if (!all_iterations && t.iteration != run.first_iteration && t.iteration + 1 != run.first_iteration + N) continue;
            const bool per_microbatch = t.kind != TaskKind::allreduce && t.kind != TaskKind::optimizer;
            table.add_row({std::to_string(t.iteration), std::to_string(p.stage), cluster.devices[p.device].name,
                           std::string(to_string(t.kind)), per_microbatch ? std::to_string(t.microbatch) : "",
                           ms_text(t.start_s), ms_text(t.end_s)});
        }
    }
}

}  // namespace dpart
