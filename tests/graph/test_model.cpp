#include <doctest/doctest.h>

#include "dpart/graph/model.hpp"
#include "dpart/graph/transformer.hpp"

using namespace dpart;

namespace {

LayerSpec layer(std::string name, OpParams op, std::optional<std::vector<std::string>> inputs = std::nullopt,
                std::uint32_t line = 0) {
    LayerSpec l;
    l.name = std::move(name);
    l.op = std::move(op);
    l.inputs = std::move(inputs);
    l.where = SourceLocation{"m.toml", line, 1};
    if (l.inputs)
        for (std::size_t i = 0; i < l.inputs->size(); ++i)
            l.input_where.push_back(SourceLocation{"m.toml", line + 1, static_cast<std::uint32_t>(11 + 7 * i)});
    return l;
}

ModelSpec seed_mlp() {
    ModelSpec m;
    m.name = "seed-mlp";
    m.dtype = DType::fp32;
    m.global_batch = 64;
    m.layers = {layer("fc1", LinearOp{100, 50, true, std::nullopt}, std::nullopt, 5),
                layer("relu1", ElementwiseOp{Elementwise::relu}, std::nullopt, 10),
                layer("fc2", LinearOp{50, 10, true, std::nullopt}, std::nullopt, 13)};
    return m;
}

std::string error_of(const ModelSpec& spec) {
    try {
        (void)build_model(spec);
    } catch (const InputError& e) {
        return e.what();
    }
    return "no error";
}

TransformerSpec gpt2_small() {
    TransformerSpec t;
    t.layers = 12;
    t.hidden = 768;
    t.heads = 12;
    t.vocab = 50257;
    t.seq_len = 1024;
    t.tied_embeddings = true;
    return t;
}

TransformerSpec llama3(std::uint64_t layers, std::uint64_t hidden, std::uint64_t heads, std::uint64_t ffn) {
    TransformerSpec t;
    t.layers = layers;
    t.hidden = hidden;
    t.heads = heads;
    t.kv_heads = 8;
    t.ffn_hidden = ffn;
    t.vocab = 128256;
    t.seq_len = 8192;
    t.norm = NormKind::rmsnorm;
    t.mlp = MlpKind::gated;
    t.activation = Activation::silu;
    t.learned_positions = false;
    t.bias = false;
    t.qkv_bias = false;
    return t;
}

Model expand(const TransformerSpec& t) {
    ModelSpec spec;
    spec.name = "t";
    spec.dtype = DType::bf16;
    spec.global_batch = 8;
    spec.layers = expand_transformer(t, SourceLocation{"t.toml", 4, 1});
    return build_model(spec);
}

}  // namespace

TEST_CASE("a chain model: shapes flow, input implied by the first layer") {
    const Model m = build_model(seed_mlp());
    REQUIRE(m.layers.size() == 3);
    CHECK(m.input_shape == Shape{100});
    CHECK(m.layers[1].inputs == std::vector<std::size_t>{0});
    CHECK(m.layers[2].out_shape == Shape{10});
    CHECK(m.total().params == 5560);
    CHECK(m.total().fwd_flops == 2 * (100 * 50 + 50 * 10));
    CHECK(m.find("relu1") == 1);
    CHECK_FALSE(m.find("nope").has_value());
}

TEST_CASE("a shape mismatch names the layer, its input and the location") {
    ModelSpec spec = seed_mlp();
    spec.layers[2].op = LinearOp{40, 10, true, std::nullopt};
    CHECK(error_of(spec) == "m.toml:13:1: layer \"fc2\" (input \"relu1\"): in_features 40 does not match the "
                            "input's last dimension 50 (input shape [50])");
}

TEST_CASE("names and inputs are checked") {
    ModelSpec dup = seed_mlp();
    dup.layers[2].name = "fc1";
    CHECK(error_of(dup) == "m.toml:13:1: duplicate layer name \"fc1\" (first defined at line 5)");

    ModelSpec unknown = seed_mlp();
    unknown.layers[2] = layer("fc2", LinearOp{50, 10, true, std::nullopt}, std::vector<std::string>{"relu"}, 13);
    CHECK(error_of(unknown) == "m.toml:14:11: layer \"fc2\": input \"relu\" names no layer (did you mean \"relu1\"?)");

    ModelSpec self = seed_mlp();
    self.layers[1] = layer("relu1", ElementwiseOp{}, std::vector<std::string>{"relu1"}, 10);
    CHECK(error_of(self) == "m.toml:11:11: layer \"relu1\" lists itself as an input");

    ModelSpec empty = seed_mlp();
    empty.layers[1] = layer("relu1", ElementwiseOp{}, std::vector<std::string>{}, 10);
    CHECK(error_of(empty) == "m.toml:10:1: layer \"relu1\": inputs must name at least one layer");

    ModelSpec none = seed_mlp();
    none.layers.clear();
    none.where = SourceLocation{"m.toml", 1, 1};
    CHECK(error_of(none).find("the model has no layers") != std::string::npos);
}

