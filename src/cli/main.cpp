// dpart's entry point: dispatches to a subcommand and maps every error to one message and
// one exit code (0 success, 1 runtime failure, 2 bad input, 3 infeasible request).
#include <fmt/format.h>

#include <cstdio>
#include <exception>

#include "commands.hpp"
#include "dpart/core/error.hpp"
#include "dpart/io/meta.hpp"

namespace {

constexpr const char* exit_codes =
    "Exit codes: 0 success, 1 runtime failure, 2 bad input (file, line and field named), 3 infeasible request.";

int report(const dpart::Error& e) {
    if (const auto* input = dynamic_cast<const dpart::InputError*>(&e); input != nullptr && !input->where().file.empty())
        fmt::print(stderr, "{}: error: {}\n", input->where().str(), input->detail());
    else
        fmt::print(stderr, "dpart: error: {}\n", e.what());
    return static_cast<int>(e.code());
}

}  // namespace

int main(int argc, char** argv) {
    CLI::App app{"dpart: partition a model across a cluster of GPUs, and check the plan.", "dpart"};
    app.footer(exit_codes);
    app.require_subcommand(1);
    app.set_version_flag("--version", [] { return dpart::cli::version_text(); }, "Print the version, the git revision and the GPU libraries dpart was built with");

    dpart::cli::Action action;
    dpart::cli::setup_inspect(app, action);
    const std::string command = dpart::command_line(argc, argv);
    dpart::cli::setup_plan(app, action, command);
    dpart::cli::setup_replay(app, action, command);
    dpart::cli::setup_run(app, action, command);
    dpart::cli::setup_profile(app, action, command);
    dpart::cli::setup_compare(app, action);
    dpart::cli::setup_import(app, action, command);

    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        const int code = app.exit(e);
        return code == 0 ? 0 : static_cast<int>(dpart::ExitCode::bad_input);
    }
    try {
        return action();
    } catch (const dpart::Error& e) {
        return report(e);
    } catch (const std::bad_alloc&) {
        fmt::print(stderr, "dpart: error: out of memory\n");
        return static_cast<int>(dpart::ExitCode::runtime_failure);
    } catch (const std::exception& e) {
        fmt::print(stderr, "dpart: internal error: {}\n", e.what());
        return static_cast<int>(dpart::ExitCode::runtime_failure);
    }
}
