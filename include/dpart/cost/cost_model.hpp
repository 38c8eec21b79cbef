#pragma once
// What work costs in seconds: a layer's forward or backward pass on a device, a transfer between
// two devices, a collective over a group. The planner, the simulator and the runtime's
// predictions all ask this interface; AnalyticalCostModel answers from the cluster's figures
// (roofline), a measured model (dpart profile) or a test's table can stand in.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "dpart/cluster/cluster.hpp"
#include "dpart/graph/model.hpp"

namespace dpart {

enum class Pass { forward, backward };

/// seconds(bytes) = 0 when bytes == 0, else fixed + per_byte * bytes.
struct AllreduceCost {
    double fixed = 0;
    double per_byte = 0;
    [[nodiscard]] double operator()(std::uint64_t bytes) const noexcept {
        return bytes == 0 ? 0.0 : fixed + per_byte * static_cast<double>(bytes);
    }
};

class CostModel {
public:
    virtual ~CostModel() = default;

    /// Seconds for `samples` samples of layer `layer` on `device`, split `tp` ways by tensor
    /// parallelism (the tensor-parallel all-reduces over the device's node included).
    [[nodiscard]] virtual double layer_seconds(std::size_t layer, Pass pass, std::size_t device,
                                               std::uint64_t samples, std::uint32_t tp) const = 0;
    /// Devices with the same class have identical layer_seconds (the planner caches per class).
    [[nodiscard]] virtual std::size_t device_class(std::size_t device) const = 0;
    /// Relative speed used to share a microbatch among replicas (any positive scale).
    [[nodiscard]] virtual double device_speed(std::size_t device) const = 0;
    /// Seconds to move `bytes` from device a to device b.
    [[nodiscard]] virtual double transfer_seconds(std::size_t a, std::size_t b, std::uint64_t bytes) const = 0;
    /// An all-reduce over `devices` (in ring order) as a linear function of its size, so that the
    /// planner can price many sizes for one group.
    [[nodiscard]] virtual AllreduceCost allreduce_cost(const std::vector<std::size_t>& devices) const = 0;
    /// Seconds of an all-reduce of `bytes` over `devices`; 0 for one device or no bytes.
    [[nodiscard]] double allreduce_seconds(const std::vector<std::size_t>& devices, std::uint64_t bytes) const {
        return allreduce_cost(devices)(bytes);
    }
    /// Seconds of the optimizer step for `params` parameters on `device`.
    [[nodiscard]] virtual double optimizer_seconds(std::size_t device, std::uint64_t params) const = 0;
};

/// Whether tensor parallelism splits this op (Megatron's column/row split of transformer layers
/// and of an untied head; not a head tied to an embedding, which every rank holds whole); with
/// `vocab_parallel` also the embedding and the loss (Megatron-LM's vocabulary-parallel ones,
/// which dpart run's kernels do not do: they hold them whole on every rank). Other ops run
/// whole on every rank.
[[nodiscard]] bool tp_splits(const OpParams& op, bool vocab_parallel = false) noexcept;
/// Whether the runtime's kernels run the op over a tensor-parallel group of `tp`: an op that
/// splits must divide evenly (a linear layer its out_features unless tied to an embedding,
/// attention its heads and kv_heads, an MLP its ffn_hidden, a block all three); the others run
/// whole on every rank. The planner gives no stage a tp that one of its layers cannot take.
[[nodiscard]] bool tp_divides(const OpParams& op, std::uint32_t tp) noexcept;
/// Saved bytes per sample on each rank of a tensor-parallel group of `tp`: what the op divides
/// (LayerCost::tp_saved_bytes, rounded up) and the rest whole, as dpart run's kernels keep them;
/// `fused_attention`: less the probabilities a fused attention kernel does not keep.
[[nodiscard]] std::uint64_t saved_per_rank(const Layer& layer, std::uint32_t tp, bool fused_attention = false,
                                           bool vocab_parallel = false) noexcept;
/// The layer's workspace_bytes per sample on each rank of a tensor-parallel group of `tp`
/// (split_workspace_bytes for the ops tp splits; `fused_attention`: less the probabilities'
/// gradient), as dpart run's kernels hold it.
[[nodiscard]] std::uint64_t workspace_per_rank(const Layer& layer, DType dtype, std::uint32_t tp,
                                               bool fused_attention = false, bool vocab_parallel = false);
/// Tensor-parallel all-reduces of the op's output activation per pass: {forward, backward}.
struct TpCollectives {
    std::uint32_t forward = 0;
    std::uint32_t backward = 0;
    /// How many collective calls carry those bytes (each pays the ring's latency): the counts
    /// above, except for a mixture of experts, whose k outputs per token are summed expert by
    /// expert (up to E calls) after its router's logits are gathered (one more, in forward).
    std::uint32_t forward_calls = 0;
    std::uint32_t backward_calls = 0;
};
[[nodiscard]] TpCollectives tp_collectives(const OpParams& op) noexcept;

/// Ring all-reduce over n ranks on links of bandwidth gbs (GB/s) and latency_us: 2(n-1) steps,
/// each moving bytes/n: 2(n-1)/n * bytes / bw + 2(n-1) * latency (nccl-tests' busbw factor).
[[nodiscard]] AllreduceCost ring_allreduce(std::size_t n, const LinkSpec& link) noexcept;
[[nodiscard]] inline double ring_allreduce_seconds(std::uint64_t bytes, std::size_t n, const LinkSpec& link) noexcept {
    return ring_allreduce(n, link)(bytes);
}

struct CostOptions {
    /// Bytes of training state per parameter: weights, gradients and optimizer state (16 for
    /// mixed-precision Adam: bf16 weights and gradients, fp32 master weights and two moments).
    std::uint64_t bytes_per_param = 16;
    /// Of bytes_per_param, those every replica keeps whole under ZeRO-1 (0: the weights and
    /// gradients in the model's dtype, twice its bytes); the rest, the optimizer's state, is
    /// divided. dpart run's device stages keep fp32 master weights and gradients (and in bf16 a
    /// compute copy) whole, and divide only the moments.
    std::uint64_t replicated_bytes_per_param = 0;
    /// Bytes per gradient value the data-parallel all-reduce moves (0: the model dtype's; dpart
    /// run sums fp32 gradients).
    std::uint64_t gradient_bytes = 0;
    bool shard_optimizer = false;    ///< optimizer state (beyond weights and gradients) split across replicas
    bool recompute = false;          ///< activation checkpointing: keep stage inputs, recompute the rest
    /// Memory of fused (flash) attention kernels: no s x s probabilities kept (dpart run
    /// materialises them; a plan for a framework with fused attention sets this).
    bool fused_attention = false;
    /// Megatron-LM's vocabulary-parallel embedding and loss under tensor parallelism (their
    /// tables and work divided over the ranks, an all-reduce of the embedding's output); dpart
    /// run holds them whole on every rank.
    bool vocab_parallel = false;
    bool overlap_allreduce = false;  ///< the data-parallel all-reduce overlaps the last backward
};

/// Parameters a device holding `layer` keeps (whole, before tensor parallelism): its own, and
/// for a head tied to an embedding its own copy of the embedding's weights (dpart run's kernels
/// hold one each and sum their gradients), on its embedding's stage too.
[[nodiscard]] inline std::uint64_t held_params(const Layer& layer, DType dtype) noexcept {
    const auto* linear = std::get_if<LinearOp>(&layer.op);
    return linear != nullptr && linear->tied_to ? layer.cost.weight_bytes / dtype_bytes(dtype) : layer.cost.params;
}

/// Bytes per gradient value the data-parallel all-reduce moves.
[[nodiscard]] std::uint64_t gradient_value_bytes(const CostOptions& o, DType dtype);

/// The training state dpart run keeps computing in `compute` (fp32 or bf16), `base`'s other
/// options kept: fp32 master weights and gradients whole (in bf16 also a bf16 compute copy: 18 B
/// per parameter, 10 of them whole; 16 and 8 in fp32), two fp32 moments (divided by ZeRO-1), and
/// fp32 gradients summed across replicas.
[[nodiscard]] CostOptions run_state_options(CostOptions base, DType compute) noexcept;

/// Parameters each replica's optimizer steps: all `params` of its stage, or with
/// `shard_optimizer` (ZeRO-1) its part of them, ceil(params / replicas); all again where the
/// last replica's part would be empty (fewer values than parts), as dpart run then keeps every
/// replica's state whole.
[[nodiscard]] constexpr std::uint64_t optimizer_params(std::uint64_t params, std::size_t replicas,
                                                       bool shard_optimizer) noexcept {
    if (!shard_optimizer || replicas <= 1) return params;
    const std::uint64_t part = (params + replicas - 1) / replicas;
    return part * (replicas - 1) >= params ? params : part;
}

/// Bytes of training state of `params` parameters on one replica of `replicas`: the replicated
/// bytes of each, and the optimizer's bytes of its ZeRO-1 part (optimizer_params: ceil(params /
/// replicas), dpart run's part) or of all. Saturates at UINT64_MAX. Inline: the solver's DP
/// calls it for every stage it weighs.
[[nodiscard]] inline std::uint64_t state_bytes(std::uint64_t params, const CostOptions& o, DType dtype,
                                               std::size_t replicas) noexcept {
    const std::uint64_t replicated = std::min<std::uint64_t>(
        o.replicated_bytes_per_param != 0 ? o.replicated_bytes_per_param : 2 * dtype_bytes(dtype), o.bytes_per_param);
    std::uint64_t whole = 0, part = 0, bytes = 0;
    if (__builtin_mul_overflow(params, replicated, &whole) ||
        __builtin_mul_overflow(optimizer_params(params, replicas, o.shard_optimizer), o.bytes_per_param - replicated,
                               &part) ||
        __builtin_add_overflow(whole, part, &bytes))
        return UINT64_MAX;
    return bytes;
}

/// The roofline on the cluster's figures (docs/METHOD.md):
///   t = max(samples * flops / (tflops * 1e12), (weight_bytes + samples * activation_bytes) / (mem_bw_gbs * 1e9))
/// per layer and pass (the sum of the two on a device that does not overlap them, a CPU core), with tensor parallelism dividing the split ops' work and adding their
/// all-reduces on the node's intra-node link.
class AnalyticalCostModel final : public CostModel {
public:
    AnalyticalCostModel(const Model& model, const Cluster& cluster, CostOptions options = {});

    [[nodiscard]] double layer_seconds(std::size_t layer, Pass pass, std::size_t device, std::uint64_t samples,
                                       std::uint32_t tp) const override;
    [[nodiscard]] std::size_t device_class(std::size_t device) const override { return device_class_.at(device); }
    [[nodiscard]] double device_speed(std::size_t device) const override;
    [[nodiscard]] double transfer_seconds(std::size_t a, std::size_t b, std::uint64_t bytes) const override;
    [[nodiscard]] AllreduceCost allreduce_cost(const std::vector<std::size_t>& devices) const override;
    [[nodiscard]] double optimizer_seconds(std::size_t device, std::uint64_t params) const override;

    [[nodiscard]] const Model& model() const noexcept { return model_; }
    [[nodiscard]] const Cluster& cluster() const noexcept { return cluster_; }
    [[nodiscard]] const CostOptions& options() const noexcept { return options_; }

private:
    /// The link a tensor-parallel group on this device's node uses.
    [[nodiscard]] LinkSpec tp_link(std::size_t device) const;

    const Model& model_;
    const Cluster& cluster_;
    CostOptions options_;
    std::vector<std::size_t> device_class_;
};

}  // namespace dpart
