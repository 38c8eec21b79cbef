#pragma once
// The [transformer] table of model.toml: a whole decoder-only model in a few lines, expanded
// into embedding, blocks, final norm, head and loss.
#include <cstdint>
#include <optional>
#include <vector>

#include "dpart/graph/model.hpp"
#include "dpart/graph/op.hpp"

namespace dpart {

struct TransformerSpec {
    std::uint64_t layers = 0;
    std::uint64_t hidden = 0;
    std::uint64_t heads = 0;
    std::uint64_t kv_heads = 0;    ///< 0 = heads
    std::uint64_t head_dim = 0;    ///< 0 = hidden / heads
    std::uint64_t ffn_hidden = 0;  ///< 0 = 4 * hidden
    std::uint64_t vocab = 0;
    std::uint64_t seq_len = 0;
    NormKind norm = NormKind::layernorm;
    MlpKind mlp = MlpKind::plain;
    Activation activation = Activation::gelu;
    bool learned_positions = true;
    std::uint64_t max_positions = 0;  ///< 0 = seq_len
    bool tied_embeddings = false;
    bool bias = true;
    bool qkv_bias = true;
    std::optional<bool> mlp_bias;  ///< the MLP's biases; nullopt = `bias`
    bool norm_bias = true;
    std::uint64_t experts = 1;            ///< > 1: every block's MLP is a mixture of experts
    std::uint64_t experts_per_token = 1;  ///< top-k routing
};

/// Layer specs named embed, block0..block{N-1}, final_norm, head, loss; all located at `where`.
[[nodiscard]] std::vector<LayerSpec> expand_transformer(const TransformerSpec& t, const SourceLocation& where);

}  // namespace dpart
