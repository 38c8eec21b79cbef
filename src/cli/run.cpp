// dpart run: a plan executed as real training steps, measured, next to its prediction.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <memory>

#include "commands.hpp"
#include "dpart/io/atomic_file.hpp"
#include "dpart/io/cluster_toml.hpp"
#include "dpart/io/model_toml.hpp"
#include "dpart/io/plan_toml.hpp"
#include "dpart/io/run_trace.hpp"
#include "dpart/io/meta.hpp"
#include "dpart/io/trace.hpp"
#include "dpart/sim/policy.hpp"
#include "dpart/runtime/adaptive.hpp"
#include "dpart/runtime/cuda_backend.hpp"
#include "dpart/runtime/device_comm.hpp"
#include "dpart/runtime/device_stage.hpp"
#include "dpart/runtime/executor.hpp"
#include "dpart/runtime/mpi.hpp"

namespace dpart::cli {
namespace {

struct RunCliOptions {
    std::string plan;
    std::string model;
    std::string cluster;
    std::string scenario;
    std::string layer_times;  ///< --layer-times: measured layer costs (dpart profile --model)
    std::uint64_t iterations = 10;
    std::uint64_t seed = 1;
    std::uint64_t dataset_batches = 1;
    std::string optimizer = "adam";
    double lr = 1e-3;
    double timeout_s = 60;
    std::string out_dir;
    std::string timeline = "ends";
    std::uint64_t checkpoint_every = 0;
    std::string checkpoint_dir;
    std::string resume;
    bool emulate = false;
    bool recompute = false;
    bool shard_optimizer = false;
    std::string backend = "cpu";
    std::string precision;  ///< empty: the model's dtype (cuda), fp32 (cpu)
    bool tf32 = false;
    std::string device_comm = "off";  ///< nccl, host or off
    bool adaptive = false;
    std::uint64_t window = 10;
    std::uint64_t copy_every = 10;
    double min_gain = 0.02;
    std::uint64_t max_replicas = 0;
    std::uint32_t max_tp = 8;
};

Meta run_meta(const RunCliOptions& o, const std::string& command, const Model& model, const Cluster& cluster) {
    Meta meta;
    meta.command_line = command;
    meta.extra = {{"model", model.name}, {"cluster", cluster.name}, {"plan", o.plan}};
    return meta;
}

void write_outputs(const RunCliOptions& o, const std::string& command, const Model& model, const Cluster& cluster,
                   const rt::Execution& ex, const PlanEstimate& predicted, const rt::RunResult& run,
                   const RunSummary& summary) {
    CsvTable iterations(iteration_columns()), stages(stage_trace_columns()), timeline(timeline_columns());
    add_run_iteration_rows(iterations, run, model.global_batch, ex.options().scenario, cluster);
    add_run_stage_rows(stages, run, ex, cluster);
    add_run_timeline_rows(timeline, run, ex, cluster, o.timeline == "all");
    const Meta meta = run_meta(o, command, model, cluster);
    const std::filesystem::path dir = write_trace_dir(o.out_dir, meta, iterations, stages, timeline, summary);
    // The plan as it ran, with its predictions: what `dpart replay --trace DIR` compares with.
    write_file_atomic((dir / "plan.toml").string(), plan_toml(ex.plan(), predicted, model, cluster, meta, "as run"));
}

/// A device backend's memory, stage by stage: the peak its workers' allocations reached (each
/// worker's MemoryMeter; `peak` by worker of `plan`), next to the plan's prediction for its
/// fullest device; and the run's cache of synthetic inputs and labels beside (`cached`, by
/// worker: a data loader's stand-in the plan does not hold, off the meter but for the entries
/// in flight). Printed (after `what`), and returned as summary.toml's [device_memory] table;
/// nothing for the CPU backend.
std::string device_memory_report(const Plan& plan, const PlanEstimate& predicted, const std::vector<std::uint64_t>& peak,
                                 const std::vector<std::uint64_t>& cached, const std::string& what) {
    const std::size_t S = plan.stages.size();
    const std::vector<rt::WorkerPlace> places = rt::worker_places(plan);
    std::vector<std::uint64_t> stage_peak(S, 0), expected(S, 0), stage_cached(S, 0);
    for (std::size_t w = 0; w < peak.size() && w < places.size(); ++w) {
        stage_peak[places[w].stage] = std::max(stage_peak[places[w].stage], peak[w]);
        if (w < cached.size()) stage_cached[places[w].stage] = std::max(stage_cached[places[w].stage], cached[w]);
    }
    if (std::all_of(stage_peak.begin(), stage_peak.end(), [](std::uint64_t b) { return b == 0; })) return {};
    std::vector<std::string> parts;
    for (std::size_t s = 0; s < S; ++s) {
        expected[s] = predicted.stages.at(s).memory.total();
        const double error =
            expected[s] == 0 ? 0.0 : (static_cast<double>(stage_peak[s]) / static_cast<double>(expected[s]) - 1) * 100;
        parts.push_back(fmt::format("stage {} {:.4g} MB vs {:.4g} MB ({:+.3g}%{})", s,
                                    static_cast<double>(stage_peak[s]) / 1e6, static_cast<double>(expected[s]) / 1e6,
                                    error,
                                    stage_cached[s] == 0
                                        ? std::string()
                                        : fmt::format("; {:.4g} MB of cached data beside",
                                                      static_cast<double>(stage_cached[s]) / 1e6)));
    }
    fmt::print("device memory{}, peak per stage, measured vs predicted: {}\n", what, fmt::join(parts, ", "));
    return fmt::format("\n[device_memory]  # per stage{}: the peak its workers' device allocations reached, the "
                       "plan's prediction for its fullest device, and the run's cache of synthetic inputs and labels "
                       "beside them (not in the plan; in the peak only for the microbatches in flight)\npeak_bytes = [{}]\npredicted_bytes = [{}]\ncached_bytes = [{}]\n",
                       what, fmt::join(stage_peak, ", "), fmt::join(expected, ", "), fmt::join(stage_cached, ", "));
}

/// Refuses a run that would not fit in this host's memory (rather than be killed by the
/// kernel): parameters, gradients and Adam state in fp32, plus the activations the plan keeps
/// in flight, counted in fp32 and doubled for the transient buffers of forward and backward.
void check_host_memory(const rt::Execution& ex, const PlanEstimate& predicted, const Model& model) {
    double activations = 0;
    const double widen = 4.0 / static_cast<double>(dtype_bytes(model.dtype));
    for (std::size_t s = 0; s < ex.plan().stages.size(); ++s)
        activations += 2 * widen * static_cast<double>(predicted.stages[s].memory.activation_bytes) *
                       static_cast<double>(ex.plan().stages[s].devices.size());
    const double needed = static_cast<double>(ex.state_bytes()) + activations;
    const double host = static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGESIZE));
    if (needed > 0.8 * host)
        throw InfeasibleError(fmt::format(
            "running {} on CPU workers needs about {:.3g} GiB ({:.3g} GiB of fp32 parameters, gradients and Adam "
            "state, {:.3g} GiB of activations), more than 80% of this host's {:.3g} GiB: try a smaller model, batch or "
            "microbatch",
            model.name, needed / (1ull << 30), static_cast<double>(ex.state_bytes()) / (1ull << 30),
            activations / (1ull << 30), host / (1ull << 30)));
}

