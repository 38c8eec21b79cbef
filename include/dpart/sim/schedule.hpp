#pragma once
// A pipeline schedule as an explicit task graph for one iteration: forward and backward of
// each microbatch on each stage, the activation and gradient transfers between stages, the
// data-parallel all-reduce and the optimizer step, with their dependencies. The planner's
// predicted iteration time is this graph's exact makespan; the simulator and the runtime
// execute the same graph.
#include <algorithm>
#include <array>
#include <cstdint>
#include <string_view>
#include <vector>

namespace dpart {

enum class ScheduleKind { one_f_one_b, gpipe };

[[nodiscard]] std::string_view to_string(ScheduleKind s) noexcept;

enum class TaskKind { forward, backward, send_activation, send_gradient, allreduce, optimizer };

[[nodiscard]] std::string_view to_string(TaskKind k) noexcept;

/// A transfer's link when no other stage uses it: its own resource, in microbatch order.
inline constexpr std::uint32_t private_link = UINT32_MAX;

/// Per-stage durations (seconds) of one microbatch's work, and of the per-iteration steps.
/// The all-reduce time a stage still waits for after its last backward: all of it, or with
/// --overlap-allreduce what that backward does not hide; under ZeRO-1 (`sharded`) only the
/// reduce-scatter half can hide (the all-gather comes after the optimizer's step).
[[nodiscard]] constexpr double exposed_allreduce(double allreduce, double backward, bool overlap, bool sharded) noexcept {
    if (!overlap) return allreduce;
    const double hideable = sharded ? allreduce / 2 : allreduce;
    return std::max(0.0, hideable - backward) + (allreduce - hideable);
}

struct StageDurations {
    double forward = 0;
    double backward = 0;
    double send_activation = 0;  ///< to the next stage (unused on the last)
    double send_gradient = 0;    ///< to the previous stage (unused on the first)
    double allreduce = 0;        ///< gradients across the stage's replicas, once per iteration
    double optimizer = 0;        ///< the optimizer step, once per iteration
    /// ZeRO-1 across replicas: the all-reduce is a reduce-scatter before the step and an
    /// all-gather after it, so only its first half can overlap the backward.
    bool sharded = false;
    /// The physical links the two sends use: transfers of any stage with the same id share one
    /// link, which carries one transfer at a time, first come first served.
    std::uint32_t activation_link = private_link;
    std::uint32_t gradient_link = private_link;
};

/// What a task occupies: a stage's devices, one direction of the link between two stages, or
/// a link several stages' transfers share.
struct Resource {
    enum class Kind { stage, forward_link, backward_link, shared_link } kind = Kind::stage;
    std::uint32_t stage = 0;  ///< for links: the sending stage; for shared links: the link id
    /// Tasks on a shared link are not ordered in advance: the simulator serves them in the
    /// order they become ready.
    [[nodiscard]] bool shared() const noexcept { return kind == Kind::shared_link; }
};

struct Task {
    TaskKind kind = TaskKind::forward;
    std::uint32_t stage = 0;       ///< the stage that does (or sends) it
    std::uint32_t microbatch = 0;  ///< unused for all-reduce and optimizer
    std::uint32_t resource = 0;    ///< index into TaskGraph::resources
    double duration = 0;
    /// Tasks that must end before this one starts, including the previous task on the same
    /// resource (unless the resource is shared). Always smaller indices: tasks are stored in a topological order. At most three
    /// (its input, the previous task on its resource, and for a backward its own forward).
    std::array<std::uint32_t, 3> dep{};
    std::uint8_t deps = 0;
    void add_dep(std::uint32_t d) { dep[deps++] = d; }
};

struct TaskGraph {
    ScheduleKind schedule = ScheduleKind::one_f_one_b;
    std::uint32_t stages = 0;
    std::uint32_t microbatches = 0;
    std::vector<Resource> resources;
    std::vector<Task> tasks;
};

/// The order in which a stage runs its forward (true) and backward (false) passes.
struct StageStep {
    bool forward = true;
    std::uint32_t microbatch = 0;
};
[[nodiscard]] std::vector<StageStep> stage_order(ScheduleKind schedule, std::uint32_t stage, std::uint32_t stages,
                                                 std::uint32_t microbatches);

/// Builds the task graph of one iteration. `overlap_allreduce` lets a stage's all-reduce start
/// with its last microbatch's backward instead of after it (it still ends no earlier than it).
[[nodiscard]] TaskGraph build_schedule(ScheduleKind schedule, const std::vector<StageDurations>& stages,
                                       std::uint32_t microbatches, bool overlap_allreduce = false);

struct Timeline {
    std::vector<double> start;  ///< per task, seconds from the iteration's start
    std::vector<double> end;
    double makespan = 0;
};

/// Per stage, the most microbatches whose activations it holds at once (forwards ended and their
/// backwards not yet ended): the in-flight count the memory model charges.
[[nodiscard]] std::vector<std::uint32_t> peak_in_flight(const TaskGraph& graph, const struct Timeline& timeline);

/// Earliest start of every task (each starts when all its dependencies have ended, and on a
/// shared link when the link is free, first ready first served): the exact makespan of the
/// graph.
[[nodiscard]] Timeline simulate(const TaskGraph& graph);

}  // namespace dpart
