#pragma once
// What one layer costs, per sample, at the model's dtype. Everything is an exact integer.
#include <cstdint>

namespace dpart {

struct LayerCost {
    /// Trainable parameters owned by the layer (a tied head owns none: they are its embedding's).
    std::uint64_t params = 0;
    /// Matrix-multiply FLOPs (2 per multiply-add). Elementwise work (norms, activations,
    /// softmax) is charged as memory traffic instead: it does not run at matmul rate.
    std::uint64_t fwd_flops = 0;
    std::uint64_t bwd_flops = 0;
    /// Bytes of the output activation (what is sent to the consumer of this layer).
    std::uint64_t out_bytes = 0;
    /// Bytes kept from forward for backward (activation memory per sample in flight).
    std::uint64_t saved_bytes = 0;
    /// Activation bytes read + written from device memory, excluding weights.
    std::uint64_t fwd_mem_bytes = 0;
    std::uint64_t bwd_mem_bytes = 0;
    /// Weight bytes read once per microbatch in forward (backward reads them and writes the
    /// gradient: twice this). Includes tied weights.
    std::uint64_t weight_bytes = 0;
    /// Bytes a layer's forward or backward holds at once while it runs, beyond its output and
    /// its saved bytes: the output's gradient it is given, the input gradients it makes and its
    /// temporaries (dpart run's kernels). A stage needs the largest of its layers' on top of
    /// what it keeps; a composite layer's is the most any of its parts holds.
    std::uint64_t workspace_bytes = 0;
    /// The part of saved_bytes a tensor-parallel group divides among its ranks (attention's and
    /// an MLP's inner tensors); every rank keeps the rest whole (inputs, norms, the loss's logits).
    std::uint64_t tp_saved_bytes = 0;
    /// What fused (flash) attention would not keep, of saved_bytes (and tp_saved_bytes): the s x s
    /// probabilities of each head, less the fp32 log-sum-exp per row and head it keeps instead;
    /// and would not hold, of workspace_bytes (their gradient). dpart run materialises attention.
    std::uint64_t fused_saved_less = 0;
    std::uint64_t fused_workspace_less = 0;

    friend bool operator==(const LayerCost&, const LayerCost&) = default;
};

/// Sum of costs, checked against overflow.
[[nodiscard]] LayerCost operator+(const LayerCost& a, const LayerCost& b);

}  // namespace dpart
