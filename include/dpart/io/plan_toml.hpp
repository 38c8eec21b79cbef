#pragma once
// plan.toml: [meta], [plan], [[stage]] (docs/FORMATS.md). Reading accepts a hand-written plan
// with only the required fields; whatever reads a plan recomputes its predictions.
#include <string>
#include <string_view>

#include "dpart/cluster/cluster.hpp"
#include "dpart/graph/model.hpp"
#include "dpart/io/csv.hpp"
#include "dpart/io/meta.hpp"
#include "dpart/plan/estimate.hpp"
#include "dpart/plan/pipedream.hpp"

namespace dpart {

[[nodiscard]] std::string plan_toml(const Plan& plan, const PlanEstimate& estimate, const Model& model,
                                    const Cluster& cluster, const Meta& meta, std::string_view strategy);

/// A plan found with PipeDream's cost model (`dpart plan --cost-model pipedream --out`): [meta],
/// [plan] with cost_model = "pipedream", workers, bandwidth_bytes and predicted_bottleneck_ms (its
/// "time per stage", 12 significant digits), and [[stage]] tables whose devices are worker0 ..
/// worker{N-1}. A record of PipeDream's prediction: its replicas take whole minibatches in turn,
/// which dpart's plans do not, so replay and run do not read it.
[[nodiscard]] std::string pipedream_plan_toml(const PipeDreamResult& result, const PipeDreamOptions& options,
                                              const Model& model, const Meta& meta);

/// Reads and validates a plan for `model` on `cluster`. Throws InputError at file:line:col.
[[nodiscard]] Plan load_plan(const std::string& path, const Model& model, const Cluster& cluster);
[[nodiscard]] Plan parse_plan(std::string_view text, const std::string& path, const Model& model,
                              const Cluster& cluster);

/// The stage CSV: one row per stage, columns declared in stage_csv_columns().
[[nodiscard]] const std::vector<std::string>& stage_csv_columns();
[[nodiscard]] CsvTable stage_csv(const Plan& plan, const PlanEstimate& estimate, const Model& model,
                                 const Cluster& cluster);

}  // namespace dpart
