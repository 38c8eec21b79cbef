#pragma once
// The trace files `dpart replay` writes (and `dpart run` will): iterations.csv, stages.csv,
// timeline.csv and summary.toml, with columns declared here (docs/FORMATS.md).
#include <cstdint>
#include <string>
#include <vector>

#include "dpart/cluster/cluster.hpp"
#include "dpart/io/csv.hpp"
#include "dpart/io/meta.hpp"
#include "dpart/plan/plan.hpp"
#include "dpart/sim/schedule.hpp"

namespace dpart {

/// iteration,plan_version,iteration_ms,samples_per_s,event
[[nodiscard]] const std::vector<std::string>& iteration_columns();
/// iteration,stage,device,compute_ms,comm_ms,idle_ms
[[nodiscard]] const std::vector<std::string>& stage_trace_columns();
/// iteration,stage,device,kind,microbatch,start_ms,end_ms
[[nodiscard]] const std::vector<std::string>& timeline_columns();

/// The stage's devices as one cell ("gpu0 gpu1").
[[nodiscard]] std::string device_cell(const Stage& stage, const Cluster& cluster);

/// One row per stage of a simulated (or executed) iteration: compute = its forward, backward and
/// optimizer tasks; comm = its sends and all-reduce; idle = the iteration's time its devices
/// spent in none of its own tasks.
void add_stage_rows(CsvTable& table, std::uint64_t iteration, const Plan& plan, const Cluster& cluster,
                    const TaskGraph& graph, const Timeline& timeline);
/// One row per task; `device` is the stage's first device (stages.csv lists them all).
void add_timeline_rows(CsvTable& table, std::uint64_t iteration, const Plan& plan, const Cluster& cluster,
                       const TaskGraph& graph, const Timeline& timeline);

struct RunSummary {
    std::uint64_t iterations = 0;
    double mean_iteration_ms = 0, p50_iteration_ms = 0, p99_iteration_ms = 0;
    double samples_per_s = 0;
    double predicted_iteration_ms = 0;
    double prediction_error_pct = 0;  ///< (mean - predicted) / predicted x 100
    std::uint64_t repartitions = 0;
    double migration_ms = 0;
    std::uint64_t plan_versions = 1;
    std::string policy;
    bool stopped = false;
    std::string stop_reason;
    // Written by `dpart run` only.
    std::string backend;    ///< "cpu"
    std::string transport;  ///< "in-process" or "mpi"
    std::vector<double> loss;  ///< per iteration
    std::string weights_digest;
    /// Further tables, as TOML text, appended to summary.toml (an adaptive run's [adaptive]).
    std::string extra_toml;
};

/// The summary of iteration times (ms) for a global batch.
[[nodiscard]] RunSummary summarise(const std::vector<double>& iteration_ms, std::uint64_t global_batch,
                                   double predicted_iteration_ms);
[[nodiscard]] std::string summary_toml(const RunSummary& s, const Meta& meta);

/// The files of a trace directory (replay and run --out-dir): creates `dir`, then writes
/// iterations.csv, stages.csv, timeline.csv and summary.toml there, each atomically. Returns
/// the directory, for the caller's further files.
std::string write_trace_dir(const std::string& dir, const Meta& meta, const CsvTable& iterations,
                            const CsvTable& stages, const CsvTable& timeline, const RunSummary& summary);

}  // namespace dpart
