#pragma once
// PipeDream's planner, as published (msr-fiddle/pipedream, optimizer_graph_hierarchical.py with
// one level of N identical workers; docs/METHOD.md "The PipeDream cost model"), so that users can
// check dpart against the planner they know.
//
// It plans over PipeDream's "states": the antichains of the layer DAG that its graph code
// enumerates (graph.py antichain_dag), each standing for everything up to and including it. A
// stage is the layers between two states, on r replicas:
//   stage time = (T + 4 (r-1) W / (B r)) / r          T: its summed forward+backward time,
//                                                     W: its parameter bytes, B: bandwidth
//   the cut before it, and the one after it, cost 2 act / (B r) each, act the bytes of the
//   state's augmented antichain (outputs still needed after the cut)
// and the plan's "time per stage" is the largest of those over all stages. The DP is PipeDream's
// own (same recurrence, same order of floating-point operations), so its optimum equals
// PipeDream's printed figure; among equal plans it picks deterministically one whose stages are
// contiguous layer ranges of the model (dpart's notion of a stage).
#include <cstddef>
#include <optional>
#include <vector>

#include "dpart/graph/model.hpp"

namespace dpart {

struct PipeDreamOptions {
    std::size_t workers = 1;
    double bandwidth = 1e9;          ///< bytes/s between any two workers (PipeDream's -b)
    bool straight_pipeline = false;  ///< no replication: one worker per stage (--straight_pipeline)
    /// Memory per worker in bytes (-s with --use_memory_constraint): a stage's activations and
    /// parameters times ceil((N - workers so far) / r) must fit. nullopt = no constraint.
    std::optional<double> memory_bytes;
};

struct PipeDreamStage {
    std::size_t first_layer = 0;  ///< inclusive, in the model's order
    std::size_t last_layer = 0;   ///< inclusive
    std::size_t first_state = 0;  ///< PipeDream's (start, end) state range, as its optimizer prints it
    std::size_t end_state = 0;
    std::size_t replicas = 1;
    double compute_s = 0;  ///< summed forward + backward time of its layers, one worker
    double parameter_bytes = 0;
    double time_s = 0;             ///< (compute + 4 (r-1) W / (B r)) / r
    double input_transfer_s = 0;   ///< 2 act(cut before) / (B r); 0 for the first stage
    double output_transfer_s = 0;  ///< 2 act(cut after) / (B r); 0 for the first and last stages
};

struct PipeDreamResult {
    /// PipeDream's "Time per stage in pipeline": the optimum over all its states, seconds.
    double time_per_stage_s = 0;
    /// The bottleneck of `stages`: equal to time_per_stage_s unless no optimal plan has stages
    /// that are contiguous in the model's layer order (then the best contiguous plan's).
    double plan_bottleneck_s = 0;
    std::vector<PipeDreamStage> stages;
    std::size_t states = 0;      ///< PipeDream's state count (antichains)
    double single_stage_s = 0;   ///< "Time taken by single-stage pipeline": all layers on one worker
    double data_parallel_s = 0;  ///< its N-worker data-parallel time per minibatch
};

/// Every layer must be a measured custom layer (dpart import pipedream); InputError names the
/// first that is not. InfeasibleError when nothing fits --memory-bytes.
[[nodiscard]] PipeDreamResult solve_pipedream(const Model& model, const PipeDreamOptions& options);

}  // namespace dpart
