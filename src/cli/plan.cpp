// dpart plan: the best partition of a model across a cluster, explained.
#include <fmt/format.h>

#include <algorithm>
#include <memory>

#include "commands.hpp"
#include "dpart/core/format.hpp"
#include "dpart/io/atomic_file.hpp"
#include "dpart/io/cluster_toml.hpp"
#include "dpart/io/model_toml.hpp"
#include "dpart/io/plan_toml.hpp"
#include "dpart/plan/pipedream.hpp"
#include "dpart/plan/solver.hpp"
#include "dpart/report/text_table.hpp"

namespace dpart::cli {
namespace {

struct PlanOptions {
    std::string model;
    std::string cluster;
    std::string objective = "iteration";
    std::string schedule = "1f1b";
    std::string microbatch_size = "auto";
    std::string microbatches = "auto";
    std::uint64_t max_replicas = 0;
    std::uint32_t max_tp = 8;
    std::string strategy = "optimal";
    std::string out;
    std::string csv;
    std::optional<std::uint64_t> bytes_per_param;  ///< default 16
    std::string precision;  ///< --precision: plan for dpart run computing in it
    bool shard_optimizer = false;
    bool recompute = false;
    bool fused_attention = false;
    bool vocab_parallel = false;
    bool overlap_allreduce = false;
    bool compare = false;
    bool quiet = false;
    std::size_t threads = 0;  ///< --threads: the DP's threads (0 = one per core this process may run on)
    std::string layer_times;  ///< --layer-times: measured layer costs (dpart profile --model)
    // --cost-model pipedream: PipeDream's planner on N identical workers, no cluster file.
    std::string cost_model = "analytical";
    std::size_t workers = 0;
    double bandwidth_bytes = 0;
    bool straight_pipeline = false;
    double memory_bytes = 0;
};

std::uint64_t parse_auto(const std::string& value, const std::string& flag) {
    if (value == "auto") return 0;
    std::uint64_t v = 0;
    std::size_t used = 0;
    try {
        v = std::stoull(value, &used);
    } catch (const std::exception&) {
        used = 0;
    }
    if (used != value.size() || v == 0 || value[0] == '-')
        throw InputError(fmt::format("{} must be a positive integer or \"auto\", got \"{}\"", flag, value));
    return v;
}

Strategy parse_strategy(const std::string& s) {
    if (s == "uniform") return Strategy::uniform;
    if (s == "parameters") return Strategy::parameters;
    if (s == "time") return Strategy::time;
    if (s == "data-parallel") return Strategy::data_parallel;
    return Strategy::optimal;
}

/// "dgx0.gpu0 .. dgx0.gpu3" for a run of consecutive devices, else the names (first few).
std::string device_range(const Cluster& c, const std::vector<std::size_t>& devices) {
    bool consecutive = true;
    for (std::size_t i = 1; i < devices.size(); ++i) consecutive = consecutive && devices[i] == devices[i - 1] + 1;
    if (devices.size() == 1) return c.devices[devices[0]].name;
    if (consecutive) return c.devices[devices.front()].name + " .. " + c.devices[devices.back()].name;
    std::string out;
    for (std::size_t i = 0; i < devices.size() && i < 3; ++i) out += (i ? ", " : "") + c.devices[devices[i]].name;
    if (devices.size() > 3) out += fmt::format(", +{}", devices.size() - 3);
    return out;
}

/// Milliseconds for tables: four significant digits, one decimal from 100 ms up.
std::string msf(double seconds) {
    const double ms = seconds * 1e3;
    return ms >= 100 ? fmt::format("{:.1f}", ms) : fmt::format("{:.4g}", ms);
}

void print_plan(const Plan& plan, const PlanEstimate& est, const Model& model, const Cluster& cluster,
                const std::string& strategy) {
    fmt::print("plan for {} on {}: strategy {}, objective {}, schedule {}, {} microbatches of {} samples{}{}{}{}{}\n\n",
               model.name, cluster.name, strategy, to_string(plan.objective), to_string(plan.schedule),
               plan.microbatches, plan.microbatch_size, plan.recompute ? ", activations recomputed" : "",
               plan.shard_optimizer ? ", optimizer state sharded" : "",
               plan.fused_attention ? ", fused attention's memory" : "",
               plan.vocab_parallel ? ", vocabulary-parallel embedding" : "",
               plan.precision ? fmt::format(", for dpart run in {}", to_string(*plan.precision)) : std::string());
    TextTable t({{"stage", Align::right},
                 {"layers", Align::left},
                 {"devices", Align::left},
                 {"dp", Align::right},
                 {"tp", Align::right},
                 {"fwd ms", Align::right},
                 {"bwd ms", Align::right},
                 {"comm ms", Align::right},
                 {"stage ms", Align::right},
                 {"memory used / avail", Align::right},
                 {"util", Align::right},
                 {"", Align::left}});
    for (std::size_t s = 0; s < plan.stages.size(); ++s) {
        const Stage& st = plan.stages[s];
        const StageEstimate& e = est.stages[s];
        const std::string layers = st.first_layer == st.last_layer
                                       ? fmt::format("{} ({})", model.layers[st.first_layer].name, st.first_layer)
                                       : fmt::format("{} .. {} ({}-{})", model.layers[st.first_layer].name,
                                                     model.layers[st.last_layer].name, st.first_layer, st.last_layer);
        const double comm = e.send_activation_s + e.send_gradient_s + e.allreduce_s / static_cast<double>(plan.microbatches);
        const double util = static_cast<double>(plan.microbatches) * (e.forward_s + e.backward_s) / est.iteration_s;
        t.add_row({std::to_string(s), layers, device_range(cluster, st.devices), std::to_string(st.replicas()),
                   std::to_string(st.tp), msf(e.forward_s), msf(e.backward_s), msf(comm), msf(e.stage_s),
                   fmt::format("{} / {}", bytes_iec(static_cast<double>(e.memory.total())),
                               bytes_iec(static_cast<double>(e.capacity_bytes))),
                   fmt::format("{:.0f}%", util * 100), s == est.bottleneck_stage ? "<- bottleneck" : ""});
    }
    fmt::print("{}\n", t.str());
    std::size_t used = 0;
    double flops = 0;
    for (const auto& e : est.stages) flops += e.flops_per_iteration;
    for (const auto& st : plan.stages) used += st.devices.size();
    const double per_device = flops / static_cast<double>(used) / est.iteration_s / 1e12;
    fmt::print("predicted iteration {:.3f} ms ({} samples/s), bottleneck stage {} at {:.3f} ms per microbatch, "
               "bubble {:.1f}%\n",
               est.iteration_s * 1e3, si(est.samples_per_s), est.bottleneck_stage, est.bottleneck_s * 1e3,
               est.bubble_fraction * 100);
    if (flops > 0)
        fmt::print("devices used {} of {}; achieved {:.4g} TFLOP/s per device on average\n", used,
                   cluster.devices.size(), per_device);
    else  // measured layers (dpart import pipedream) carry times, not FLOP counts
        fmt::print("devices used {} of {}\n", used, cluster.devices.size());
    fmt::print("comm ms = activation and gradient transfers per microbatch + the all-reduce's share per microbatch\n");
}

void print_comparison(const Model& model, const Cluster& cluster, const CostModel& cost, const CostOptions& copt,
                      SolverOptions sopt, const SolveResult& optimal) {
    TextTable t({{"strategy", Align::left},
                 {"stages", Align::right},
                 {"iteration ms", Align::right},
                 {"bottleneck ms", Align::right},
                 {"vs optimal", Align::right}});
    const double optimal_s = objective_value(sopt.objective, optimal.plan, optimal.estimate);
    auto row = [&](Strategy s, const SolveResult& r) {
        t.add_row({std::string(to_string(s)), std::to_string(r.plan.stages.size()), msf(r.estimate.iteration_s),
                   msf(r.estimate.bottleneck_s),
                   fmt::format("{:.2f}x", objective_value(sopt.objective, r.plan, r.estimate) / optimal_s)});
    };
    row(Strategy::optimal, optimal);  // already solved: not again
    for (Strategy s : {Strategy::uniform, Strategy::parameters, Strategy::time, Strategy::data_parallel}) {
        sopt.strategy = s;
        try {
            row(s, solve(model, cluster, cost, copt, sopt));
        } catch (const InfeasibleError&) {
            t.add_row({std::string(to_string(s)), "-", "does not fit", "", ""});
        }
    }
    fmt::print("\nstrategies under the same cost model ({} objective):\n{}", to_string(sopt.objective), t.str());
}

/// PipeDream's own planner and cost model (src/plan/pipedream.cpp), printed stage by stage.
int run_pipedream_plan(const PlanOptions& o, const std::string& command) {
    if (!o.cluster.empty())
        throw InputError("--cost-model pipedream plans for --workers identical workers: give no --cluster");
    if (o.compare || !o.csv.empty() || o.strategy != "optimal" || !o.precision.empty())
        throw InputError("--cost-model pipedream takes none of --compare, --csv, --strategy, --precision: it is "
                         "PipeDream's optimizer");
    if (o.workers == 0) throw InputError("--cost-model pipedream needs --workers N");
    if (!(o.bandwidth_bytes > 0)) throw InputError("--cost-model pipedream needs --bandwidth-bytes B (bytes/s)");
    const Model model = load_model(o.model);
    PipeDreamOptions popt;
    popt.workers = o.workers;
    popt.bandwidth = o.bandwidth_bytes;
    popt.straight_pipeline = o.straight_pipeline;
    if (o.memory_bytes > 0) popt.memory_bytes = o.memory_bytes;
    const PipeDreamResult r = solve_pipedream(model, popt);
    if (!o.quiet) {
        fmt::print("plan for {} with PipeDream's cost model: {} workers, {:g} bytes/s{}{}, {} states\n\n", model.name,
                   o.workers, o.bandwidth_bytes, o.straight_pipeline ? ", straight pipeline" : "",
                   popt.memory_bytes ? fmt::format(", {:g} bytes per worker", *popt.memory_bytes) : "", r.states);
        TextTable t({{"stage", Align::right},
                     {"layers", Align::left},
                     {"states", Align::left},
                     {"replicas", Align::right},
                     {"compute ms", Align::right},
                     {"stage ms", Align::right},
                     {"in ms", Align::right},
                     {"out ms", Align::right},
                     {"", Align::left}});
        const double bottleneck = r.plan_bottleneck_s;
        for (std::size_t s = 0; s < r.stages.size(); ++s) {
            const PipeDreamStage& st = r.stages[s];
            const double worst = std::max({st.time_s, st.input_transfer_s, st.output_transfer_s});
            const std::string layers =
                st.first_layer == st.last_layer
                    ? fmt::format("{} ({})", model.layers[st.first_layer].name, st.first_layer)
                    : fmt::format("{} .. {} ({}-{})", model.layers[st.first_layer].name,
                                  model.layers[st.last_layer].name, st.first_layer, st.last_layer);
            t.add_row({std::to_string(s), layers,
                       fmt::format("({}, {})", st.first_state, st.end_state), std::to_string(st.replicas),
                       msf(st.compute_s), msf(st.time_s), msf(st.input_transfer_s), msf(st.output_transfer_s),
                       worst == bottleneck ? "<- bottleneck" : ""});
        }
        fmt::print("{}\n", t.str());
        fmt::print("time per stage {:.9g} s ({:.12g} ms per minibatch: PipeDream's \"Time per stage in pipeline\")\n",
                   r.time_per_stage_s, r.time_per_stage_s * 1e3);
        if (r.plan_bottleneck_s != r.time_per_stage_s)
            fmt::print("note: PipeDream's optimum needs stages that are not contiguous in this file's layer order; the "
                       "plan shown is the best contiguous one, at {:.12g} ms\n",
                       r.plan_bottleneck_s * 1e3);
        fmt::print("single stage {:.6g} ms; data parallel on {} workers {:.6g} ms; pipeline {:.3g}x one worker, "
                   "{:.3g}x data parallel\n",
                   r.single_stage_s * 1e3, o.workers, r.data_parallel_s * 1e3, r.single_stage_s / r.time_per_stage_s,
                   r.data_parallel_s / r.time_per_stage_s);
        fmt::print("stage ms = (compute + 4 (r-1) parameter bytes / (B r)) / r; in/out ms = 2 x the cut's activation "
                   "bytes / (B r)\n");
    }
    Meta meta;
    meta.command_line = command;
    meta.extra = {{"model", model.name}, {"cost_model", "pipedream"}};
    if (!o.out.empty()) write_file_atomic(o.out, pipedream_plan_toml(r, popt, model, meta));
    return 0;
}

int run_plan(const PlanOptions& o, const std::string& command) {
    if (o.cost_model == "pipedream") return run_pipedream_plan(o, command);
    if (o.cluster.empty()) throw InputError("give the cluster to plan for: --cluster CLUSTER");
    if (o.workers != 0 || o.bandwidth_bytes != 0 || o.straight_pipeline || o.memory_bytes != 0)
        throw InputError("--workers, --bandwidth-bytes, --straight-pipeline and --memory-bytes go with "
                         "--cost-model pipedream");
    if (!o.precision.empty() && o.bytes_per_param)
        throw InputError("--precision plans the training state dpart run keeps (16 B per parameter in fp32, 18 in "
                         "bf16): leave out --bytes-per-param");
    const Model loaded = load_model(o.model);
    const Cluster cluster = load_cluster(o.cluster);
    // Planned for dpart run in a precision: the model priced in it, the state dpart run keeps.
    const std::optional<DType> precision =
        o.precision.empty() ? std::nullopt : std::optional<DType>(parse_dtype(o.precision));
    std::optional<Model> retyped;
    const Model& model = precision ? in_dtype(loaded, *precision, retyped) : loaded;
    CostOptions copt;
    copt.bytes_per_param = o.bytes_per_param.value_or(copt.bytes_per_param);
    copt.shard_optimizer = o.shard_optimizer;
    copt.recompute = o.recompute;
    copt.fused_attention = o.fused_attention;
    copt.vocab_parallel = o.vocab_parallel;
    copt.overlap_allreduce = o.overlap_allreduce;
    if (precision) copt = run_state_options(copt, *precision);
    SolverOptions sopt;
    sopt.objective = o.objective == "throughput" ? Objective::throughput : Objective::iteration;
    sopt.schedule = o.schedule == "gpipe" ? ScheduleKind::gpipe : ScheduleKind::one_f_one_b;
    sopt.microbatch_size = parse_auto(o.microbatch_size, "--microbatch-size");
    sopt.microbatches = parse_auto(o.microbatches, "--microbatches");
    sopt.max_replicas = o.max_replicas;
    sopt.max_tp = o.max_tp;
    sopt.strategy = parse_strategy(o.strategy);
    sopt.threads = o.threads;
    const CliCostModel cost_model(model, cluster, copt, o.layer_times);
    const CostModel& cost = cost_model.get();
    SolveResult r = solve(model, cluster, cost, copt, sopt);
    r.plan.precision = precision;
    if (!o.quiet) {
        print_plan(r.plan, r.estimate, model, cluster, o.strategy);
        if (!r.exact)
            fmt::print("note: the search was too large for the exact 1F1B memory model; it assumed every stage keeps "
                       "the first stage's microbatches in flight, so a plan needing the exact count may be missing\n");
        if (o.compare && sopt.strategy == Strategy::optimal) print_comparison(model, cluster, cost, copt, sopt, r);
    }
    Meta meta;
    meta.command_line = command;
    meta.extra = {{"model", model.name}, {"cluster", cluster.name}};
    if (!o.out.empty()) write_file_atomic(o.out, plan_toml(r.plan, r.estimate, model, cluster, meta, o.strategy));
    if (!o.csv.empty()) stage_csv(r.plan, r.estimate, model, cluster).write(o.csv);
    return 0;
}

}  // namespace

void setup_plan(CLI::App& app, Action& action, const std::string& command) {
    auto o = std::make_shared<PlanOptions>();
    CLI::App* cmd = app.add_subcommand("plan", "Find the partition of a model across a cluster that minimises "
                                               "iteration time (or maximises throughput) and fits in memory");
    cmd->add_option("model", o->model, "model.toml")->required();
    cmd->add_option("--cluster,-c", o->cluster, "cluster.toml (required, except with --cost-model pipedream)");
    cmd->add_option("--objective", o->objective,
                    "iteration: the exact makespan of one iteration; throughput: the pipeline's bottleneck stage time "
                    "per microbatch")
        ->check(CLI::IsMember({"iteration", "throughput"}))
        ->capture_default_str();
    cmd->add_option("--schedule", o->schedule, "pipeline schedule: 1f1b (PipeDream-flush) or gpipe")
        ->check(CLI::IsMember({"1f1b", "gpipe"}))
        ->capture_default_str();
    cmd->add_option("--microbatch-size", o->microbatch_size,
                    "samples per microbatch (split among a stage's replicas), or auto: every divisor of the global "
                    "batch is tried")
        ->capture_default_str();
    cmd->add_option("--microbatches", o->microbatches, "microbatches per iteration, or auto (global batch / size)")
        ->capture_default_str();
    cmd->add_option("--max-replicas", o->max_replicas, "most data-parallel replicas of one stage (0 = no limit)")
        ->capture_default_str();
    cmd->add_option("--max-tp", o->max_tp, "largest tensor-parallel degree (a power of two, within a node)")
        ->check(CLI::Range(1u, 1024u))
        ->capture_default_str();
    cmd->add_option("--strategy", o->strategy,
                    "optimal (dynamic programming), or a baseline: uniform (equal layer counts, Megatron), parameters "
                    "(balanced parameters, DeepSpeed), time (balanced layer times, torchgpipe), data-parallel")
        ->check(CLI::IsMember({"optimal", "uniform", "parameters", "time", "data-parallel"}))
        ->capture_default_str();
    cmd->add_option("--out,-o", o->out, "write the plan to this TOML file (atomically)");
    cmd->add_option("--csv", o->csv, "write one row per stage to this CSV file (atomically)");
    cmd->add_option("--bytes-per-param", o->bytes_per_param,
                    "training-state bytes per parameter: weights, gradients, optimizer (default 16: mixed-precision "
                    "Adam)")
        ->check(CLI::Range(std::uint64_t{1}, std::uint64_t{1024}));
    cmd->add_option("--precision", o->precision,
                    "plan for dpart run computing in fp32 or bf16: the model priced in that precision, with the "
                    "training state dpart run keeps (16 or 18 B per parameter, fp32 gradient sums); recorded in the "
                    "plan, which dpart run then computes in")
        ->check(CLI::IsMember({"fp32", "bf16"}));
    cmd->add_flag("--shard-optimizer", o->shard_optimizer, "split optimizer state across a stage's replicas (ZeRO-1)");
    cmd->add_flag("--recompute", o->recompute, "activation checkpointing: keep stage inputs, recompute the rest");
    cmd->add_flag("--fused-attention", o->fused_attention,
                  "plan the memory of fused (flash) attention kernels, which keep no s x s probabilities (dpart run "
                  "materialises them: a plan for dpart run leaves this out)");
    cmd->add_flag("--vocab-parallel", o->vocab_parallel,
                  "under tensor parallelism, split the embedding and the loss over the ranks as Megatron-LM's "
                  "vocabulary-parallel ones do (dpart run holds them whole: a plan for dpart run leaves this out)");
    cmd->add_flag("--overlap-allreduce", o->overlap_allreduce, "overlap the gradient all-reduce with the last backward");
    cmd->add_flag("--compare", o->compare, "also solve every baseline strategy and print a comparison");
    cmd->add_flag("--quiet,-q", o->quiet, "print nothing (write --out / --csv only)");
    cmd->add_option("--threads", o->threads,
                    "threads for the dynamic program on large searches (0 = one per core this process may run on); the plan is "
                    "the same for any count")
        ->check(CLI::Range(std::size_t{0}, std::size_t{1024}))
        ->capture_default_str();
    cmd->add_option("--layer-times", o->layer_times,
                    "measured layer times (dpart profile --model ... --layer-times FILE): used for the cluster's devices "
                    "of the kind they were measured on, instead of the roofline");
    cmd->add_option("--cost-model", o->cost_model,
                    "analytical: dpart's cost model on --cluster; pipedream: PipeDream's optimizer and cost model "
                    "(measured layer times, e.g. from dpart import pipedream) on --workers identical workers")
        ->check(CLI::IsMember({"analytical", "pipedream"}))
        ->capture_default_str();
    cmd->add_option("--workers", o->workers, "pipedream: number of identical workers (PipeDream's -n)")
        ->check(CLI::Range(std::size_t{1}, std::size_t{4096}));
    cmd->add_option("--bandwidth-bytes", o->bandwidth_bytes,
                    "pipedream: bandwidth between workers in bytes/s (PipeDream's -b; it defaults to 1e9)")
        ->check(positive_number);
    cmd->add_flag("--straight-pipeline", o->straight_pipeline, "pipedream: one worker per stage, no replication");
    cmd->add_option("--memory-bytes", o->memory_bytes,
                    "pipedream: memory per worker in bytes (PipeDream's -s with --use_memory_constraint)")
        ->check(positive_number);
    cmd->footer(
        "Examples:\n"
        "  dpart plan plans/models/gpt2-small.toml --cluster plans/clusters/dgx-h100.toml\n"
        "  dpart plan plans/models/llama3-70b.toml -c plans/clusters/h100-4x8.toml --out plan.toml --csv stages.csv\n"
        "  dpart plan plans/models/vgg16.toml -c plans/clusters/hetero-3kinds.toml --objective throughput --compare\n"
        "  dpart plan plans/models/llama3-8b.toml -c plans/clusters/dgx-h100.toml --strategy uniform --max-tp 1\n"
        "  dpart plan plans/pipedream/vgg16.toml --cost-model pipedream --workers 4 --bandwidth-bytes 1e9\n"
        "Exit code 3 when no plan fits in memory; the message says by how much and what would help.");
    cmd->callback([o, &action, command] { action = [o, command] { return run_plan(*o, command); }; });
}

}  // namespace dpart::cli
