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

namespace dpart {

[[nodiscard]] std::string plan_toml(const Plan& plan, const PlanEstimate& estimate, const Model& model,
                                    const Cluster& cluster, const Meta& meta, std::string_view strategy);

/// Reads and validates a plan for `model` on `cluster`. Throws InputError at file:line:col.
[[nodiscard]] Plan load_plan(const std::string& path, const Model& model, const Cluster& cluster);
[[nodiscard]] Plan parse_plan(std::string_view text, const std::string& path, const Model& model,
                              const Cluster& cluster);

/// The stage CSV: one row per stage, columns declared in stage_csv_columns().
[[nodiscard]] const std::vector<std::string>& stage_csv_columns();
[[nodiscard]] CsvTable stage_csv(const Plan& plan, const PlanEstimate& estimate, const Model& model,
                                 const Cluster& cluster);

}  // namespace dpart