/// A plan that, priced as it runs, needs more memory than a device (or a GPU's partitions
/// together) has: on GPUs it would run out part-way (the prediction is a lower bound there:
/// cuBLAS's workspace and the pool's rounding come on top), so `--backend cuda` refuses it; the
/// CPU and host-device backends, which run in host memory, note it.
void check_device_memory(const RunCliOptions& o, const Plan& plan, const PlanEstimate& predicted,
                         const Cluster& cluster, DType dtype, bool print) {
    std::vector<std::string> over;
    for (const MemoryShortfall& m : memory_shortfalls(plan, predicted, cluster)) {
        std::vector<std::string> names;
        for (std::size_t d : m.devices) names.push_back(cluster.devices[d].name);
        over.push_back(fmt::format("{} {:.4g} GB of {:.4g} GB", fmt::join(names, "+"), static_cast<double>(m.needed) / 1e9,
                                   static_cast<double>(m.capacity) / 1e9));
    }
    if (over.empty()) return;
    const std::string what =
        fmt::format("{}: as it runs (the {} backend's precision and training state), the plan needs more device memory "
                    "than {} has: {}",
                    o.plan, o.backend, cluster.name, fmt::join(over, ", "));
    if (o.backend == "cuda")
        throw InfeasibleError(what + (dtype == DType::fp32
                                          ? "; try --precision bf16, --shard-optimizer, --recompute, or a plan made for "
                                            "this memory (dpart plan --precision fp32)"
                                          : "; try --shard-optimizer, --recompute, or a plan made for this memory "
                                            "(dpart plan --precision bf16 plans the state a bf16 run keeps: fp32 "
                                            "gradients and a bf16 copy of the weights)"));
    if (print) fmt::print(stderr, "note: {} (this backend runs in host memory)\n", what);
}

