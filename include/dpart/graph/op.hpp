#pragma once
// The op library's vocabulary: one parameter struct per op, held in a variant. Each struct is
// a plain value; what an op costs is computed by the pure functions in ops.hpp.
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "dpart/graph/shape.hpp"

namespace dpart {

enum class Activation { relu, gelu, silu };
enum class NormKind { layernorm, rmsnorm };
enum class MlpKind { plain, gated };
enum class PoolKind { max, avg };
enum class Elementwise { relu, gelu, silu, dropout };

struct LinearOp {
    std::uint64_t in_features = 0;
    std::uint64_t out_features = 0;
    bool bias = true;
    /// Shares the weight of this layer (an embedding); its parameters are counted there.
    std::optional<std::size_t> tied_to;
};

struct EmbeddingOp {
    std::uint64_t vocab = 0;
    std::uint64_t hidden = 0;
    std::uint64_t positions = 0;  ///< rows of a learned position table, 0 = none
    std::uint64_t seq_len = 0;    ///< tokens per sample; 0 = take the input's size
    std::uint64_t token_types = 0;  ///< rows of a token-type (segment) table, 0 = none (BERT: 2)
};

struct NormOp {
    NormKind kind = NormKind::layernorm;
    std::uint64_t features = 0;  ///< 0 = take the input's last dimension
    bool bias = true;            ///< layernorm only
};

struct BatchNormOp {
    std::uint64_t features = 0;  ///< channels; 0 = take the input's first dimension
};

struct ElementwiseOp {
    Elementwise kind = Elementwise::relu;
};

struct AttentionOp {
    std::uint64_t hidden = 0;
    std::uint64_t heads = 0;
    std::uint64_t kv_heads = 0;  ///< < heads: grouped-query attention
    std::uint64_t head_dim = 0;
    std::uint64_t seq_len = 0;   ///< 0 = take the input's first dimension
    bool causal = true;
    bool bias = true;            ///< output projection bias
    bool qkv_bias = true;
};

struct MlpOp {
    std::uint64_t hidden = 0;
    std::uint64_t ffn_hidden = 0;
    MlpKind kind = MlpKind::plain;
    Activation activation = Activation::gelu;
    bool bias = true;
    /// Mixture of experts: `experts` copies of the MLP and a router (a bias-free linear
    /// hidden -> experts) that sends each token to `experts_per_token` of them (top-k). All
    /// experts' parameters count; FLOPs are those of the router and the active experts.
    /// experts = 1 is the dense MLP.
    std::uint64_t experts = 1;
    std::uint64_t experts_per_token = 1;
};

/// Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).
struct TransformerBlockOp {
    AttentionOp attention;
    MlpOp mlp;
    NormKind norm = NormKind::layernorm;
    bool norm_bias = true;
};

struct Conv2dOp {
    std::uint64_t in_channels = 0;
    std::uint64_t out_channels = 0;
    std::uint64_t kernel_h = 0, kernel_w = 0;
    std::uint64_t stride = 1;
    std::uint64_t padding = 0;
    std::uint64_t groups = 1;
    bool bias = true;
};

struct PoolOp {
    PoolKind kind = PoolKind::max;
    std::uint64_t kernel = 0;  ///< 0 with global = true
    std::uint64_t stride = 0;
    std::uint64_t padding = 0;
    bool global = false;
};

struct FlattenOp {};

struct AddOp {};

struct ConcatOp {
    std::uint64_t axis = 0;
};

struct SoftmaxXentOp {
    std::uint64_t classes = 0;  ///< 0 = take the input's last dimension
};

/// An opaque layer with given per-sample costs. A measured layer (`measured`, from a profile
/// such as PipeDream's) also carries its forward and backward times for the model's measured
/// batch on the reference device (Model::measured); the cost model uses those instead of a
/// roofline on its FLOPs.
struct CustomOp {
    std::uint64_t fwd_flops = 0;
    std::uint64_t bwd_flops = 0;
    std::uint64_t params = 0;
    std::uint64_t out_bytes = 0;
    std::uint64_t saved_bytes = 0;
    std::uint64_t fwd_mem_bytes = 0;
    std::uint64_t bwd_mem_bytes = 0;
    std::uint64_t workspace_bytes = 0;  ///< transient bytes while it runs (LayerCost::workspace_bytes)
    Shape out_shape;  ///< empty = opaque
    bool measured = false;
    double fwd_ms = 0;  ///< measured forward time of Model::measured->batch samples, milliseconds
    double bwd_ms = 0;  ///< measured backward time, milliseconds
};

using OpParams = std::variant<LinearOp, EmbeddingOp, NormOp, BatchNormOp, ElementwiseOp, AttentionOp, MlpOp,
                              TransformerBlockOp, Conv2dOp, PoolOp, FlattenOp, AddOp, ConcatOp, SoftmaxXentOp,
                              CustomOp>;

/// The op's name as written in model.toml ("linear", "gelu", "transformer_block", ...).
[[nodiscard]] std::string op_name(const OpParams& op);
/// Every op name model.toml accepts.
[[nodiscard]] const std::vector<std::string>& op_names();

[[nodiscard]] std::string_view to_string(Activation a) noexcept;
[[nodiscard]] std::string_view to_string(NormKind n) noexcept;
[[nodiscard]] std::string_view to_string(MlpKind m) noexcept;

}  // namespace dpart
