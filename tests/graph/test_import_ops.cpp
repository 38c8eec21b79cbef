// The op extensions the importers need: mixture-of-experts MLPs and token-type embeddings.
#include <doctest/doctest.h>

#include "dpart/graph/ops.hpp"
#include "dpart/io/model_toml.hpp"

using namespace dpart;

TEST_CASE("a mixture of experts counts every expert and runs the active ones") {
    const std::uint64_t t = 16, h = 64, f = 128, e = 2;
    MlpOp dense{h, f, MlpKind::gated, Activation::silu, false};
    MlpOp moe = dense;
    moe.experts = 8;
    moe.experts_per_token = 2;
    const OpResult d = evaluate(OpParams{dense}, {{t, h}}, DType::bf16);
    const OpResult m = evaluate(OpParams{moe}, {{t, h}}, DType::bf16);
    CHECK(m.cost.params == 8 * d.cost.params + h * 8);                // experts + bias-free router
    CHECK(m.cost.fwd_flops == 2 * d.cost.fwd_flops + 2 * t * h * 8);  // 2 active experts + router
    CHECK(m.cost.bwd_flops == 2 * m.cost.fwd_flops);
    CHECK(m.cost.weight_bytes == m.cost.params * e);  // every expert's weights are read
    CHECK(m.cost.saved_bytes == t * (h + 2 * 3 * f + 8 + 2 * 2 * h) * e);  // + 2 dispatched copies and outputs
    CHECK(m.out_shape == Shape{t, h});
    // experts = 1 is the dense MLP, whatever experts_per_token is not given as.
    MlpOp one = dense;
    one.experts = 1;
    CHECK(evaluate(OpParams{one}, {{t, h}}, DType::bf16).cost == d.cost);
    MlpOp bad = moe;
    bad.experts_per_token = 9;
    CHECK_THROWS_AS((void)evaluate(OpParams{bad}, {{t, h}}, DType::bf16), ShapeError);
}

TEST_CASE("token-type embeddings add a table") {
    EmbeddingOp bert{30522, 768, 512, 512};
    bert.token_types = 2;
    const OpResult r = evaluate(OpParams{bert}, {{512}}, DType::bf16);
    CHECK(r.cost.params == (30522ull + 512 + 2) * 768);
    CHECK(r.cost.saved_bytes == 2 * 512 * 4);  // token ids and token-type ids
}

TEST_CASE("model.toml: experts on mlp, transformer_block and [transformer]; token_types; [meta] is ignored") {
    const std::string head =
        "[meta]\ncommand = \"dpart import hf x.json\"\n[model]\nname = \"m\"\ndtype = \"bf16\"\nglobal_batch = 8\n";
    const Model t = parse_model(head + R"([transformer]
layers = 2
hidden = 64
heads = 4
kv_heads = 2
ffn_hidden = 128
vocab = 100
seq_len = 16
position = "rope"
norm = "rmsnorm"
mlp = "gated"
bias = false
experts = 4
experts_per_token = 2
)",
                                "t.toml");
    const auto& block = std::get<TransformerBlockOp>(t.layers[1].op);
    CHECK(block.mlp.experts == 4);
    CHECK(block.mlp.experts_per_token == 2);
    const Model l = parse_model(head + R"([[layer]]
name = "embed"
op = "embedding"
vocab = 100
hidden = 64
positions = 16
token_types = 2
seq_len = 16
[[layer]]
name = "moe"
op = "mlp"
hidden = 64
ffn_hidden = 128
kind = "gated"
bias = false
experts = 4
experts_per_token = 1
)",
                                "l.toml");
    CHECK(l.layers[0].cost.params == (100 + 16 + 2) * 64);
    CHECK(std::get<MlpOp>(l.layers[1].op).experts == 4);
    auto error = [&](const std::string& body) {
        try {
            (void)parse_model(head + body, "e.toml");
        } catch (const InputError& e) {
            return std::string(e.what());
        }
        return std::string("no error");
    };
    CHECK(error("[[layer]]\nname = \"x\"\nop = \"mlp\"\nhidden = 4\nffn_hidden = 8\nexperts = 4\n") ==
          "e.toml:7:1: layer \"x\": missing required key \"experts_per_token\" (top-k routing: required with experts > "
          "1)");
    CHECK(error("[[layer]]\nname = \"x\"\nop = \"mlp\"\nhidden = 4\nffn_hidden = 8\nexperts = 4\nexperts_per_token = "
                "5\n") == "e.toml:13:21: layer \"x\": experts_per_token 5 exceeds the 4 experts");
}