/// The trace files and summary of an adaptive run: iterations.csv in the order things happened,
/// stages.csv and timeline.csv segment by segment (each with its plan), plan.toml (the initial
/// plan) and final-plan.toml.
void write_adaptive_outputs(const RunCliOptions& o, const std::string& command, const Model& model,
                            const Cluster& cluster, const CostModel& cost, const CostOptions& copt,
                            const rt::RunOptions& ro, const rt::AdaptiveResult& r, const RunSummary& summary) {
    CsvTable iterations(iteration_columns()), stages(stage_trace_columns()), timeline(timeline_columns());
    for (const rt::AdaptiveIteration& it : r.iterations)
        iterations.add_row({std::to_string(it.iteration), std::to_string(it.plan_version), ms_text(it.seconds),
                            fmt::format("{:.6g}", it.seconds > 0 ? static_cast<double>(model.global_batch) / it.seconds : 0.0),
                            it.event});
    for (std::size_t k = 0; k < r.segments.size(); ++k) {
        const rt::Segment& seg = r.segments[k];
        if (seg.end <= seg.first) continue;
        const Plan& plan = r.plans.at(seg.plan_version - 1);
        const rt::Execution ex(plan, model, estimate_plan(plan, model, cluster, cost, copt), ro);
        rt::RunResult part;
        part.first_iteration = seg.first;
        part.iteration_s.assign(seg.end - seg.first, 0.0);
        for (const rt::WorkerReport& w : seg.workers)
            for (std::size_t i = 0; i < part.iteration_s.size() && i < w.busy_s.size(); ++i)
                part.iteration_s[i] = std::max(part.iteration_s[i], w.busy_s[i]);
        part.workers = seg.workers;
        add_run_stage_rows(stages, part, ex, cluster);
        if (o.timeline == "all" || k == 0 || k + 1 == r.segments.size())
            add_run_timeline_rows(timeline, part, ex, cluster, o.timeline == "all");
    }
    const Meta meta = run_meta(o, command, model, cluster);
    const std::filesystem::path dir = write_trace_dir(o.out_dir, meta, iterations, stages, timeline, summary);
    const Plan& first = r.plans.front();
    const Plan& last = r.plans.back();
    write_file_atomic((dir / "plan.toml").string(),
                      plan_toml(first, estimate_plan(first, model, cluster, cost, copt), model, cluster, meta, "as run"));
    write_file_atomic((dir / "final-plan.toml").string(),
                      plan_toml(last, estimate_plan(last, model, cluster, cost, copt), model, cluster, meta,
                                fmt::format("the last of {} plan versions of the adaptive run", r.plans.size())));
}

/// The compute precision of the device backends: --precision, else the model's dtype.
rt::Elem device_precision(const RunCliOptions& o, const Model& model) {
    return rt::compute_precision(o.precision, model.dtype);
}

/// The dtype the run computes in: the device backends' precision; fp32 on the CPU backend.
DType run_dtype(const RunCliOptions& o, const Model& model) {
    if (o.backend == "cpu") return DType::fp32;
    return device_precision(o, model) == rt::Elem::bf16 ? DType::bf16 : DType::fp32;
}

/// What moves device buffers between workers that do not share memory: "nccl", "host" (the
/// stand-in) or "off" (host tensors). NCCL is asked for, not the default, until it has run on
/// a machine with several GPUs.
std::string device_comm_choice(const RunCliOptions& o, const Cluster& cluster) {
    if (o.backend == "cpu") {
        if (o.device_comm != "off")
            throw InputError(fmt::format("--device-comm {} needs a device backend (--backend cuda or host-device)",
                                         o.device_comm));
        return "off";
    }
    const bool partitions = std::any_of(cluster.devices.begin(), cluster.devices.end(),
                                        [](const Device& d) { return d.partition.has_value(); });
    if (o.device_comm == "nccl") {
        if (o.backend != "cuda") throw InputError("--device-comm nccl needs --backend cuda");
        if (partitions)
            throw InputError("--device-comm nccl needs whole GPUs: NCCL takes one rank per GPU, and this cluster has "
                             "green-context partitions (they hand tensors over by address on their GPU)");
    }
    return o.device_comm;
}

std::string backend_label(const RunCliOptions& o, const Model& model, const Cluster& cluster) {
    if (o.backend == "cpu") return "cpu";
    const bool bf16 = device_precision(o, model) == rt::Elem::bf16;
    const std::string comm = device_comm_choice(o, cluster);
    return fmt::format("{} ({}{}{})", o.backend, bf16 ? "bf16" : "fp32", !bf16 && o.tf32 ? ", tf32 products" : "",
                       comm == "nccl" ? ", NCCL" : comm == "host" ? ", host communicators" : "");
}