TEST_CASE("a cycle is reported as a cycle, a forward reference as an ordering error") {
    ModelSpec cyc = seed_mlp();
    cyc.layers[0] = layer("fc1", LinearOp{100, 50, true, std::nullopt}, std::nullopt, 5);
    cyc.layers[1] = layer("relu1", ElementwiseOp{}, std::vector<std::string>{"fc2"}, 10);
    CHECK(error_of(cyc) == "m.toml:11:11: layer \"relu1\": inputs form a cycle: relu1 -> fc2 -> relu1");

    ModelSpec fwd;
    fwd.name = "f";
    fwd.global_batch = 1;
    fwd.layers = {layer("a", LinearOp{4, 4, true, std::nullopt}, std::nullopt, 3),
                  layer("b", AddOp{}, std::vector<std::string>{"a", "c"}, 8),
                  layer("c", LinearOp{4, 4, true, std::nullopt}, std::vector<std::string>{"a"}, 13)};
    CHECK(error_of(fwd).find("m.toml:9:18: layer \"b\": input \"c\" is defined later (line 13)") == 0);
}

TEST_CASE("a residual DAG") {
    ModelSpec m;
    m.name = "res";
    m.dtype = DType::fp32;
    m.global_batch = 4;
    m.input_shape = Shape{3, 32, 32};
    m.layers = {layer("conv1", Conv2dOp{3, 16, 3, 3, 1, 1, 1, true}),
                layer("relu1", ElementwiseOp{}),
                layer("conv2", Conv2dOp{16, 16, 3, 3, 1, 1, 1, true}),
                layer("add", AddOp{}, std::vector<std::string>{"relu1", "conv2"}),
                layer("pool", PoolOp{PoolKind::avg, 0, 0, 0, true}),
                layer("flat", FlattenOp{}),
                layer("fc", LinearOp{16, 10, true, std::nullopt})};
    const Model model = build_model(m);
    CHECK(model.layers[3].inputs == std::vector<std::size_t>{1, 2});
    CHECK(model.layers.back().out_shape == Shape{10});
    CHECK(model.total().params == (3 * 9 * 16 + 16) + (16 * 9 * 16 + 16) + (16 * 10 + 10));
}

TEST_CASE("a first layer that implies no input shape needs [model] input_shape") {
    ModelSpec m;
    m.name = "cnn";
    m.global_batch = 1;
    m.layers = {layer("conv1", Conv2dOp{3, 16, 3, 3, 1, 1, 1, true}, std::nullopt, 6)};
    CHECK(error_of(m) == "m.toml:6:1: layer \"conv1\": cannot tell the model's input shape from a first layer of op "
                         "conv2d; give [model] input_shape");
}

TEST_CASE("tied weights must match their embedding") {
    ModelSpec m;
    m.name = "tied";
    m.dtype = DType::bf16;
    m.global_batch = 1;
    m.layers = {layer("embed", EmbeddingOp{1000, 64, 0, 16}), layer("head", LinearOp{64, 1000, false, std::nullopt})};
    m.layers[1].tied_to = "embed";
    const Model ok = build_model(m);
    CHECK(ok.total().params == 64000);
    m.layers[1].op = LinearOp{64, 999, false, std::nullopt};
    CHECK(error_of(m).find("cannot share the 1000 x 64 table of \"embed\"") != std::string::npos);
    m.layers[1].tied_to = "embd";
    CHECK(error_of(m).find("tied_to \"embd\" names no layer (did you mean \"embed\"?)") != std::string::npos);
}

TEST_CASE("[transformer] expands to the published parameter counts") {
    const Model gpt2 = expand(gpt2_small());
    CHECK(gpt2.layers.size() == 12 + 4);
    CHECK(gpt2.layers.front().name == "embed");
    CHECK(gpt2.layers[1].name == "block0");
    CHECK(gpt2.layers.back().name == "loss");
    CHECK(gpt2.total().params == 124439808);  // GPT-2 small, tied embeddings

    CHECK(expand(llama3(32, 4096, 32, 14336)).total().params == 8030261248ull);   // Llama-3-8B
    CHECK(expand(llama3(80, 8192, 64, 28672)).total().params == 70553706496ull);  // Llama-3-70B

    // Untied GPT-2 adds the head's 50257 x 768 matrix.
    TransformerSpec untied = gpt2_small();
    untied.tied_embeddings = false;
    CHECK(expand(untied).total().params == 124439808ull + 50257ull * 768);
}

TEST_CASE("per-sample forward FLOPs of GPT-2 small match 24Lsh^2 + 4Ls^2h + 2shV") {
    const Model gpt2 = expand(gpt2_small());
    const std::uint64_t L = 12, s = 1024, h = 768, V = 50257;
    CHECK(gpt2.total().fwd_flops == 24 * L * s * h * h + 4 * L * s * s * h + 2 * s * h * V);
}
