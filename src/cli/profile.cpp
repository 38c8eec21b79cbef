// dpart profile: measure this machine and write the cluster.toml that dpart plan reads.
#include <unistd.h>

#include <fmt/format.h>

#include <memory>

#include "commands.hpp"
#include "dpart/io/atomic_file.hpp"
#include "dpart/core/error.hpp"
#include "dpart/profile/probe.hpp"
#include "dpart/report/text_table.hpp"

namespace dpart::cli {
namespace {

struct ProfileOptions {
    std::string out;
    std::string csv;
    std::string name;
    bool list = false;
    std::vector<std::string> keys;
    std::vector<std::string> prefixes;
    int repeats = 5;
    double scale = 1.0;
};

std::string host_name() {
    char name[256] = {};
    if (gethostname(name, sizeof name - 1) != 0) return "localhost";
    return name;
}

int run_profile(const ProfileOptions& o, const std::string& command) {
    const auto probes = profile::select_probes(profile::all_probes({o.repeats, o.scale}), o.keys, o.prefixes);
    if (o.list) {
        for (const auto& p : probes) fmt::print("{:<18} {}\n", p.key, p.description);
        return 0;
    }
    std::vector<profile::ProbeResult> results;
    CsvTable csv(profile::result_columns());
    const bool terminal = isatty(STDERR_FILENO) != 0;
    for (std::size_t i = 0; i < probes.size(); ++i) {
        if (terminal) fmt::print(stderr, "[{}/{}] {} ...\r", i + 1, probes.size(), probes[i].key);
        results.push_back(profile::run_probe(probes[i]));
        const auto& r = results.back();
        std::string line = fmt::format("{:<18} {:<7}", r.key, to_string(r.status));
        for (const auto& f : r.figures) line += fmt::format(" {} {:.4g} {};", f.name, f.value, f.unit);
        if (!r.text.empty()) line += " " + r.text;
        if (!r.reason.empty()) line += " (" + r.reason + ")";
        if (terminal) fmt::print(stderr, "\x1b[2K");
        fmt::print("{}\n", line);
        profile::add_result_rows(csv, r);
    }
    Meta meta;
    meta.command_line = command;
    if (!o.csv.empty()) csv.write(o.csv);
    if (!o.out.empty()) {
        write_file_atomic(o.out, profile::cpu_cluster_toml(results, o.name.empty() ? host_name() : o.name, host_name(), meta));
        fmt::print("wrote {}\n", o.out);
    }
    const bool failed = std::any_of(results.begin(), results.end(),
                                    [](const auto& r) { return r.status == profile::ProbeResult::Status::failed; });
    return failed ? static_cast<int>(ExitCode::runtime_failure) : 0;
}

}  // namespace

void setup_profile(CLI::App& app, Action& action, const std::string& command) {
    auto o = std::make_shared<ProfileOptions>();
    CLI::App* cmd = app.add_subcommand("profile", "Measure this machine's devices and links, and write a cluster.toml");
    cmd->add_option("--out", o->out, "write the measured cluster.toml there (atomically)");
    cmd->add_option("--name", o->name, "the cluster's name in --out (default: this host's name)");
    cmd->add_option("--csv", o->csv, "write every figure there: key,status,figure,value,unit,reason");
    cmd->add_flag("--list", o->list, "list the probes (key and description) and exit");
    cmd->add_option("-t,--test", o->keys, "run this probe (repeatable)");
    cmd->add_option("-p,--prefix", o->prefixes, "run the probes whose key starts with this (repeatable)");
    cmd->add_option("--repeats", o->repeats, "timed repeats per figure after one warm-up; the median is reported")
        ->check(CLI::Range(1, 1000))
        ->capture_default_str();
    cmd->add_option("--scale", o->scale, "problem sizes relative to the defaults")
        ->check(CLI::Range(0.001, 100.0))
        ->check(finite_number)
        ->capture_default_str();
    cmd->footer(
        "Probes that cannot run here are waived with the reason; one failing never stops the others.\n"
        "Examples:\n"
        "  dpart profile --list\n"
        "  dpart profile --out plans/clusters/this-host.toml --csv profile.csv\n"
        "  dpart profile -p cpu. --repeats 9\n"
        "Exit code 1 when a probe failed (the others still ran and were written).");
    cmd->callback([o, &action, command] { action = [o, command] { return run_profile(*o, command); }; });
}

}  // namespace dpart::cli
