#pragma once
// The schedule executor: one worker per device of a plan (a thread, or an MPI rank) runs its
// stage's part of the simulator's schedule (sim::stage_order: the same 1F1B or GPipe order the
// planner predicts), computing real forward and backward passes through a Backend's kernels,
// exchanging activations and gradients through a Transport, all-reducing gradients across
// replicas in a fixed order and stepping the optimizer. Everything it does is timed.
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <stop_token>
#include <string>
#include <vector>

#include "dpart/plan/estimate.hpp"
#include "dpart/plan/plan.hpp"
#include "dpart/runtime/backend.hpp"
#include "dpart/runtime/optimizer.hpp"
#include "dpart/runtime/stage_compute.hpp"
#include "dpart/runtime/transport.hpp"
#include "dpart/sim/scenario.hpp"
#include "dpart/sim/schedule.hpp"

namespace dpart::rt {

class DeviceFabric;

struct RunOptions {
    std::uint64_t iterations = 10;
    std::uint64_t seed = 1;
    /// The data is a fixed set of this many global batches, taken in turn (iteration i trains
    /// on batch i mod dataset_batches), so that the loss shows learning.
    std::uint64_t dataset_batches = 1;
    OptimizerOptions optimizer;
    /// Slowdowns, failures and link changes to impose (the replay's scenario format). A slowed
    /// device's worker, after each compute task of duration d, waits out (factor - 1) x d
    /// (sleeping, so that it does not take a core from the others); a slowed link makes the
    /// sender wait out (factor - 1) x its send's time; a failed device's worker stops the run
    /// (re-planning around it is the adaptive runtime's job).
    Scenario scenario;
    /// How long any worker waits for a peer before it gives up.
    std::chrono::milliseconds timeout{60000};
    /// Fault injection for tests: worker `rank` fails at the start of `iteration`, by throwing
    /// (exit = false) or by ending its process at once (exit = true, as a crashed rank does).
    struct Fault {
        std::size_t rank = 0;
        std::uint64_t iteration = 0;
        bool exit = false;
    };
    std::optional<Fault> fault;
    /// Every `checkpoint_every` iterations (0 = never) each worker writes its state (parameters
    /// and optimizer moments) under `checkpoint_dir`, atomically, and rank 0 then records the
    /// iteration in checkpoint.toml: a checkpoint exists only once every worker's file does.
    std::uint64_t checkpoint_every = 0;
    std::string checkpoint_dir;
    /// Continue from the checkpoint in `checkpoint_dir` (the same plan, model, seed, data and
    /// optimizer, checked by a fingerprint) instead of from the initial weights.
    bool resume = false;
    /// The first iteration to run; `iterations` is the end (exclusive). An adaptive run executes
    /// its plans in segments [start_iteration, iterations).
    std::uint64_t start_iteration = 0;
    /// Emulated devices: every task takes the time the cost model predicts for it on its device
    /// (times a scenario's factor): the worker computes, then waits out the rest of that time (a
    /// send waits first, then sends). The figures are then those of the cluster file, whatever
    /// the host's cores do; a task slower than predicted is not shortened.
    bool emulate = false;
    /// Adaptive runs: at the start of an iteration at which a device has failed, its worker leaves,
    /// telling the others through the start-of-iteration vote, and every worker stops there
    /// (WorkerReport::stopped_at, ::left) instead of the run failing.
    bool leave_on_failure = false;
    /// What computes each worker's stage: null for the CPU kernels (make_cpu_stage), or a device
    /// backend (make_device_stage_factory).
    StageFactory backend;
    /// A device backend's memory: the domain each worker's tensors live in (null, or nullopt: host
    /// memory). Two workers of one process (an in-process transport) in the same domain hand
    /// activations and gradients to each other on the device (DeviceHandoff: a device-to-device
    /// copy, the receiver then owning and releasing the buffer), so a domain's DeviceOps must
    /// read, copy and release each other's allocations: the partitions of one GPU, the host.
    std::function<std::optional<std::uint64_t>(const WorkerPlace&)> memory_domain;
    /// A device backend's communicators (NCCL between whole GPUs; runtime/device_comm.hpp): each
    /// worker connects at its start, and what it hands to, or all-reduces with, workers not
    /// sharing its memory moves between the devices instead of through host tensors. Null: host.
    std::shared_ptr<DeviceFabric> device_fabric;
    /// Activation checkpointing (`dpart plan --recompute`'s memory model): a stage keeps only its
    /// inputs, and what it sends on, between a microbatch's forward and backward; its backward runs
    /// the forward again first. Every value is the same (the kernels are deterministic, dropout
    /// masks drawn from the sample index).
    bool recompute = false;
    /// ZeRO-1 (`dpart plan --shard-optimizer`'s memory model; on whenever the plan says so): the
    /// replicas of a stage reduce-scatter its gradients, each steps its part of the parameters
    /// (optimizer_part) holding only that part's Adam moments, then they all-gather the parts.
    /// The values are bitwise those of the unsharded run (the same sums, an elementwise step).
    bool shard_optimizer = false;
};


/// Reads a fault from DPART_INJECT_FAULT="rank:iteration[:exit]" (unset: none). Throws
/// InputError when it is malformed.
[[nodiscard]] std::optional<RunOptions::Fault> fault_from_environment();

[[nodiscard]] std::vector<WorkerPlace> worker_places(const Plan& plan);

/// One timed task of a worker, in seconds from the start of its iteration.
struct TaskRecord {
    std::uint32_t iteration = 0;
    TaskKind kind = TaskKind::forward;
    std::uint32_t microbatch = 0;
    double start_s = 0;
    double end_s = 0;
};

struct WorkerReport {
    std::size_t rank = 0;
    std::vector<TaskRecord> tasks;
    std::vector<double> busy_s;  ///< per iteration: when its last task ended
    std::vector<double> loss;    ///< per iteration: its part of the loss (0 off the last stage)
    /// Final state of its stage's layers (its shard; moments only when kept by run_worker's caller).
    std::vector<ShardState> state;
    /// The iteration it stopped before: RunOptions::iterations, or the one at which `left` left.
    std::uint64_t stopped_at = 0;
    std::vector<std::size_t> left;  ///< transport ranks that left (RunOptions::leave_on_failure)
    /// A device stage's peak of device memory held (MemoryMeter), in bytes; 0 when not measured
    /// (the CPU stage).
    std::uint64_t peak_device_bytes = 0;
    /// Of those, the stage's cache of synthetic inputs and labels (StageCompute::DeviceMemory).
    std::uint64_t cached_device_bytes = 0;
    /// An idle member's measurement of itself (run_idle with an IdleProbe): seconds of the probe's
    /// timed microbatch, and whether it finished (else the time until the segment ended: a lower
    /// bound). Not sent with the report: its agent reads it.
    std::optional<double> probe_s;
    bool probe_finished = false;
};

/// What a member holding no stage measures of its own device while the others train (an
/// adaptive run's way to see that a device it left out for being slow is fast again): replica
/// 0's share of one microbatch through forward and backward of stage `stage`'s layers, unsplit
/// (tensor-parallel degree 1), with fresh weights and inputs: once to warm up, then
/// idle_probe_repeats times, the median kept, under the scenario's slowdown of the device at the
/// segment's first iteration (emulated as the workers' is).
inline constexpr std::uint32_t idle_probe_repeats = 5;
struct IdleProbe {
    std::size_t stage = 0;
    /// The cost model's time for it on this device: what an emulated device takes
    /// (RunOptions::emulate), times the slowdown.
    double predicted_s = 0;
};

/// Which transport rank runs each worker of a plan, and which ranks vote at the start of every
/// iteration (they include ranks holding no stage, in an adaptive run). Empty: worker w is rank w,
/// and the members are the workers.
struct RankMap {
    std::vector<std::size_t> of_worker;
    std::vector<std::size_t> members;
};

/// The initial training state of a layer's shard: the parameters a pure function of (seed,
/// layer) (a tied linear layer starts from its embedding's table), zero moments.
[[nodiscard]] ShardState initial_state(const Model& model, std::size_t layer, Shard shard, std::uint64_t seed);

/// Everything workers share, computed once from the plan: the layers each stage receives
/// and sends, each replica's samples of a microbatch, and the kernels' parameter sizes.
class Execution {
public:
    /// Throws InputError when the model has an op without a CPU kernel or a stage's layers do
    /// not split over its tensor-parallel degree.
    Execution(const Plan& plan, const Model& model, const PlanEstimate& estimate, RunOptions options,
              RankMap ranks = {});