/// Plugs the chosen backend into the run's options; returns its label for the summary.
std::string configure_backend(const RunCliOptions& o, const Model& model, const Cluster& cluster, rt::RunOptions& ro) {
    const std::string comm = device_comm_choice(o, cluster);
    if (o.backend == "cpu") {
        if (o.precision == "bf16")
            throw InputError("--precision bf16 needs a device backend (--backend cuda or host-device): the CPU kernels "
                             "compute in fp32");
        if (o.tf32) throw InputError("--tf32 needs --backend cuda");
        return backend_label(o, model, cluster);
    }
    if (o.emulate) throw InputError(fmt::format("--emulate runs on the CPU backend, not --backend {}", o.backend));
    const rt::Elem elem = device_precision(o, model);
    if (o.backend == "host-device") {
        ro.backend = rt::make_device_stage_factory([](const rt::WorkerPlace&) { return rt::make_host_ops(); }, elem);
        if (comm == "host")  // each worker its own memory, as whole GPUs: everything crosses through the stand-in
            ro.memory_domain = [](const rt::WorkerPlace& p) { return std::optional<std::uint64_t>(p.device); };
        else
            ro.memory_domain = [](const rt::WorkerPlace&) { return std::optional<std::uint64_t>(0); };  // host memory
    } else {
        auto gpus = std::make_shared<rt::CudaDevices>(cluster);
        // With NCCL a stream may wait on a receive whose sender failed: host waits give up after
        // --timeout, as a worker waiting on a peer does.
        const auto wait_limit = comm == "nccl" ? std::chrono::milliseconds(static_cast<std::int64_t>(o.timeout_s * 1e3))
                                               : std::chrono::milliseconds(0);
        ro.backend = rt::make_device_stage_factory(
            [gpus, tf32 = o.tf32, wait_limit](const rt::WorkerPlace& p) { return gpus->ops(p.device, tf32, wait_limit); },
            elem);
        ro.memory_domain = [gpus](const rt::WorkerPlace& p) { return gpus->memory_domain(p.device); };
    }
    if (comm == "nccl")
        ro.device_fabric = std::make_shared<rt::DeviceFabric>(
            [timeout = ro.timeout](rt::Transport&) { return rt::make_nccl_library(timeout); });
    else if (comm == "host")
        ro.device_fabric =
            std::make_shared<rt::DeviceFabric>([](rt::Transport& t) { return rt::make_host_comm_library(t); });
    return backend_label(o, model, cluster);
}

