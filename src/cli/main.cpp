// dpart's entry point: dispatches to a subcommand and maps every error to one message and
// one exit code (0 success, 1 runtime failure, 2 bad input, 3 infeasible request).
#include <fmt/format.h>

#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "commands.hpp"
#include "dpart/core/error.hpp"
#include "dpart/core/strings.hpp"
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

/// CLI11 answers a misspelt command ("dpart plna", "dpart import onnx") with "A subcommand is
/// required": this names it and the commands there are. "" when every command word is known (CLI11
/// checks the rest).
std::string unknown_command(const CLI::App& app, int argc, char** argv) {
    const CLI::App* at = &app;
    std::string path = "dpart";
    for (int i = 1; i < argc && at->get_require_subcommand_min() > 0; ++i) {
        const std::string arg = argv[i];
        if (arg.empty() || arg[0] == '-') return "";
        std::vector<std::string> names;
        const CLI::App* next = nullptr;
        for (const CLI::App* sub : at->get_subcommands([](const CLI::App*) { return true; })) {
            names.push_back(sub->get_name());
            if (sub->check_name(arg)) next = sub;
        }
        if (next == nullptr)
            return fmt::format("unknown command \"{} {}\"{}; the commands of {} are {}", path, arg,
                               dpart::did_you_mean(arg, names), path, dpart::join(names, ", "));
        at = next;
        path += " " + arg;
    }
    return "";
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

    if (const std::string unknown = unknown_command(app, argc, argv); !unknown.empty()) {
        fmt::print(stderr, "dpart: error: {}\n", unknown);
        return static_cast<int>(dpart::ExitCode::bad_input);
    }
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
