// dpart compare: runs and replays side by side, from their iterations.csv files.
#include <fmt/format.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>

#include "commands.hpp"
#include "dpart/io/csv.hpp"
#include "dpart/io/toml_reader.hpp"
#include "dpart/io/trace.hpp"
#include "dpart/report/compare.hpp"
#include "dpart/report/text_table.hpp"

namespace dpart::cli {
namespace {

struct CompareOptions {
    std::vector<std::string> inputs;
    std::string baseline;
    std::string csv;
    bool markdown = false;
};

struct RunRow {
    std::string name;
    std::string path;  ///< its iterations.csv
    RunSummary summary;
    std::uint64_t repartitions = 0;
    double excess_ms = 0;  ///< time above the run's median pace: sum of max(0, iteration - p50)
    std::optional<std::string> stopped;  ///< why it stopped before its last iteration (summary.toml)
};

/// A run directory's iterations.csv, or the CSV itself; its name is the directory's (`.` and
/// `..` resolved).
std::pair<std::string, std::string> resolve(const std::string& input) {
    namespace fs = std::filesystem;
    const fs::path p(input);
    std::error_code ec;  // a name the system refuses (too long) is then read as a file, and named so
    fs::path whole = fs::absolute(p, ec).lexically_normal();
    if (ec) whole = p;
    auto last = [](const fs::path& x) {
        return x.has_filename() ? x.filename().string() : x.parent_path().filename().string();
    };
    if (fs::is_directory(p, ec)) return {(p / "iterations.csv").string(), last(whole)};
    const std::string name = p.filename() == "iterations.csv" ? last(whole.parent_path()) : p.stem().string();
    return {input, name};
}

/// Why the run or replay whose iterations.csv is `csv` stopped early, as the summary.toml beside
/// it says (`stopped`, `stop_reason`); nullopt when it did not, when there is no summary.toml, or
/// when `csv` is not a run's iterations.csv (another CSV's neighbour is not its summary).
std::optional<std::string> stop_of(const std::string& csv) {
    namespace fs = std::filesystem;
    if (fs::path(csv).filename() != "iterations.csv") return std::nullopt;
    const fs::path summary = fs::path(csv).parent_path() / "summary.toml";
    std::error_code ec;
    if (!fs::is_regular_file(summary, ec)) return std::nullopt;
    const toml::table doc = parse_toml_file(summary.string());
    const toml::table* table = doc["summary"].as_table();
    if (table == nullptr) return std::nullopt;
    const toml::node* stopped = table->get("stopped");
    if (stopped == nullptr) return std::nullopt;
    if (!stopped->is_boolean())
        throw InputError(location_of(*stopped, summary.string()), "[summary] stopped: expected true or false");
    if (!stopped->as_boolean()->get()) return std::nullopt;
    const toml::node* reason = table->get("stop_reason");
    if (reason != nullptr && !reason->is_string())
        throw InputError(location_of(*reason, summary.string()), "[summary] stop_reason: expected a string");
    return reason != nullptr ? reason->as_string()->get() : std::string("no reason given");
}

RunRow load_run(const std::string& input) {
    const auto [path, name] = resolve(input);
    const RunComparison c = summarise_iterations(read_csv(path, iteration_columns()));
    return RunRow{name, path, c.summary, c.repartitions, c.excess_ms, stop_of(path)};
}

/// Whether two paths name the same file.
bool same_file(const std::string& a, const std::string& b) {
    std::error_code ec;
    return std::filesystem::equivalent(a, b, ec) && !ec;
}

/// The run --baseline names: the one whose file it is, else the one of that name (refused when
/// several runs have it).
std::size_t baseline_of(const std::vector<RunRow>& runs, const std::string& baseline) {
    const auto [file, name] = resolve(baseline);
    for (std::size_t i = 0; i < runs.size(); ++i)
        if (same_file(runs[i].path, file)) return i;
    std::vector<std::size_t> named;
    for (std::size_t i = 0; i < runs.size(); ++i)
        if (runs[i].name == baseline || runs[i].name == name) named.push_back(i);
    if (named.empty()) throw InputError(fmt::format("--baseline {} is none of the runs given", baseline));
    if (named.size() > 1)
        throw InputError(fmt::format("--baseline {}: {} runs are named \"{}\"; give the baseline's path",
                                     baseline, named.size(), runs[named.front()].name));
    return named.front();
}

/// A Markdown table cell: a `|` in it would end the cell.
std::string markdown_cell(const std::string& text) {
    std::string out;
    for (char c : text) {
        if (c == '|') out += '\\';
        out += c;
    }
    return out;
}

const std::vector<std::string>& compare_columns() {
    static const std::vector<std::string> c{"run",   "iterations", "mean_ms",      "p50_ms",   "p99_ms",
                                            "samples_per_s", "speedup", "repartitions", "excess_ms"};
    return c;
}

int run_compare(const CompareOptions& o) {
    if (o.inputs.size() < 1) throw InputError("give at least one iterations.csv (or a run directory)");
    std::vector<RunRow> runs;
    for (const std::string& in : o.inputs) {
        runs.push_back(load_run(in));
        for (std::size_t i = 0; i + 1 < runs.size(); ++i)
            if (same_file(runs[i].path, runs.back().path))
                throw InputError(SourceLocation{runs.back().path},
                                 fmt::format("this run is given twice ({} and {})", o.inputs[i], in));
    }
    const std::size_t base = o.baseline.empty() ? 0 : baseline_of(runs, o.baseline);
    // Runs of the same name (two directories called run/) are told apart by the paths given.
    std::map<std::string, std::size_t> uses;
    for (const RunRow& r : runs) ++uses[r.name];
    for (std::size_t k = 0; k < runs.size(); ++k)
        if (uses[runs[k].name] > 1) runs[k].name = o.inputs[k];
    CsvTable csv(compare_columns());
    std::vector<std::vector<std::string>> table;  // the same rows, for the printed table
    for (const RunRow& r : runs)
        table.push_back({r.name, std::to_string(r.summary.iterations), fmt::format("{:.6g}", r.summary.mean_iteration_ms),
                     fmt::format("{:.6g}", r.summary.p50_iteration_ms), fmt::format("{:.6g}", r.summary.p99_iteration_ms),
                     fmt::format("{:.6g}", r.summary.samples_per_s),
                     fmt::format("{:.3f}", runs[base].summary.mean_iteration_ms / r.summary.mean_iteration_ms),
                     std::to_string(r.repartitions), fmt::format("{:.6g}", r.excess_ms)});
    for (const auto& row : table) csv.add_row(row);
    if (o.markdown) {
        std::string line = "|";
        for (const auto& c : compare_columns()) line += " " + c + " |";
        fmt::print("{}\n|", line);
        for (std::size_t i = 0; i < compare_columns().size(); ++i) fmt::print(" --- |");
        fmt::print("\n");
        for (const auto& row : table) {
            std::string out = "|";
            for (const auto& cell : row) out += " " + markdown_cell(cell) + " |";
            fmt::print("{}\n", out);
        }
    } else {
        std::vector<TextTable::Column> cols;
        for (std::size_t i = 0; i < compare_columns().size(); ++i)
            cols.push_back({compare_columns()[i], i == 0 ? Align::left : Align::right});
        TextTable t(cols);
        for (const auto& row : table) t.add_row(row);
        fmt::print("{}", t.str());
        fmt::print("speedup = baseline ({}) mean / run mean; excess = time above the run's median iteration\n",
                   runs[base].name);
    }
    // A run that stopped early is averaged over the iterations it ran: say so.
    for (const RunRow& r : runs)
        if (r.stopped)
            fmt::print("{}{} stopped after {} iterations: {}\n", o.markdown ? "\n" : "", r.name, r.summary.iterations,
                       *r.stopped);
    if (!o.csv.empty()) csv.write(o.csv);
    return 0;
}

}  // namespace

void setup_compare(CLI::App& app, Action& action) {
    auto o = std::make_shared<CompareOptions>();
    CLI::App* cmd = app.add_subcommand("compare", "Put runs and replays side by side (their iterations.csv)");
    cmd->add_option("runs", o->inputs, "iterations.csv files or the directories holding them")->required();
    cmd->add_option("--baseline,-b", o->baseline, "the run speedups are relative to (default: the first)");
    cmd->add_option("--csv", o->csv, "write the table to this CSV file (atomically)");
    cmd->add_flag("--markdown", o->markdown, "print the table as Markdown");
    cmd->footer(
        "Examples:\n"
        "  dpart compare replay-static/ replay-slow/ --baseline replay-static\n"
        "  dpart compare a/iterations.csv b/iterations.csv --markdown --csv compare.csv");
    cmd->callback([o, &action] { action = [o] { return run_compare(*o); }; });
}

}  // namespace dpart::cli