int run_adaptive_cli(const RunCliOptions& o, const std::string& command, const Model& model, const Model& priced,
                     const Cluster& cluster, const Plan& plan, const CostModel& cost, const CostOptions& copt,
                     const PlanEstimate& predicted, const rt::RunOptions& ro, rt::MpiSession* mpi,
                     const std::string& backend) {
    rt::AdaptiveJob job{model, cluster, cost, copt, plan, ro, {}};
    job.priced = &priced;
    job.adaptive.window = o.window;
    job.adaptive.copy_every = o.copy_every;
    job.adaptive.policy.policy = Policy::adaptive;
    job.adaptive.policy.window = o.window;
    job.adaptive.policy.min_gain = o.min_gain;
    job.adaptive.policy.solver.objective = plan.objective;
    job.adaptive.policy.solver.max_replicas = o.max_replicas;
    job.adaptive.policy.solver.max_tp = o.max_tp;
    const rt::AdaptiveResult r = mpi ? rt::run_adaptive(job, mpi->transport()) : rt::run_adaptive_in_process(job);
    if (!r.writer) return 0;

    std::vector<double> ms;
    for (const rt::AdaptiveIteration& it : r.iterations) ms.push_back(it.seconds * 1e3);
    RunSummary summary = summarise(ms, model.global_batch, predicted.iteration_s * 1e3);
    summary.policy = "adaptive";
    summary.backend = ro.emulate ? backend + " (emulated devices)" : backend;
    summary.transport = mpi ? "mpi" : "in-process";
    summary.loss = r.loss;
    summary.weights_digest = rt::digest_text(r.weights_digest);
    summary.repartitions = r.repartitions;
    summary.migration_ms = r.migration_s * 1e3;
    summary.plan_versions = r.plans.size();
    std::string extra = "\n[adaptive]\n";
    extra += fmt::format("window = {}\ncopy_every = {}\nmin_gain = {}\n", o.window, o.copy_every, o.min_gain);
    extra += fmt::format("total_ms = {:.9g}\n", r.total_s() * 1e3);
    extra += fmt::format("failures_survived = {}\nrerun_iterations = {}\n", r.failures, r.rerun_iterations);
    extra += fmt::format("migrated_bytes = {}\ncopy_bytes = {}\nreplan_ms = {:.6g}\n", r.migrated_bytes, r.copy_bytes,
                         r.replan_s * 1e3);
    extra += "events = [\n";
    for (const rt::Decision& d : r.decisions)
        if (!d.text.empty()) extra += fmt::format("  {},\n", toml_string(fmt::format("iteration {}: {}", d.iteration, d.text)));
    extra += "]\n";
    summary.extra_toml = extra;

    fmt::print("ran {} iterations of {} on {} ({} agents, {}, adaptive, window {}{})\n", r.iterations.size(), model.name,
               cluster.name, rt::worker_places(plan).size(), summary.transport, o.window, ro.emulate ? ", emulated devices" : "");
    for (const rt::Decision& d : r.decisions)
        if (!d.text.empty()) fmt::print("  iteration {}: {}\n", d.iteration, d.text);
    fmt::print("iteration ms: mean {:.6g}, p50 {:.6g}, p99 {:.6g}; total {:.6g}; first plan predicted {:.6g}\n",
               summary.mean_iteration_ms, summary.p50_iteration_ms, summary.p99_iteration_ms, r.total_s() * 1e3,
               summary.predicted_iteration_ms);
    fmt::print("{} repartitions ({} B migrated in {:.3g} ms, re-planning {:.3g} ms), {} failures survived, {} iterations "
               "re-run; {} B of neighbour copies\n",
               r.repartitions, r.migrated_bytes, r.migration_s * 1e3, r.replan_s * 1e3, r.failures, r.rerun_iterations,
               r.copy_bytes);
    {
        // The last plan's segments: each worker's peak against that plan's prediction.
        const Plan& last = r.plans.back();
        std::vector<std::uint64_t> peak(rt::worker_places(last).size(), 0), cached(peak.size(), 0);
        for (const rt::Segment& seg : r.segments)
            if (seg.plan_version == r.plans.size())
                for (std::size_t w = 0; w < seg.workers.size() && w < peak.size(); ++w) {
                    peak[w] = std::max(peak[w], seg.workers[w].peak_device_bytes);
                    cached[w] = std::max(cached[w], seg.workers[w].cached_device_bytes);
                }
        summary.extra_toml += device_memory_report(last, estimate_plan(last, priced, cluster, cost, copt), peak, cached,
                                                   fmt::format(" (plan version {})", r.plans.size()));
    }
    if (!r.loss.empty()) fmt::print("loss: first {:.6g}, last {:.6g}\n", r.loss.front(), r.loss.back());
    fmt::print("weights_digest: {}\n", summary.weights_digest);
    if (!o.out_dir.empty()) write_adaptive_outputs(o, command, priced, cluster, cost, copt, ro, r, summary);
    return 0;
}

