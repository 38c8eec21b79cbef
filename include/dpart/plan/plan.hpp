#pragma once
// A partition plan as a value: pipeline stages, each a contiguous layer range on a group of
// devices (data-parallel replicas x a tensor-parallel group), with the microbatching.
#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#include "dpart/core/error.hpp"
#include "dpart/graph/dtype.hpp"
#include "dpart/sim/schedule.hpp"

namespace dpart {

enum class Objective { iteration, throughput };
[[nodiscard]] std::string_view to_string(Objective o) noexcept;

struct Stage {
    std::size_t first_layer = 0;  ///< inclusive
    std::size_t last_layer = 0;   ///< inclusive
    /// Device indices into the cluster: replica k is devices[k*tp .. (k+1)*tp).
    std::vector<std::size_t> devices;
    std::uint32_t tp = 1;
    SourceLocation where;  ///< where a loaded plan wrote it (for messages)

    [[nodiscard]] std::size_t replicas() const noexcept { return tp == 0 ? 0 : devices.size() / tp; }
    friend bool operator==(const Stage& a, const Stage& b) {
        return a.first_layer == b.first_layer && a.last_layer == b.last_layer && a.devices == b.devices && a.tp == b.tp;
    }
};

struct Plan {
    Objective objective = Objective::iteration;
    ScheduleKind schedule = ScheduleKind::one_f_one_b;
    std::uint64_t microbatch_size = 1;
    std::uint64_t microbatches = 1;
    std::vector<Stage> stages;
    /// Activation checkpointing (dpart plan --recompute): the plan's memory and time assume it,
    /// and dpart run executes it so.
    bool recompute = false;
    /// ZeRO-1 (dpart plan --shard-optimizer): each replica of a stage keeps and steps the
    /// optimizer state of its 1/replicas part of the stage's parameters; dpart run executes it so.
    bool shard_optimizer = false;
    /// Planned for fused attention kernels (dpart plan --fused-attention): no s x s probabilities
    /// kept. dpart run materialises them, and predicts its memory without this.
    bool fused_attention = false;
    /// Planned for Megatron-LM's vocabulary-parallel embedding and loss (dpart plan
    /// --vocab-parallel); dpart run holds them whole on every rank, and predicts so.
    bool vocab_parallel = false;
    /// Planned for dpart run computing in this precision (dpart plan --precision): the model
    /// priced in it, with the training state dpart run keeps (cost: run_state_options); dpart run
    /// computes in it unless told otherwise. Unset: the model's dtype and the planner's state.
    std::optional<DType> precision;
    SourceLocation where;

    friend bool operator==(const Plan& a, const Plan& b) {
        return a.objective == b.objective && a.schedule == b.schedule && a.microbatch_size == b.microbatch_size &&
               a.microbatches == b.microbatches && a.stages == b.stages && a.recompute == b.recompute &&
               a.shard_optimizer == b.shard_optimizer && a.fused_attention == b.fused_attention &&
               a.vocab_parallel == b.vocab_parallel && a.precision == b.precision;
    }
};

}  // namespace dpart
