#include "dpart/io/trace.hpp"

#include "dpart/core/error.hpp"
#include "dpart/io/atomic_file.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <filesystem>
#include <cmath>
#include <numeric>

namespace dpart {

const std::vector<std::string>& iteration_columns() {
    static const std::vector<std::string> c{"iteration", "plan_version", "iteration_ms", "samples_per_s", "event"};
    return c;
}

const std::vector<std::string>& stage_trace_columns() {
    static const std::vector<std::string> c{"iteration", "stage", "device", "compute_ms", "comm_ms", "idle_ms"};
    return c;
}

const std::vector<std::string>& timeline_columns() {
    static const std::vector<std::string> c{"iteration", "stage", "device", "kind", "microbatch", "start_ms", "end_ms"};
    return c;
}

std::string device_cell(const Stage& stage, const Cluster& cluster) {
    std::string out;
    for (std::size_t i = 0; i < stage.devices.size(); ++i) out += (i ? " " : "") + cluster.devices[stage.devices[i]].name;
    return out;
}

void add_stage_rows(CsvTable& table, std::uint64_t iteration, const Plan& plan, const Cluster& cluster,
                    const TaskGraph& graph, const Timeline& timeline) {
    std::vector<double> compute(plan.stages.size(), 0), comm(plan.stages.size(), 0), busy(plan.stages.size(), 0);
    for (std::size_t i = 0; i < graph.tasks.size(); ++i) {
        const Task& t = graph.tasks[i];
        const double d = timeline.end[i] - timeline.start[i];
        switch (t.kind) {
            case TaskKind::forward:
            case TaskKind::backward:
            case TaskKind::optimizer: compute[t.stage] += d; busy[t.stage] += d; break;
            case TaskKind::allreduce: comm[t.stage] += d; busy[t.stage] += d; break;
            case TaskKind::send_activation:
            case TaskKind::send_gradient: comm[t.stage] += d; break;
        }
    }
    for (std::size_t s = 0; s < plan.stages.size(); ++s)
        table.add_row({std::to_string(iteration), std::to_string(s), device_cell(plan.stages[s], cluster), ms_text(compute[s]),
                       ms_text(comm[s]), ms_text(std::max(0.0, timeline.makespan - busy[s]))});
}

void add_timeline_rows(CsvTable& table, std::uint64_t iteration, const Plan& plan, const Cluster& cluster,
                       const TaskGraph& graph, const Timeline& timeline) {
    for (std::size_t i = 0; i < graph.tasks.size(); ++i) {
        const Task& t = graph.tasks[i];
        const bool per_microbatch = t.kind != TaskKind::allreduce && t.kind != TaskKind::optimizer;
        table.add_row({std::to_string(iteration), std::to_string(t.stage),
                       cluster.devices[plan.stages[t.stage].devices.front()].name, std::string(to_string(t.kind)), per_microbatch ? std::to_string(t.microbatch) : "",
                       ms_text(timeline.start[i]), ms_text(timeline.end[i])});
    }
}

RunSummary summarise(const std::vector<double>& iteration_ms, std::uint64_t global_batch, double predicted_iteration_ms) {
    RunSummary s;
    s.iterations = iteration_ms.size();
    s.predicted_iteration_ms = predicted_iteration_ms;
    if (iteration_ms.empty()) return s;
    std::vector<double> sorted = iteration_ms;
    std::sort(sorted.begin(), sorted.end());
    // Nearest-rank percentiles.
    auto rank = [&](double p) {
        const auto k = static_cast<std::size_t>(std::ceil(p / 100.0 * static_cast<double>(sorted.size())));
        return sorted[std::min(sorted.size(), std::max<std::size_t>(k, 1)) - 1];
    };
    s.mean_iteration_ms = std::accumulate(sorted.begin(), sorted.end(), 0.0) / static_cast<double>(sorted.size());
    s.p50_iteration_ms = rank(50);
    s.p99_iteration_ms = rank(99);
    s.samples_per_s = static_cast<double>(global_batch) / (s.mean_iteration_ms / 1e3);
    if (predicted_iteration_ms > 0)
        s.prediction_error_pct = (s.mean_iteration_ms - predicted_iteration_ms) / predicted_iteration_ms * 100;
    return s;
}

std::string summary_toml(const RunSummary& s, const Meta& meta) {
    std::string out = meta_toml(meta);
    out += "[summary]\n";
    out += fmt::format("policy = {}\n", toml_string(s.policy));
    out += fmt::format("iterations = {}\n", s.iterations);
    out += fmt::format("mean_iteration_ms = {:.9g}\n", s.mean_iteration_ms);
    out += fmt::format("p50_iteration_ms = {:.9g}\n", s.p50_iteration_ms);
    out += fmt::format("p99_iteration_ms = {:.9g}\n", s.p99_iteration_ms);
    out += fmt::format("samples_per_s = {:.9g}\n", s.samples_per_s);
    out += fmt::format("predicted_iteration_ms = {:.9g}\n", s.predicted_iteration_ms);
    out += fmt::format("prediction_error_pct = {:.6g}\n", s.prediction_error_pct);
    out += fmt::format("repartitions = {}\n", s.repartitions);
    out += fmt::format("migration_ms = {:.9g}\n", s.migration_ms);
    out += fmt::format("plan_versions = {}\n", s.plan_versions);
    out += fmt::format("stopped = {}\n", s.stopped ? "true" : "false");
    if (s.stopped) out += fmt::format("stop_reason = {}\n", toml_string(s.stop_reason));
    if (!s.backend.empty()) out += fmt::format("backend = {}\n", toml_string(s.backend));
    if (!s.transport.empty()) out += fmt::format("transport = {}\n", toml_string(s.transport));
    if (!s.loss.empty()) {
        out += fmt::format("final_loss = {:.9g}\n", s.loss.back());
        out += "loss = [";
        for (std::size_t i = 0; i < s.loss.size(); ++i) out += fmt::format("{}{:.9g}", i == 0 ? "" : ", ", s.loss[i]);
        out += "]\n";
    }
    if (!s.weights_digest.empty()) out += fmt::format("weights_digest = {}\n", toml_string(s.weights_digest));
    out += s.extra_toml;
    return out;
}

std::string write_trace_dir(const std::string& dir, const Meta& meta, const CsvTable& iterations,
                            const CsvTable& stages, const CsvTable& timeline, const RunSummary& summary) {
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec) throw RuntimeError(fmt::format("cannot create {}: {}", dir, ec.message()));
    const std::filesystem::path d(dir);
    iterations.write((d / "iterations.csv").string());
    stages.write((d / "stages.csv").string());
    timeline.write((d / "timeline.csv").string());
    write_file_atomic((d / "summary.toml").string(), summary_toml(summary, meta));
    return dir;
}

}  // namespace dpart
