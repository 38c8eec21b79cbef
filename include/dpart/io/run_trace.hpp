#pragma once
// The trace files of an executed run (`dpart run`), in the same columns as a replay's:
// iterations.csv, stages.csv and timeline.csv from the workers' timed tasks.
#include <cstdint>

#include "dpart/cluster/cluster.hpp"
#include "dpart/io/csv.hpp"
#include "dpart/plan/plan.hpp"
#include "dpart/runtime/executor.hpp"

namespace dpart {

/// One row per iteration; `event` names the scenario's events that took effect at its start.
void add_run_iteration_rows(CsvTable& table, const rt::RunResult& run, std::uint64_t global_batch,
                            const Scenario& scenario, const Cluster& cluster);
/// One row per (iteration, stage). A stage's figures are those of its busiest worker: compute
/// = forward, backward and optimizer; comm = sends and all-reduce; idle = the rest of the
/// iteration (waiting for peers).
void add_run_stage_rows(CsvTable& table, const rt::RunResult& run, const rt::Execution& ex, const Cluster& cluster);
/// One row per timed task of every worker, for the iterations `keep` accepts.
void add_run_timeline_rows(CsvTable& table, const rt::RunResult& run, const rt::Execution& ex, const Cluster& cluster,
                           bool all_iterations);

}  // namespace dpart