    [[nodiscard]] const Plan& plan() const noexcept { return plan_; }
    [[nodiscard]] const Model& model() const noexcept { return model_; }
    [[nodiscard]] const RunOptions& options() const noexcept { return options_; }
    [[nodiscard]] const std::vector<WorkerPlace>& places() const noexcept { return places_; }
    [[nodiscard]] std::size_t workers() const noexcept { return places_.size(); }

    /// Runs worker `rank`'s part of every iteration over `net`. On failure it aborts `net` (so
    /// the others stop) and rethrows, naming the rank, its device and the iteration.
    /// With `state`: starts from it when it is not empty (the stage's layers in order) and
    /// leaves the final state, moments included, in it instead of in the report.
    [[nodiscard]] WorkerReport run_worker(std::size_t rank, Transport& net,
                                          std::vector<ShardState>* state = nullptr) const;
    /// A member holding no stage (an adaptive run's spare device): takes part in the votes at
    /// the start of every iteration, on behalf of `device`, until the end or a departure. With a
    /// probe, it measures it on another thread meanwhile (WorkerReport::probe_s): the votes do not
    /// wait for it, and a probe still waiting out a slowdown when the last vote is over stops
    /// there. A probe that fails (no memory for the layers) measures nothing.
    [[nodiscard]] WorkerReport run_idle(std::size_t device, Transport& net, const IdleProbe* probe = nullptr) const;
    /// The probe's measurement, into report.probe_s and probe_finished (run_idle's other thread).
    void measure_probe(const IdleProbe& probe, std::size_t device, double slowdown, std::stop_token stop,
               WorkerReport& report) const;

