#include "dpart/graph/transformer.hpp"

namespace dpart {

std::vector<LayerSpec> expand_transformer(const TransformerSpec& t, const SourceLocation& where) {
    std::vector<LayerSpec> layers;
    layers.reserve(t.layers + 4);
    auto add = [&](std::string name, OpParams op) -> LayerSpec& {
        LayerSpec l;
        l.name = std::move(name);
        l.op = std::move(op);
        l.where = where;
        layers.push_back(std::move(l));
        return layers.back();
    };

    const std::uint64_t max_positions = t.max_positions != 0 ? t.max_positions : t.seq_len;
    add("embed", EmbeddingOp{t.vocab, t.hidden, t.learned_positions ? max_positions : 0, t.seq_len});

    TransformerBlockOp block;
    block.attention.hidden = t.hidden;
    block.attention.heads = t.heads;
    block.attention.kv_heads = t.kv_heads != 0 ? t.kv_heads : t.heads;
    block.attention.head_dim = t.head_dim != 0 ? t.head_dim : (t.heads != 0 ? t.hidden / t.heads : 0);
    block.attention.seq_len = t.seq_len;
    block.attention.causal = true;
    block.attention.bias = t.bias;
    block.attention.qkv_bias = t.qkv_bias;
    block.mlp.hidden = t.hidden;
    block.mlp.ffn_hidden = t.ffn_hidden != 0 ? t.ffn_hidden : 4 * t.hidden;
    block.mlp.kind = t.mlp;
    block.mlp.activation = t.activation;
    block.mlp.bias = t.mlp_bias.value_or(t.bias);
    block.mlp.experts = t.experts;
    block.mlp.experts_per_token = t.experts_per_token;
    block.norm = t.norm;
    block.norm_bias = t.norm_bias;
    for (std::uint64_t i = 0; i < t.layers; ++i) add("block" + std::to_string(i), block);

    add("final_norm", NormOp{t.norm, t.hidden, t.norm_bias});
    LayerSpec& head = add("head", LinearOp{t.hidden, t.vocab, false, std::nullopt});
    if (t.tied_embeddings) {
        head.tied_to = "embed";
        head.tied_where = where;
    }
    add("loss", SoftmaxXentOp{t.vocab});
    return layers;
}

}  // namespace dpart