int run_run(const RunCliOptions& given, const std::string& command) {
    const auto timeout = std::chrono::milliseconds(static_cast<std::int64_t>(given.timeout_s * 1e3));
    // Under mpirun every rank reads the inputs and checks them; rank 0 reports and writes.
    std::unique_ptr<rt::MpiSession> mpi;
    if (rt::launched_by_mpi()) mpi = std::make_unique<rt::MpiSession>(timeout);
    const Model model = load_model(given.model);
    const Cluster cluster = load_cluster(given.cluster);
    Plan plan = load_plan(given.plan, model, cluster);
    // A plan made for a precision (dpart plan --precision) runs in it unless --precision says otherwise.
    RunCliOptions o = given;
    if (o.precision.empty() && plan.precision && o.backend != "cpu") o.precision = to_string(*plan.precision);
    CostOptions copt;
    copt.recompute = o.recompute || plan.recompute;  // a plan made with --recompute runs with it
    copt.shard_optimizer = o.shard_optimizer || plan.shard_optimizer;  // as a plan made with --shard-optimizer
    // The plan as it runs, in the files it writes too (replay then predicts what ran).
    plan.recompute = copt.recompute;
    plan.shard_optimizer = copt.shard_optimizer;
    // The CPU kernels keep an fp32 log-sum-exp per row and head, as fused attention does; the
    // device backends materialise the probabilities. Predict, and write, what runs.
    const bool materialises = o.backend != "cpu";
    const auto note = [&](bool planned, const std::string& what) {
        if (planned && (!mpi || mpi->transport().rank() == 0))
            fmt::print(stderr, "note: {} was planned for {}; its prediction here counts what runs\n", o.plan, what);
    };
    note(plan.fused_attention && materialises,
         fmt::format("fused attention kernels (fused_attention = true), and the {} backend materialises attention",
                     o.backend));
    copt.fused_attention = !materialises && model.total().fused_saved_less > 0;
    plan.fused_attention = copt.fused_attention;
    // Both backends hold the embedding and the loss whole on every tensor-parallel rank.
    note(plan.vocab_parallel, "a vocabulary-parallel embedding and loss (vocab_parallel = true), and dpart run holds "
                              "them whole on every tensor-parallel rank");
    plan.vocab_parallel = false;
    // Priced as it runs: activations in the compute precision, the training state the stages
    // keep (fp32 master weights, gradients and moments, and in bf16 a compute copy; ZeRO-1
    // divides the moments only), fp32 gradients summed across replicas.
    std::optional<Model> retyped;
    const Model& priced = in_dtype(model, run_dtype(o, model), retyped);
    if (plan.precision && *plan.precision != priced.dtype)
        note(true, fmt::format("dpart run computing in {} (precision = \"{}\"), and this run computes in {}",
                               to_string(*plan.precision), to_string(*plan.precision), to_string(priced.dtype)));
    // The plan as it ran records the device backends' precision; the CPU backend computes in
    // fp32 whatever a plan says, and leaves the plan's as it was (a bf16 model's plan run here
    // then still runs in bf16 on a device backend).
    if (o.backend != "cpu") plan.precision = priced.dtype;
    copt = run_state_options(copt, priced.dtype);
    const CliCostModel cost_model(priced, cluster, copt, o.layer_times);
    const CostModel& cost = cost_model.get();
    const PlanEstimate predicted = estimate_plan(plan, priced, cluster, cost, copt);
    check_device_memory(o, plan, predicted, cluster, priced.dtype, !mpi || mpi->transport().rank() == 0);

    rt::RunOptions ro;
    ro.iterations = o.iterations;
    ro.seed = o.seed;
    ro.dataset_batches = o.dataset_batches;
    if (!o.scenario.empty()) ro.scenario = load_scenario(o.scenario, cluster);
    ro.optimizer.kind = o.optimizer == "sgd" ? rt::OptimizerKind::sgd : rt::OptimizerKind::adam;
    ro.optimizer.lr = static_cast<float>(o.lr);
    ro.timeout = timeout;
    ro.fault = rt::fault_from_environment();
    ro.checkpoint_every = o.checkpoint_every;
    ro.checkpoint_dir = o.resume.empty() ? o.checkpoint_dir : o.resume;
    ro.resume = !o.resume.empty();
    ro.emulate = o.emulate;
    ro.recompute = copt.recompute;
    ro.shard_optimizer = copt.shard_optimizer;
    if (o.adaptive && (ro.checkpoint_every > 0 || ro.resume))
        throw InputError("--adaptive keeps its state in memory (snapshots and neighbour copies): it does not take "
                         "--checkpoint-every or --resume");
    if (ro.checkpoint_every > 0 && ro.checkpoint_dir.empty())
        throw InputError("--checkpoint-every needs --checkpoint-dir (or --resume DIR)");
    if (ro.checkpoint_every > 0) {
        std::error_code ec;
        std::filesystem::create_directories(ro.checkpoint_dir, ec);
        if (ec) throw RuntimeError(fmt::format("cannot create {}: {}", ro.checkpoint_dir, ec.message()));
    }
    std::string backend = configure_backend(o, model, cluster, ro);
    if (ro.recompute) backend += " (recompute)";
    if (ro.shard_optimizer) backend += " (ZeRO-1)";
    const rt::Execution ex(plan, model, predicted, ro);
    check_host_memory(ex, predicted, priced);
    if (o.adaptive)
        return run_adaptive_cli(o, command, model, priced, cluster, plan, cost, copt, predicted, ro, mpi.get(), backend);

    rt::RunResult run;
    if (mpi) {
        run = rt::run_distributed(ex, mpi->transport());
        if (mpi->transport().rank() != 0) return 0;
    } else {
        run = rt::run_in_process(ex);
    }

    std::vector<double> ms;
    for (double s : run.iteration_s) ms.push_back(s * 1e3);
    RunSummary summary = summarise(ms, model.global_batch, predicted.iteration_s * 1e3);
    summary.policy = "static";
    summary.backend = backend;
    summary.transport = mpi ? "mpi" : "in-process";
    summary.loss = run.loss;
    summary.weights_digest = rt::digest_text(run.weights_digest);

    fmt::print("ran {} iterations of {} on {} ({} workers, {}, {} {})\n", run.iteration_s.size(), model.name,
               cluster.name, ex.workers(), summary.transport, to_string(ro.optimizer.kind), o.lr);
    fmt::print("iteration ms: mean {:.6g}, p50 {:.6g}, p99 {:.6g}; predicted {:.6g} ({:+.3g}%); {:.6g} samples/s\n",
               summary.mean_iteration_ms, summary.p50_iteration_ms, summary.p99_iteration_ms,
               summary.predicted_iteration_ms, summary.prediction_error_pct, summary.samples_per_s);
    if (run.first_iteration > 0) fmt::print("resumed from the checkpoint at iteration {}\n", run.first_iteration);
    std::vector<std::uint64_t> peak(ex.workers(), 0), cached(ex.workers(), 0);
    for (const rt::WorkerReport& w : run.workers) {
        peak.at(w.rank) = w.peak_device_bytes;
        cached.at(w.rank) = w.cached_device_bytes;
    }
    summary.extra_toml += device_memory_report(ex.plan(), predicted, peak, cached, "");
    if (!run.loss.empty()) fmt::print("loss: first {:.6g}, last {:.6g}\n", run.loss.front(), run.loss.back());
    fmt::print("weights_digest: {}\n", summary.weights_digest);
    if (!o.out_dir.empty()) write_outputs(o, command, model, cluster, ex, predicted, run, summary);
    return 0;
}

}  // namespace

