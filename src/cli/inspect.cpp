// dpart inspect: what every layer of a model costs, and what a cluster holds.
#include <fmt/format.h>

#include <map>
#include <optional>

#include "commands.hpp"
#include "dpart/core/format.hpp"
#include "dpart/cost/cost_model.hpp"
#include "dpart/io/cluster_toml.hpp"
#include "dpart/io/csv.hpp"
#include "dpart/io/model_toml.hpp"
#include "dpart/report/text_table.hpp"

namespace dpart::cli {
namespace {

struct InspectOptions {
    std::string model;
    std::string cluster;
    std::string csv;
    bool quiet = false;
};

/// Bytes of training state per parameter: bf16/fp16 weights and gradients, fp32 master
/// weights and two Adam moments (2 + 2 + 4 + 4 + 4); fp32 training keeps 4 + 4 + 4 + 4.
const std::uint64_t adam_bytes_per_param = CostOptions{}.bytes_per_param;

std::string flops_text(std::uint64_t flops) { return flops == 0 ? "0" : si(static_cast<double>(flops)); }

void print_model(const Model& m) {
    TextTable table({{"#", Align::right},
                     {"name", Align::left},
                     {"op", Align::left},
                     {"output", Align::left},
                     {"params", Align::right},
                     {"fwd FLOP", Align::right},
                     {"bwd FLOP", Align::right},
                     {"out", Align::right},
                     {"saved", Align::right}});
    for (std::size_t i = 0; i < m.layers.size(); ++i) {
        const Layer& l = m.layers[i];
        std::string name = l.name;
        if (const auto* linear = std::get_if<LinearOp>(&l.op); linear && linear->tied_to)
            name += " (tied to " + m.layers[*linear->tied_to].name + ")";
        const MlpOp* mlp = std::get_if<MlpOp>(&l.op);
        if (const auto* block = std::get_if<TransformerBlockOp>(&l.op)) mlp = &block->mlp;
        if (mlp != nullptr && mlp->experts > 1)
            name += fmt::format(" ({} experts, top-{})", mlp->experts, mlp->experts_per_token);
        table.add_row({std::to_string(i), name, op_name(l.op), to_string(l.out_shape), with_commas(l.cost.params),
                       flops_text(l.cost.fwd_flops), flops_text(l.cost.bwd_flops),
                       bytes_iec(static_cast<double>(l.cost.out_bytes)),
                       bytes_iec(static_cast<double>(l.cost.saved_bytes))});
    }
    const LayerCost t = m.total();
    table.add_rule();
    table.add_row({"", "total", "", "", with_commas(t.params), flops_text(t.fwd_flops), flops_text(t.bwd_flops), "",
                   bytes_iec(static_cast<double>(t.saved_bytes))});

    fmt::print("model {}: {} layers, {}, global batch {}, input {} per sample\n\n", m.name, m.layers.size(),
               to_string(m.dtype), m.global_batch, to_string(m.input_shape));
    fmt::print("{}\n", table.str());
    fmt::print("FLOP, out and saved are per sample; FLOP counts matrix products (2 per multiply-add).\n");
    fmt::print("parameters: {} ({})\n", with_commas(t.params), si(static_cast<double>(t.params)));
    const double batch = static_cast<double>(m.global_batch);
    fmt::print("per iteration ({} samples): forward {}FLOP, backward {}FLOP, total {}FLOP\n", m.global_batch,
               si(static_cast<double>(t.fwd_flops) * batch), si(static_cast<double>(t.bwd_flops) * batch),
               si((static_cast<double>(t.fwd_flops) + static_cast<double>(t.bwd_flops)) * batch));
    const double weights = static_cast<double>(t.params) * static_cast<double>(dtype_bytes(m.dtype));
    const double state = static_cast<double>(t.params) * static_cast<double>(adam_bytes_per_param);
    fmt::print("memory: weights {} ({}), training state {} ({} B per parameter with Adam), activations saved {} "
               "per sample\n",
               bytes_iec(weights), to_string(m.dtype), bytes_iec(state), adam_bytes_per_param,
               bytes_iec(static_cast<double>(t.saved_bytes)));
    // What dpart run keeps on one device (dpart plan --precision plans for it), as the planner
    // counts it: a tied head with its own copy of the embedding's weights.
    std::uint64_t held = 0;
    for (const Layer& l : m.layers) held += held_params(l, m.dtype);
    const auto run_state = [&](DType d) {
        return bytes_iec(static_cast<double>(state_bytes(held, run_state_options({}, d), d, 1)));
    };
    fmt::print("dpart run keeps {} in fp32 (16 B per parameter), {} in bf16 (18 B: a bf16 copy of the weights beside "
               "fp32 master weights, gradients and moments){}\n",
               run_state(DType::fp32), run_state(DType::bf16),
               held != t.params ? fmt::format(", counting the tied head's own copy of {} parameters",
                                              with_commas(held - t.params))
                                : std::string());
}

void print_cluster(const Cluster& c) {
    std::size_t populated = 0;
    for (const Node& n : c.nodes) populated += n.devices.empty() ? 0 : 1;
    fmt::print("cluster {}: {} device{} on {} node{}\n\n", c.name, c.devices.size(), c.devices.size() == 1 ? "" : "s",
               populated, populated == 1 ? "" : "s");

    // Devices grouped by identical figures, so that 1024 GPUs read as one line.
    struct Group {
        std::size_t count = 0;
        std::size_t nodes = 0;
        std::vector<std::pair<std::size_t, std::size_t>> runs;  ///< [first, last] device indices in order
        std::size_t last_node = static_cast<std::size_t>(-1);
    };
    std::map<std::tuple<std::string, double, double, double>, Group> groups;
    double total_tflops = 0;
    double total_gib = 0;
    for (std::size_t i = 0; i < c.devices.size(); ++i) {
        const Device& d = c.devices[i];
        Group& g = groups[{d.kind, d.tflops, d.mem_gib, d.mem_bw_gbs}];
        if (!g.runs.empty() && g.runs.back().second + 1 == i) g.runs.back().second = i;
        else g.runs.push_back({i, i});
        ++g.count;
        if (d.node != g.last_node) ++g.nodes;
        g.last_node = d.node;
        total_tflops += d.tflops;
        total_gib += d.mem_gib;
    }
    // A group's names as runs of consecutive devices ("a0 .. a3, a8 .. a11"), the first three.
    auto names = [&](const Group& g) {
        std::string out;
        for (std::size_t r = 0; r < g.runs.size() && r < 3; ++r) {
            const auto& [first, last] = g.runs[r];
            if (r > 0) out += ", ";
            out += c.devices[first].name;
            if (last > first) out += (last == first + 1 ? ", " : " .. ") + c.devices[last].name;
        }
        if (g.runs.size() > 3) out += fmt::format(" and {} more runs", g.runs.size() - 3);
        return out;
    };
    TextTable table({{"devices", Align::right},
                     {"kind", Align::left},
                     {"names", Align::left},
                     {"TFLOP/s", Align::right},
                     {"memory GiB", Align::right},
                     {"mem GB/s", Align::right}});
    for (const auto& [key, g] : groups) {
        const auto& [kind, tflops, gib, bw] = key;
        table.add_row({std::to_string(g.count), kind.empty() ? "-" : kind,
                       names(g), fmt::format("{:g}", tflops),
                       fmt::format("{:g}", gib), fmt::format("{:g}", bw)});
    }
    fmt::print("{}\n", table.str());
    fmt::print("total: {:g} TFLOP/s, {:g} GiB\n", total_tflops, total_gib);
    auto link_text = [](const std::optional<LinkSpec>& l) {
        return l ? fmt::format("{:g} GB/s, {:g} us", l->gbs, l->latency_us) : std::string("not given");
    };
    fmt::print("links: intra-node {}; inter-node {}", link_text(c.intra_default), link_text(c.inter_default));
    std::size_t node_overrides = 0;
    for (const Node& n : c.nodes) node_overrides += n.intra ? 1 : 0;
    if (node_overrides > 0) fmt::print("; {} node(s) with their own intra-node link", node_overrides);
    if (!c.overrides.empty()) fmt::print("; {} [[link]] override(s)", c.overrides.size());
    if (!c.node_overrides.empty()) fmt::print("; {} link(s) between nodes", c.node_overrides.size());
    fmt::print("\n");
}

void write_layer_csv(const Model& m, const std::string& path) {
    CsvTable csv({"index", "name", "op", "params", "fwd_flops", "bwd_flops", "out_bytes"});
    for (std::size_t i = 0; i < m.layers.size(); ++i) {
        const Layer& l = m.layers[i];
        csv.add_row({std::to_string(i), l.name, op_name(l.op), std::to_string(l.cost.params),
                     std::to_string(l.cost.fwd_flops), std::to_string(l.cost.bwd_flops),
                     std::to_string(l.cost.out_bytes)});
    }
    csv.write(path);
}

int run_inspect(const InspectOptions& o) {
    if (o.model.empty() && o.cluster.empty()) throw InputError("give a MODEL file, a --cluster file, or both");
    if (!o.csv.empty() && o.model.empty()) throw InputError("--csv writes the per-layer table of a MODEL: give one");
    // Load both before printing anything, so that a bad file produces only its error.
    std::optional<Model> model;
    std::optional<Cluster> cluster;
    if (!o.model.empty()) model = load_model(o.model);
    if (!o.cluster.empty()) cluster = load_cluster(o.cluster);
    if (model && !o.quiet) print_model(*model);
    if (model && cluster && !o.quiet) fmt::print("\n");
    if (cluster && !o.quiet) print_cluster(*cluster);
    if (model && !o.csv.empty()) write_layer_csv(*model, o.csv);
    return 0;
}

}  // namespace

void setup_inspect(CLI::App& app, Action& action) {
    auto opts = std::make_shared<InspectOptions>();
    CLI::App* cmd = app.add_subcommand(
        "inspect", "Validate a model and/or cluster file and show what every layer costs");
    cmd->add_option("model", opts->model,
                    "model.toml: per-layer parameters, FLOPs (forward, backward) and activation bytes, per sample");
    cmd->add_option("--cluster,-c", opts->cluster, "cluster.toml: devices grouped by kind, totals, link defaults");
    cmd->add_option("--csv", opts->csv,
                    "write the per-layer table to this CSV file (columns index,name,op,params,fwd_flops,bwd_flops,"
                    "out_bytes; per sample), atomically");
    cmd->add_flag("--quiet,-q", opts->quiet, "print nothing; only validate (and write --csv)");
    cmd->footer(
        "Examples:\n"
        "  dpart inspect plans/models/gpt2-small.toml\n"
        "  dpart inspect plans/models/llama3-8b.toml --csv llama3-8b-layers.csv\n"
        "  dpart inspect --cluster plans/clusters/h100-4x8.toml\n"
        "  dpart inspect -q plans/models/vgg16.toml -c plans/clusters/dgx-h100.toml   # validate both");
    cmd->callback([opts, &action] { action = [opts] { return run_inspect(*opts); }; });
}

}  // namespace dpart::cli