    // Facts about the plan the workers (and tests) use.
    /// Layers whose outputs stage `s` receives from stage s-1 (ascending; empty for stage 0).
    [[nodiscard]] const std::vector<std::size_t>& live_in(std::size_t s) const { return live_in_.at(s); }
    /// Samples of a microbatch each replica of stage `s` takes, and where they start.
    [[nodiscard]] const std::vector<std::uint64_t>& shares(std::size_t s) const { return shares_.at(s); }
    [[nodiscard]] const std::vector<std::uint64_t>& offsets(std::size_t s) const { return offsets_.at(s); }
    /// The rank of (stage, replica, tp rank).
    [[nodiscard]] std::size_t rank_of(std::size_t stage, std::size_t replica, std::size_t tp_rank) const;
    /// The transport rank of worker `w`, and the ranks that vote at the start of an iteration.
    [[nodiscard]] std::size_t transport_rank(std::size_t w) const { return ranks_.of_worker.at(w); }
    [[nodiscard]] const std::vector<std::size_t>& members() const noexcept { return ranks_.members; }
    /// The cost model's prediction for stage `s` (what emulated devices take).
    [[nodiscard]] const StageEstimate& predicted(std::size_t s) const { return predicted_.at(s); }
    /// The first iteration to run: 0, or the checkpoint's when resuming.
    [[nodiscard]] std::uint64_t first_iteration() const noexcept { return first_iteration_; }
    /// What must not change between a checkpoint and its resume, as a digest.
    [[nodiscard]] std::string fingerprint() const;
    /// Bytes every worker together holds for parameters, gradients and Adam's two moments (4
    /// fp32 values per parameter of each shard; the moments once per stage under ZeRO-1), before
    /// activations.
    [[nodiscard]] std::uint64_t state_bytes() const noexcept { return state_bytes_; }
    /// The embedding a tied linear layer shares its weight with: {embedding, linear}, if any.
    [[nodiscard]] const std::vector<std::pair<std::size_t, std::size_t>>& tied() const noexcept { return tied_; }

private:
    Plan plan_;
    const Model& model_;
    RunOptions options_;
    std::vector<WorkerPlace> places_;
    RankMap ranks_;
    std::vector<StageEstimate> predicted_;
    std::vector<std::size_t> first_rank_;  // per stage
    std::vector<std::vector<std::size_t>> live_in_;
    std::vector<std::vector<std::uint64_t>> shares_, offsets_;
    std::vector<std::pair<std::size_t, std::size_t>> tied_;
    std::uint64_t state_bytes_ = 0;
    std::uint64_t first_iteration_ = 0;
};

struct RunResult {
    std::uint64_t first_iteration = 0;  ///< iteration_s[i] is iteration first_iteration + i
    std::vector<double> iteration_s;
    std::vector<double> loss;  ///< per iteration: the mean loss over the global batch
    std::vector<WorkerReport> workers;
    /// Final parameters per layer in the canonical layout; a tied linear layer's shared weight
    /// is left out (it is its embedding's).
    std::vector<std::vector<float>> weights;
    std::uint64_t weights_digest = 0;
};

/// Every layer's parameters in the canonical layout, assembled from replica 0 of each stage of
/// `plan`: shard(stage, tp_rank, layer) gives that worker's shard of the layer. A tied linear
/// layer's shared weight is left out (it is its embedding's).
[[nodiscard]] std::vector<std::vector<float>> canonical_weights(
    const Model& model, const Plan& plan,
    const std::function<const std::vector<float>&(std::size_t stage, std::uint32_t tp_rank, std::size_t layer)>& shard);

/// Runs body(0) .. body(n - 1) on n threads and waits for all. When bodies throw, rethrows the
/// error that stopped the others (not a PeerStopped it caused, unless that is all there is).
void run_on_threads(std::size_t n, const std::function<void(std::size_t)>& body);

/// Every worker a thread of this process, over in-process queues.
[[nodiscard]] RunResult run_in_process(const Execution& ex);

/// This process is one rank of `net` (size = ex.workers()): runs its worker, then rank 0
/// gathers every report and returns the whole result; the other ranks return an empty one.
[[nodiscard]] RunResult run_distributed(const Execution& ex, Transport& net);

/// A report as a message (its tasks, times, losses, stop and final parameters; not the moments).
[[nodiscard]] Bytes serialise_report(const WorkerReport& w);
[[nodiscard]] WorkerReport deserialise_report(const Bytes& b, std::size_t rank);

/// FNV-1a (64-bit) over the bytes of every parameter, layer by layer.
[[nodiscard]] std::uint64_t digest(const std::vector<std::vector<float>>& weights);
[[nodiscard]] std::string digest_text(std::uint64_t digest);

}  // namespace dpart::rt