void setup_run(CLI::App& app, Action& action, const std::string& command) {
    auto o = std::make_shared<RunCliOptions>();
    CLI::App* cmd = app.add_subcommand(
        "run", "Execute a plan as real training steps on CPU workers (threads, or ranks under mpirun) and measure it");
    cmd->add_option("plan", o->plan, "plan.toml (as written by dpart plan, or by hand)")->required();
    cmd->add_option("--model,-m", o->model, "model.toml")->required();
    cmd->add_option("--cluster,-c", o->cluster, "cluster.toml")->required();
    cmd->add_option("--scenario,-s", o->scenario,
                    "scenario.toml (as for replay): a slowed device's worker waits out the extra time of its work; a "
                    "failed device stops the run");
    cmd->add_option("--iterations,-n", o->iterations, "training steps to run")
        ->check(CLI::Range(std::uint64_t{1}, std::uint64_t{10000000}))
        ->capture_default_str();
    cmd->add_option("--seed", o->seed, "seed of the weights and data: the same seed gives the same run")
        ->capture_default_str();
    cmd->add_option("--dataset-batches", o->dataset_batches,
                    "the synthetic data set holds this many global batches, trained on in turn")
        ->check(CLI::Range(std::uint64_t{1}, std::uint64_t{1} << 40))
        ->capture_default_str();
    cmd->add_option("--optimizer", o->optimizer, "sgd or adam (PyTorch's arithmetic)")
        ->check(CLI::IsMember({"sgd", "adam"}))
        ->capture_default_str();
    cmd->add_option("--lr", o->lr, "learning rate")->check(CLI::Range(0.0, 1e3))->check(finite_number)->capture_default_str();
    cmd->add_option("--timeout", o->timeout_s, "seconds a worker waits for a peer before it stops the run (with --device-comm nccl, also for its GPU's queued work)")
        ->check(CLI::Range(0.01, 86400.0))
        ->check(finite_number)
        ->capture_default_str();
    cmd->add_option("--out-dir,-o", o->out_dir,
                    "write iterations.csv, stages.csv, timeline.csv and summary.toml there (atomically)");
    cmd->add_option("--checkpoint-every", o->checkpoint_every,
                    "every K iterations, write every worker's state (parameters, optimizer moments) to --checkpoint-dir")
        ->check(CLI::Range(std::uint64_t{0}, std::uint64_t{1} << 40));
    cmd->add_option("--checkpoint-dir", o->checkpoint_dir, "where checkpoints go (created if missing)");
    cmd->add_option("--resume", o->resume,
                    "continue from the last checkpoint in this directory (same plan, model, seed, data and optimizer); "
                    "with --checkpoint-every it keeps checkpointing there");
    cmd->add_option("--layer-times", o->layer_times,
                    "measured layer times (dpart profile --model ... --layer-times FILE): used for the cluster's devices "
                    "of the kind they were measured on, instead of the roofline");
    cmd->add_flag("--recompute", o->recompute,
                  "activation checkpointing, as dpart plan --recompute assumes: a stage keeps only its inputs between "
                  "forward and backward and recomputes the rest (the same values); the prediction counts it");
    cmd->add_flag("--shard-optimizer", o->shard_optimizer,
                  "ZeRO-1, as dpart plan --shard-optimizer assumes: a stage's replicas reduce-scatter its gradients, each "
                  "steps its part of the parameters (holding that part's optimizer state only), then they all-gather the "
                  "parts (the same values)");
    cmd->add_flag("--emulate", o->emulate,
                  "emulated devices: every task takes the time the cluster file predicts for it (compute, then wait out "
                  "the rest), so that a small host runs a cluster's timing");
    cmd->add_option("--backend", o->backend,
                    "what computes: cpu (the CPU kernels, fp32), cuda (cuBLAS and dpart's kernels on this machine's "
                    "GPUs or their green-context partitions), or host-device (the cuda backend's layers on host "
                    "memory: its code path without a GPU, for tests)")
        ->check(CLI::IsMember({"cpu", "cuda", "host-device"}))
        ->capture_default_str();
    cmd->add_option("--precision", o->precision,
                    "device backends' compute precision: fp32 or bf16 (default: the plan's precision, else the model's "
                    "dtype; the cpu backend is fp32)")
        ->check(CLI::IsMember({"fp32", "bf16"}));
    cmd->add_flag("--tf32", o->tf32, "cuda backend, fp32: matrix products on TF32 tensor cores");
    cmd->add_option("--device-comm", o->device_comm,
                    "device backends: how activations, gradients and all-reduces move between workers that do not "
                    "share memory: nccl (NCCL send/recv and all-reduce; whole GPUs, one per worker), host (NCCL's "
                    "calls rehearsed over the transport: every worker its own memory; for tests), or off (through "
                    "host tensors)")
        ->check(CLI::IsMember({"nccl", "host", "off"}))
        ->capture_default_str();
    cmd->add_flag("--adaptive", o->adaptive,
                  "repartition live: measure stage times, re-plan every --window iterations, migrate the layers that "
                  "change owner; survive a device that fails (scenario) by rolling back to the last neighbour copy");
    cmd->add_option("--window", o->window, "adaptive: iterations between the controller's decisions")
        ->check(CLI::Range(std::uint64_t{1}, std::uint64_t{1} << 40))
        ->capture_default_str();
    cmd->add_option("--copy-every", o->copy_every,
                    "adaptive: every K iterations each worker snapshots its state and copies it to its neighbour")
        ->check(CLI::Range(std::uint64_t{1}, std::uint64_t{1} << 40))
        ->capture_default_str();
    cmd->add_option("--min-gain", o->min_gain, "adaptive: least predicted gain per iteration (fraction) worth a repartition")
        ->check(CLI::Range(0.0, 1.0))
        ->check(finite_number)
        ->capture_default_str();
    cmd->add_option("--max-replicas", o->max_replicas,
                    "adaptive: re-plans use at most this many data-parallel replicas per stage (0: no limit; 1 keeps "
                    "plans pipeline-only, so that the weights stay bitwise those of a static run)")
        ->capture_default_str();
    cmd->add_option("--max-tp", o->max_tp, "adaptive: largest tensor-parallel degree of re-plans")
        ->check(CLI::Range(1u, 64u))
        ->capture_default_str();
    cmd->add_option("--timeline", o->timeline, "which iterations timeline.csv holds: ends (the first and last) or all")
        ->check(CLI::IsMember({"ends", "all"}))
        ->capture_default_str();
    cmd->footer(
        "One worker per device of the plan. Without mpirun the workers are threads of this process; under\n"
        "mpirun each rank is one worker (ranks = devices of the plan) and rank 0 writes the files.\n"
        "Examples:\n"
        "  dpart plan plans/models/seed-mlp.toml -c plans/clusters/cpu-local.toml --out plan.toml\n"
        "  dpart run plan.toml -m plans/models/seed-mlp.toml -c plans/clusters/cpu-local.toml -n 20 --out-dir run/\n"
        "  mpirun -np 2 dpart run plan.toml -m plans/models/seed-mlp.toml -c plans/clusters/cpu-local.toml\n"
        "Exit codes: 2 when the plan does not match the model, the cluster or the number of ranks;\n"
        "1 when a worker fails or a peer does not answer within --timeout.");
    cmd->callback([o, &action, command] { action = [o, command] { return run_run(*o, command); }; });
}

}  // namespace dpart::cli
