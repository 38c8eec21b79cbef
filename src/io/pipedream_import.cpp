#include "dpart/io/pipedream_import.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <filesystem>
#include <queue>
#include <unordered_map>

#include "dpart/core/format.hpp"
#include "dpart/io/input_file.hpp"
#include "dpart/io/model_toml.hpp"

namespace dpart {
namespace {

using u64 = std::uint64_t;

struct ProfileNode {
    std::string id;
    std::string description;
    double fwd_ms = 0;
    double bwd_ms = 0;
    double activation_bytes = 0;  ///< summed when the node has several outputs ("[a; b]")
    double parameter_bytes = 0;
    std::uint32_t line = 0;
    std::vector<std::size_t> inputs;  ///< edge order
    std::vector<std::size_t> outputs;
    bool dropped = false;
};

std::vector<std::string_view> split(std::string_view s, std::string_view sep) {
    std::vector<std::string_view> parts;
    std::size_t start = 0;
    while (true) {
        const std::size_t at = s.find(sep, start);
        parts.push_back(s.substr(start, at == std::string_view::npos ? std::string_view::npos : at - start));
        if (at == std::string_view::npos) return parts;
        start = at + sep.size();
    }
}

std::string_view trim(std::string_view s) {
    while (!s.empty() && (s.front() == ' ' || s.front() == '\t' || s.front() == '\r')) s.remove_prefix(1);
    while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
    return s;
}

class Parser {
public:
    Parser(std::string_view text, std::string file) : text_(text), file_(std::move(file)) {}

    std::vector<ProfileNode> parse() {
        std::uint32_t line_no = 0;
        std::size_t start = 0;
        bool edges_seen = false;
        while (start <= text_.size()) {
            const std::size_t end = text_.find('\n', start);
            const std::string_view line =
                text_.substr(start, end == std::string_view::npos ? std::string_view::npos : end - start);
            ++line_no;
            start = end == std::string_view::npos ? text_.size() + 1 : end + 1;
            if (trim(line).empty()) continue;
            if (line.front() == '\t') {
                edge(line, line_no);
                edges_seen = true;
            } else {
                if (edges_seen) fail(line_no, 1, "a node line after the edge lines: PipeDream lists every node first");
                node(line, line_no);
            }
        }
        if (nodes_.empty()) fail(0, 0, "no node lines: not a PipeDream graph.txt");
        return std::move(nodes_);
    }

private:
    [[noreturn]] void fail(std::uint32_t line, std::uint32_t column, const std::string& message) const {
        throw InputError(SourceLocation{file_, line, column}, message);
    }

    double number(std::string_view field, std::string_view key, std::uint32_t line, std::uint32_t column) const {
        const auto eq = field.find('=');
        if (eq == std::string_view::npos || trim(field.substr(0, eq)) != key)
            fail(line, column, fmt::format("expected {}=<number>, got \"{}\"", key, field));
        std::string_view value = trim(field.substr(eq + 1));
        double sum = 0;
        // Several outputs: "[a; b]", summed as PipeDream's Node.from_str does.
        const bool list = !value.empty() && value.front() == '[';
        if (list) {
            if (value.back() != ']') fail(line, column, fmt::format("{}: unterminated list \"{}\"", key, value));
            value = value.substr(1, value.size() - 2);
        }
        for (std::string_view part : list ? split(value, ";") : std::vector<std::string_view>{value}) {
            part = trim(part);
            double v = 0;
            const auto [ptr, ec] = std::from_chars(part.data(), part.data() + part.size(), v);
            if (ec != std::errc{} || ptr != part.data() + part.size() || !std::isfinite(v))
                fail(line, column, fmt::format("{}: \"{}\" is not a number", key, part));
            if (v < 0) fail(line, column, fmt::format("{} must not be negative, got {}", key, part));
            sum += v;
        }
        return sum;
    }

    void node(std::string_view line, std::uint32_t line_no) {
        const auto parts = split(trim(line), " -- ");
        if (parts.size() < 3 || parts.size() > 4)
            fail(line_no, 1,
                 "a node line is \"nodeN -- <description> -- forward_compute_time=..., "
                 "backward_compute_time=..., activation_size=..., parameter_size=...\"");
        ProfileNode n;
        n.id = std::string(trim(parts[0]));
        n.description = std::string(trim(parts[1]));
        n.line = line_no;
        if (n.id.empty()) fail(line_no, 1, "a node needs an id");
        const auto fields = split(parts[2], ", ");
        if (fields.size() != 4)
            fail(line_no, column_of(line, parts[2]),
                 fmt::format("node {}: expected 4 comma-separated measurements, got {}", n.id, fields.size()));
        static constexpr std::string_view keys[] = {"forward_compute_time", "backward_compute_time", "activation_size",
                                                    "parameter_size"};
        double values[4];
        for (std::size_t i = 0; i < 4; ++i) values[i] = number(fields[i], keys[i], line_no, column_of(line, fields[i]));
        n.fwd_ms = values[0];
        n.bwd_ms = values[1];
        n.activation_bytes = values[2];
        n.parameter_bytes = values[3];
        if (!index_.emplace(n.id, nodes_.size()).second)
            fail(line_no, 1,
                 fmt::format("node {} is defined twice (first at line {})", n.id, nodes_[index_[n.id]].line));
        nodes_.push_back(std::move(n));
    }

