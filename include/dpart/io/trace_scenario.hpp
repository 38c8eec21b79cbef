#pragma once
// The conditions a recorded run met, as a scenario the simulator can replay another plan or
// policy under (`dpart replay --trace RUN_DIR`).
#include <string>

#include "dpart/cluster/cluster.hpp"
#include "dpart/cost/cost_model.hpp"
#include "dpart/graph/model.hpp"
#include "dpart/sim/scenario.hpp"

namespace dpart {

/// Reads RUN_DIR/plan.toml (the plan the run executed, as `dpart run --out-dir` copies it) and
/// RUN_DIR/stages.csv (measured compute per iteration and stage). Every device of a stage gets,
/// at each iteration, the slowdown measured compute / predicted compute of its stage (forward
/// and backward of every microbatch plus the optimizer step, the recorded plan on `cluster`);
/// an event is emitted when a device's factor moves by more than `tolerance` (relative) from
/// the one in force, so that noise below it does not fill the trace with events. Throws
/// InputError naming the file and line of a row that does not match the plan.
[[nodiscard]] Scenario scenario_from_run(const std::string& run_dir, const Model& model, const Cluster& cluster,
                                         const CostModel& cost, const CostOptions& options, double tolerance = 0.05);

}  // namespace dpart
