#pragma once
// One file per subcommand: each defines setup_<name>(app, action), which registers the
// subcommand with its options and, when it is the one selected, makes `action` run it.
#include <CLI/CLI.hpp>

#include <cmath>
#include <functional>
#include <memory>
#include <string>

#include "dpart/cost/layer_times.hpp"

namespace dpart::cli {

/// The cost model of plan, replay and run: the analytical roofline, or with `--layer-times FILE`
/// (dpart profile --model) measured layer times for the devices of the kind they were measured
/// on. Throws InputError when no device of the cluster is of that kind.
class CliCostModel {
public:
    CliCostModel(const Model& model, const Cluster& cluster, const CostOptions& copt, const std::string& layer_times)
        : analytical_(model, cluster, copt) {
        if (layer_times.empty()) return;
        measured_ = std::make_unique<MeasuredCostModel>(analytical_, model, cluster, load_layer_times(layer_times, model));
        if (measured_->measured_devices() == 0)
            throw InputError(SourceLocation{layer_times, 0, 0},
                             "these layer times were measured on devices of another kind than the cluster's (the \"kind\" "
                             "column against each device's kind)");
    }
    [[nodiscard]] const CostModel& get() const {
        return measured_ ? static_cast<const CostModel&>(*measured_) : analytical_;
    }

private:
    AnalyticalCostModel analytical_;
    std::unique_ptr<MeasuredCostModel> measured_;
};

using Action = std::function<int()>;

/// A finite number. CLI::Range and CLI::PositiveNumber let NaN through (every comparison with NaN
/// is false), so every floating-point option checks this as well.
inline const CLI::Validator finite_number{[](std::string& s) -> std::string {
                                              double v = 0;
                                              if (!CLI::detail::lexical_cast(s, v)) return "\"" + s + "\" is not a number";
                                              if (!std::isfinite(v)) return "must be a finite number, got " + s;
                                              return {};
                                          },
                                          ""};
/// A finite number > 0 (CLI::PositiveNumber accepts NaN, and its message prints DBL_MAX in full).
inline const CLI::Validator positive_number{[](std::string& s) -> std::string {
                                                double v = 0;
                                                if (!CLI::detail::lexical_cast(s, v)) return "\"" + s + "\" is not a number";
                                                if (!std::isfinite(v) || v <= 0)
                                                    return "must be a positive finite number, got " + s;
                                                return {};
                                            },
                                            "POSITIVE"};

void setup_inspect(CLI::App& app, Action& action);
/// `command` is the command line, recorded in the [meta] of the files it writes.
void setup_plan(CLI::App& app, Action& action, const std::string& command);
void setup_replay(CLI::App& app, Action& action, const std::string& command);
void setup_compare(CLI::App& app, Action& action);
void setup_import(CLI::App& app, Action& action, const std::string& command);
void setup_run(CLI::App& app, Action& action, const std::string& command);
void setup_profile(CLI::App& app, Action& action, const std::string& command);

/// The text of `dpart --version`.
[[nodiscard]] std::string version_text();

}  // namespace dpart::cli
