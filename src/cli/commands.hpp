#pragma once
// One file per subcommand: each defines setup_<name>(app, action), which registers the
// subcommand with its options and, when it is the one selected, makes `action` run it.
#include <CLI/CLI.hpp>

#include <functional>
#include <string>

namespace dpart::cli {

using Action = std::function<int()>;

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