    void edge(std::string_view line, std::uint32_t line_no) {
        const auto parts = split(trim(line), " -- ");
        if (parts.size() != 2) fail(line_no, 2, "an edge line is \"\\tnodeA -- nodeB\"");
        std::size_t ends[2];
        for (std::size_t i = 0; i < 2; ++i) {
            const auto it = index_.find(std::string(trim(parts[i])));
            if (it == index_.end())
                fail(line_no, column_of(line, parts[i]),
                     fmt::format("edge names node {}, which no node line defines", parts[i]));
            ends[i] = it->second;
        }
        if (ends[0] == ends[1]) fail(line_no, 2, fmt::format("node {} has an edge to itself", parts[0]));
        const std::vector<std::size_t>& inputs = nodes_[ends[1]].inputs;
        if (std::find(inputs.begin(), inputs.end(), ends[0]) != inputs.end())
            fail(line_no, 2, fmt::format("the edge {} -- {} is given twice", trim(parts[0]), trim(parts[1])));
        nodes_[ends[1]].inputs.push_back(ends[0]);
        nodes_[ends[0]].outputs.push_back(ends[1]);
    }

    [[nodiscard]] std::uint32_t column_of(std::string_view line, std::string_view part) const {
        return static_cast<std::uint32_t>(part.data() - line.data() + 1);
    }

