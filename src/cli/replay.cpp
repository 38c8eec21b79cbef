// dpart replay: a plan simulated iteration by iteration under a scenario.
#include <fmt/format.h>

#include <filesystem>
#include <memory>
#include <optional>

#include "commands.hpp"
#include "dpart/io/atomic_file.hpp"
#include "dpart/io/cluster_toml.hpp"
#include "dpart/io/model_toml.hpp"
#include "dpart/io/plan_toml.hpp"
#include "dpart/io/trace.hpp"
#include "dpart/io/trace_scenario.hpp"
#include "dpart/sim/policy.hpp"

namespace dpart::cli {
namespace {

struct ReplayOptions {
    std::string plan;
    std::string model;
    std::string cluster;
    std::string scenario;
    std::string layer_times;  ///< --layer-times: measured layer costs (dpart profile --model)
    std::string trace;
    std::uint64_t iterations = 100;
    std::string policy = "static";
    std::uint64_t window = 10;
    double jitter = 0;
    double min_gain_pct = 2;
    std::uint64_t max_replicas = 0;
    std::uint32_t max_tp = 8;
    std::uint64_t seed = 1;
    std::string out_dir;
    std::string timeline = "events";
    std::optional<std::uint64_t> bytes_per_param;  ///< default 16
    bool shard_optimizer = false;
    bool recompute = false;
    bool fused_attention = false;
    bool vocab_parallel = false;
    bool overlap_allreduce = false;
};

int run_replay(const ReplayOptions& o, const std::string& command) {
    const Model loaded = load_model(o.model);
    const Cluster cluster = load_cluster(o.cluster);
    const Plan plan = load_plan(o.plan, loaded, cluster);
    // A plan for dpart run in a precision (dpart plan --precision, or the plan a run wrote) is
    // priced as dpart run runs it.
    std::optional<Model> retyped;
    const Model& model = plan.precision ? in_dtype(loaded, *plan.precision, retyped) : loaded;
    CostOptions copt;
    if (plan.precision && o.bytes_per_param)
        throw InputError(fmt::format("{} is planned for dpart run in {} (precision = \"{}\"), whose training state "
                                     "it is priced with: leave out --bytes-per-param",
                                     o.plan, to_string(*plan.precision), to_string(*plan.precision)));
    copt.bytes_per_param = o.bytes_per_param.value_or(copt.bytes_per_param);
    copt.shard_optimizer = o.shard_optimizer || plan.shard_optimizer;
    copt.recompute = o.recompute || plan.recompute;
    copt.fused_attention = o.fused_attention || plan.fused_attention;
    copt.vocab_parallel = o.vocab_parallel || plan.vocab_parallel;
    copt.overlap_allreduce = o.overlap_allreduce;
    if (plan.precision) copt = run_state_options(copt, *plan.precision);
    const CliCostModel cost_model(model, cluster, copt, o.layer_times);
    const CostModel& cost = cost_model.get();
    const Scenario scenario = !o.trace.empty()    ? scenario_from_run(o.trace, model, cluster, cost, copt)
                              : !o.scenario.empty() ? load_scenario(o.scenario, cluster)
                                                    : Scenario{};
    const PlanEstimate nominal = estimate_plan(plan, model, cluster, cost, copt);

    CsvTable stages(stage_trace_columns());
    CsvTable timeline(timeline_columns());
    PolicyOptions po;
    po.policy = o.policy == "adaptive" ? Policy::adaptive : o.policy == "oracle" ? Policy::oracle : Policy::static_plan;
    po.window = o.window;
    po.jitter = Jitter{o.jitter, o.seed};
    po.min_gain = o.min_gain_pct / 100;
    po.solver.objective = plan.objective;
    po.solver.max_replicas = o.max_replicas;
    po.solver.max_tp = o.max_tp;
    // The timeline of every iteration would be large: the first, the last, and each one where
    // something changed. Which one is the last is known only once a replay that stops early has
    // stopped: the latest iteration not written is kept until then.
    struct Unwritten {
        std::uint64_t iteration = 0;
        Plan plan;
        TaskGraph graph;
        Timeline timeline;
    };
    std::optional<Unwritten> unwritten;
    const PolicyReplay pr =
        replay_policy(plan, model, cluster, cost, copt, scenario, o.iterations, po,
                      [&](std::uint64_t it, const std::string& event, const Plan& in_force, const TaskGraph& g,
                          const Timeline& t) {
                          add_stage_rows(stages, it, in_force, cluster, g, t);
                          if (o.timeline == "all" || it == 0 || it + 1 == o.iterations || !event.empty()) {
                              add_timeline_rows(timeline, it, in_force, cluster, g, t);
                              unwritten.reset();
                          } else {
                              if (!unwritten) unwritten.emplace();
                              unwritten->iteration = it;
                              unwritten->plan = in_force;
                              unwritten->graph = g;
                              unwritten->timeline = t;
                          }
                      });
    if (unwritten)
        add_timeline_rows(timeline, unwritten->iteration, unwritten->plan, cluster, unwritten->graph,
                          unwritten->timeline);
    const ReplayResult& r = pr.result;
    CsvTable iterations(iteration_columns());
    std::vector<double> times;
    for (const IterationRecord& it : r.iterations) {
        const double ms = it.iteration_s * 1e3;
        times.push_back(ms);
        iterations.add_row({std::to_string(it.iteration), std::to_string(pr.plan_version.at(&it - r.iterations.data())),
                            fmt::format("{:.6g}", ms),
                            fmt::format("{:.6g}", static_cast<double>(model.global_batch) / it.iteration_s), it.event});
    }
    RunSummary summary = summarise(times, model.global_batch, nominal.iteration_s * 1e3);
    summary.policy = o.policy;
    summary.repartitions = pr.repartitions;
    summary.migration_ms = pr.migration_s * 1e3;
    summary.plan_versions = pr.repartitions + 1;
    summary.stopped = r.stopped;
    summary.stop_reason = r.stop_reason;

    fmt::print("replayed {} iterations of {} on {} (policy {}{})\n", r.iterations.size(), model.name, cluster.name,
               o.policy, !o.trace.empty()      ? ", conditions of the run in " + o.trace
                         : o.scenario.empty() ? ", no scenario"
                                              : ", scenario " + o.scenario);
    if (r.iterations.empty())
        fmt::print("no iteration ran (predicted {:.6g} ms)\n", summary.predicted_iteration_ms);
    else
        fmt::print("iteration ms: mean {:.6g}, p50 {:.6g}, p99 {:.6g}; predicted {:.6g} ({:+.3g}%); {:.6g} samples/s\n",
                   summary.mean_iteration_ms, summary.p50_iteration_ms, summary.p99_iteration_ms,
                   summary.predicted_iteration_ms, summary.prediction_error_pct, summary.samples_per_s);
    for (const IterationRecord& it : r.iterations)
        if (!it.event.empty()) fmt::print("iteration {}: {} -> {:.6g} ms\n", it.iteration, it.event, it.iteration_s * 1e3);
    for (const std::string& note : pr.notes) fmt::print("{}\n", note);
    if (r.stopped) fmt::print("stopped: {}\n", r.stop_reason);

    if (!o.out_dir.empty()) {
        Meta meta;
        meta.command_line = command;
        meta.extra = {{"model", model.name}, {"cluster", cluster.name}, {"plan", o.plan}};
        (void)write_trace_dir(o.out_dir, meta, iterations, stages, timeline, summary);
    }
    // A run the policy could not finish is a runtime failure, after its files are written.
    return r.stopped ? static_cast<int>(ExitCode::runtime_failure) : 0;
}

}  // namespace

void setup_replay(CLI::App& app, Action& action, const std::string& command) {
    auto o = std::make_shared<ReplayOptions>();
    CLI::App* cmd = app.add_subcommand(
        "replay", "Simulate a plan iteration by iteration, under a scenario of slowdowns, failures and link changes");
    cmd->add_option("plan", o->plan, "plan.toml (as written by dpart plan, or by hand)")->required();
    cmd->add_option("--model,-m", o->model, "model.toml")->required();
    cmd->add_option("--cluster,-c", o->cluster, "cluster.toml")->required();
    auto* scenario =
        cmd->add_option("--scenario,-s", o->scenario, "scenario.toml: [[event]] iteration, kind, device, factor");
    cmd->add_option("--trace", o->trace,
                    "a recorded run's directory (dpart run --out-dir): replay under the conditions it measured, "
                    "each device slowed by its stage's measured / predicted compute time per iteration")
        ->excludes(scenario);
    cmd->add_option("--iterations,-n", o->iterations, "iterations to simulate")
        ->check(CLI::Range(std::uint64_t{1}, std::uint64_t{10000000}))
        ->capture_default_str();
    cmd->add_option("--policy", o->policy,
                    "static: keep the plan (it stops at a failure of one of its devices); adaptive: every --window "
                    "iterations re-plan from the measured stage times, and repartition when the predicted gain over the "
                    "remaining iterations exceeds the migration; oracle: re-plan at once on every change, for free")
        ->check(CLI::IsMember({"static", "adaptive", "oracle"}))
        ->capture_default_str();
    cmd->add_option("--window", o->window, "adaptive: iterations between re-plans")
        ->check(CLI::Range(std::uint64_t{1}, std::uint64_t{1000000}))
        ->capture_default_str();
    cmd->add_option("--min-gain", o->min_gain_pct,
                    "adaptive: the least predicted gain per iteration, in percent, worth a repartition")
        ->check(CLI::Range(0.0, 100.0))
        ->check(finite_number)
        ->capture_default_str();
    cmd->add_option("--layer-times", o->layer_times,
                    "measured layer times (dpart profile --model ... --layer-times FILE): used for the cluster's devices "
                    "of the kind they were measured on, instead of the roofline");
    cmd->add_option("--max-replicas", o->max_replicas,
                    "adaptive, oracle: re-plans use at most this many data-parallel replicas per stage (0: no limit)")
        ->capture_default_str();
    cmd->add_option("--max-tp", o->max_tp, "adaptive, oracle: largest tensor-parallel degree of re-plans")
        ->check(CLI::Range(1u, 64u))
        ->capture_default_str();
    cmd->add_option("--jitter", o->jitter,
                    "per-device noise: each iteration a device's work takes exp(jitter x N(0,1)) times as long "
                    "(0 = none)")
        ->check(CLI::Range(0.0, 2.0))
        ->check(finite_number)
        ->capture_default_str();
    cmd->add_option("--seed", o->seed, "seed of the jitter: the same seed gives every policy the same noise")
        ->capture_default_str();
    cmd->add_option("--out-dir,-o", o->out_dir,
                    "write iterations.csv, stages.csv, timeline.csv and summary.toml there (atomically)");
    cmd->add_option("--timeline", o->timeline,
                    "which iterations timeline.csv holds: events (the first, the last, and each where an event took "
                    "effect) or all")
        ->check(CLI::IsMember({"events", "all"}))
        ->capture_default_str();
    cmd->add_option("--bytes-per-param", o->bytes_per_param, "as for dpart plan (default 16)")
        ->check(CLI::Range(std::uint64_t{1}, std::uint64_t{1024}));
    cmd->add_flag("--shard-optimizer", o->shard_optimizer, "as for dpart plan");
    cmd->add_flag("--recompute", o->recompute, "as for dpart plan");
    cmd->add_flag("--fused-attention", o->fused_attention, "as for dpart plan");
    cmd->add_flag("--vocab-parallel", o->vocab_parallel, "as for dpart plan");
    cmd->add_flag("--overlap-allreduce", o->overlap_allreduce, "as for dpart plan");
    cmd->footer(
        "Examples:\n"
        "  dpart plan plans/models/llama3-8b.toml -c plans/clusters/h100-4x8.toml --out plan.toml\n"
        "  dpart replay plan.toml -m plans/models/llama3-8b.toml -c plans/clusters/h100-4x8.toml \\\n"
        "      --scenario plans/scenarios/slow-gpu.toml --iterations 200 --out-dir replay/\n"
        "Exit code 1 when the policy cannot continue (a device of the plan failed); the files are written.");
    cmd->callback([o, &action, command] { action = [o, command] { return run_replay(*o, command); }; });
}

}  // namespace dpart::cli
