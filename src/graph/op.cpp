#include "dpart/graph/op.hpp"

#include <type_traits>

#include "dpart/core/checked.hpp"
#include "dpart/graph/cost.hpp"

namespace dpart {

std::string op_name(const OpParams& op) {
    return std::visit(
        [](const auto& o) -> std::string {
            using T = std::decay_t<decltype(o)>;
            if constexpr (std::is_same_v<T, LinearOp>) return "linear";
            else if constexpr (std::is_same_v<T, EmbeddingOp>) return "embedding";
            else if constexpr (std::is_same_v<T, NormOp>) return o.kind == NormKind::layernorm ? "layernorm" : "rmsnorm";
            else if constexpr (std::is_same_v<T, BatchNormOp>) return "batchnorm";
            else if constexpr (std::is_same_v<T, ElementwiseOp>) {
                switch (o.kind) {
                    case Elementwise::relu: return "relu";
                    case Elementwise::gelu: return "gelu";
                    case Elementwise::silu: return "silu";
                    case Elementwise::dropout: return "dropout";
                }
                return "?";
            }
            else if constexpr (std::is_same_v<T, AttentionOp>) return "attention";
            else if constexpr (std::is_same_v<T, MlpOp>) return "mlp";
            else if constexpr (std::is_same_v<T, TransformerBlockOp>) return "transformer_block";
            else if constexpr (std::is_same_v<T, Conv2dOp>) return "conv2d";
            else if constexpr (std::is_same_v<T, PoolOp>) return "pool";
            else if constexpr (std::is_same_v<T, FlattenOp>) return "flatten";
            else if constexpr (std::is_same_v<T, AddOp>) return "add";
            else if constexpr (std::is_same_v<T, ConcatOp>) return "concat";
            else if constexpr (std::is_same_v<T, SoftmaxXentOp>) return "softmax_xent";
            else return "custom";
        },
        op);
}

const std::vector<std::string>& op_names() {
    static const std::vector<std::string> names{
        "linear", "embedding", "layernorm", "rmsnorm", "batchnorm", "relu", "gelu", "silu", "dropout", "attention",
        "mlp", "transformer_block", "conv2d", "pool", "flatten", "add", "concat", "softmax_xent", "custom"};
    return names;
}

std::string_view to_string(Activation a) noexcept {
    switch (a) {
        case Activation::relu: return "relu";
        case Activation::gelu: return "gelu";
        case Activation::silu: return "silu";
    }
    return "?";
}

std::string_view to_string(NormKind n) noexcept { return n == NormKind::layernorm ? "layernorm" : "rmsnorm"; }
std::string_view to_string(MlpKind m) noexcept { return m == MlpKind::plain ? "plain" : "gated"; }

LayerCost operator+(const LayerCost& a, const LayerCost& b) {
    return LayerCost{checked_add(a.params, b.params),           checked_add(a.fwd_flops, b.fwd_flops),
                     checked_add(a.bwd_flops, b.bwd_flops),     checked_add(a.out_bytes, b.out_bytes),
                     checked_add(a.saved_bytes, b.saved_bytes), checked_add(a.fwd_mem_bytes, b.fwd_mem_bytes),
                     checked_add(a.bwd_mem_bytes, b.bwd_mem_bytes), checked_add(a.weight_bytes, b.weight_bytes),
                     std::max(a.workspace_bytes, b.workspace_bytes), checked_add(a.tp_saved_bytes, b.tp_saved_bytes),
                     checked_add(a.fused_saved_less, b.fused_saved_less),
                     std::max(a.workspace_bytes, b.workspace_bytes) -
                         std::max(a.workspace_bytes - a.fused_workspace_less, b.workspace_bytes - b.fused_workspace_less)};
}

}  // namespace dpart