    std::string_view text_;
    std::string file_;
    std::vector<ProfileNode> nodes_;
    std::unordered_map<std::string, std::size_t> index_;
};

/// "node12" -> 12, for ordering; ids without a number sort after.
u64 id_number(const std::string& id) {
    std::size_t i = id.size();
    while (i > 0 && std::isdigit(static_cast<unsigned char>(id[i - 1]))) --i;
    if (i == id.size()) return UINT64_MAX;
    u64 v = 0;
    const auto [ptr, ec] = std::from_chars(id.data() + i, id.data() + id.size(), v);
    return ec == std::errc{} ? v : UINT64_MAX;
}

/// A topological order of the kept nodes, smallest node number first among the ready ones
/// (PipeDream's profiler numbers nodes in execution order).
std::vector<std::size_t> topological_order(const std::vector<ProfileNode>& nodes, const std::string& file) {
    std::vector<std::size_t> pending(nodes.size(), 0);
    using Key = std::tuple<u64, std::string, std::size_t>;
    std::priority_queue<Key, std::vector<Key>, std::greater<>> ready;
    std::size_t kept = 0;
    for (std::size_t i = 0; i < nodes.size(); ++i) {
        if (nodes[i].dropped) continue;
        ++kept;
        for (std::size_t j : nodes[i].inputs) pending[i] += nodes[j].dropped ? 0 : 1;
        if (pending[i] == 0) ready.emplace(id_number(nodes[i].id), nodes[i].id, i);
    }
    std::vector<std::size_t> order;
    while (!ready.empty()) {
        const std::size_t i = std::get<2>(ready.top());
        ready.pop();
        order.push_back(i);
        for (std::size_t j : nodes[i].outputs)
            if (!nodes[j].dropped && --pending[j] == 0) ready.emplace(id_number(nodes[j].id), nodes[j].id, j);
    }
    if (order.size() != kept) {
        for (std::size_t i = 0; i < nodes.size(); ++i)
            if (!nodes[i].dropped && pending[i] > 0)
                throw InputError(SourceLocation{file, nodes[i].line, 1},
                                 fmt::format("node {} is on a cycle: a profile is a DAG", nodes[i].id));
    }
    return order;
}

/// A number as TOML writes it back to the same double.
std::string exact(double v) {
    std::string s = fmt::format("{}", v);
    if (s.find_first_of(".eE") == std::string::npos) s += ".0";
    return s;
}

/// Comments hold free text from the profile: one line, no control characters.
std::string comment_text(std::string s) {
    for (char& c : s)
        if (static_cast<unsigned char>(c) < 0x20) c = ' ';
    return s;
}

}  // namespace

PipeDreamImport import_pipedream_text(std::string_view text, const std::string& path,
                                      const PipeDreamImportOptions& options, const Meta& meta) {
    if (options.batch == 0) throw InputError("--batch must be positive");
    std::vector<ProfileNode> nodes = Parser(text, path).parse();
    PipeDreamImport r;
    r.nodes = nodes.size();

    // As PipeDream's optimizer does: sources named Input* are the data loader, not a layer (it
    // zeroes and removes them); sinks named __getitem__* are unused tuple accesses.
    std::vector<std::string> dropped;
    for (ProfileNode& n : nodes) {
        if (n.inputs.empty() && n.description.rfind("Input", 0) == 0) {
            n.dropped = true;
            dropped.push_back(fmt::format("{} ({}, forward {} ms)", n.id, n.description, exact(n.fwd_ms)));
        }
    }
    for (ProfileNode& n : nodes) {
        bool sink = true;
        for (std::size_t o : n.outputs) sink = sink && nodes[o].dropped;
        if (!n.dropped && sink && n.description.rfind("__getitem__", 0) == 0) {
            n.dropped = true;
            dropped.push_back(fmt::format("{} ({})", n.id, n.description));
        }
    }
    r.dropped = dropped.size();
    const std::vector<std::size_t> order = topological_order(nodes, path);
    if (order.empty()) throw InputError(SourceLocation{path}, "no layers left once the Input nodes are dropped");
    std::vector<std::string> sources;
    for (std::size_t i : order) {
        bool source = true;
        for (std::size_t j : nodes[i].inputs) source = source && nodes[j].dropped;
        if (source) sources.push_back(nodes[i].id);
    }
    if (sources.size() > 1)
        throw InputError(SourceLocation{path, nodes[order[1]].line, 1},
                         fmt::format("{} nodes read only the input ({}, ...): a dpart model has one first layer, and "
                                     "PipeDream's optimizer plans from one source",
                                     sources.size(), sources[0]));

    const u64 e = dtype_bytes(options.dtype);
    const std::string name = options.name.empty() ? std::filesystem::path(path).stem().string() : options.name;
    std::string body = "[model]\n";
    body += fmt::format("name = {}\ndtype = \"{}\"\nglobal_batch = {}\n\n", toml_string(name), to_string(options.dtype),
                        options.batch);
    body += "[measured]\n";
    body += fmt::format("batch = {}\ndevice = {}\n", options.batch, toml_string(options.device));
    if (options.tflops > 0) body += fmt::format("tflops = {}\n", exact(options.tflops));

    std::vector<std::size_t> position(nodes.size(), SIZE_MAX);
    for (std::size_t k = 0; k < order.size(); ++k) position[order[k]] = k;
    std::size_t rounded = 0;
    for (std::size_t k = 0; k < order.size(); ++k) {
        const ProfileNode& n = nodes[order[k]];
        const double params = n.parameter_bytes / static_cast<double>(e);
        if (params != std::floor(params) || params >= 1.8e19)
            throw InputError(SourceLocation{path, n.line, 1},
                             fmt::format("node {}: parameter_size {} is not a whole number of {}-byte parameters "
                                         "(give --dtype)",
                                         n.id, exact(n.parameter_bytes), e));
        if (n.activation_bytes != std::floor(n.activation_bytes) || n.activation_bytes >= 1.8e19)
            throw InputError(SourceLocation{path, n.line, 1},
                             fmt::format("node {}: activation_size {} is not a whole number of bytes", n.id,
                                         exact(n.activation_bytes)));
        const u64 act = static_cast<u64>(n.activation_bytes);
        const u64 per_sample = (act + options.batch - 1) / options.batch;
        body += fmt::format("\n[[layer]]  # {}\nname = {}\nop = \"custom\"\n", comment_text(n.description),
                            toml_string(n.id));
        std::vector<std::size_t> kept;
        for (std::size_t j : n.inputs)
            if (!nodes[j].dropped) kept.push_back(j);
        // The default input is the previous layer; anything else is listed.
        if (!kept.empty() && !(kept.size() == 1 && position[kept[0]] + 1 == k)) {
            std::string list;
            for (std::size_t i = 0; i < kept.size(); ++i) list += (i ? ", " : "") + toml_string(nodes[kept[i]].id);
            body += fmt::format("inputs = [{}]\n", list);
        }
        body += fmt::format("fwd_ms = {}\nbwd_ms = {}\nparams = {}\nout_bytes = {}", exact(n.fwd_ms), exact(n.bwd_ms),
                            static_cast<u64>(params), per_sample);
        if (per_sample * options.batch != act) {
            ++rounded;
            body += fmt::format("  # {} bytes per minibatch of {}, rounded up", act, options.batch);
        }
        body += "\n";
    }

    std::string header = meta_toml(meta);
    header += fmt::format(
        "# Imported from a PipeDream profile ({} nodes): one measured custom layer per node, named\n"
        "# as in the profile, in a topological order (lowest node number first).\n",
        r.nodes);
    header += fmt::format(
        "# fwd_ms, bwd_ms: the profile's times for one minibatch of {} samples on the reference "
        "device ([measured]);\n# params = parameter_size / {}; out_bytes = activation_size / {} "
        "(per sample).\n",
        options.batch, e, options.batch);
    if (options.batch == 1)
        header += "# The profile does not record its batch size: here the minibatch is one sample (--batch to say).\n";
    if (rounded > 0)
        header += fmt::format("# {} activation sizes are not a whole number of bytes per sample and were rounded up.\n",
                              rounded);
    for (const std::string& d : dropped)
        header += fmt::format("# Left out as PipeDream's optimizer does: {}.\n", comment_text(d));
    r.toml = header + "\n" + body;
    r.model = parse_imported_model(r.toml, path);
    return r;
}

PipeDreamImport import_pipedream(const std::string& path, const PipeDreamImportOptions& options, const Meta& meta) {
    return import_pipedream_text(read_input_file(path), path, options, meta);
}

}  // namespace dpart
