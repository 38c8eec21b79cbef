// model.toml: valid files become the right model, bad ones an error at the right line:column.
#include <doctest/doctest.h>

#include "dpart/io/model_toml.hpp"

using namespace dpart;

namespace {

std::string error_of(const std::string& text) {
    try {
        (void)parse_model(text, "m.toml");
    } catch (const InputError& e) {
        return e.what();
    }
    return "no error";
}

const std::string header = "[model]\nname = \"m\"\ndtype = \"fp32\"\nglobal_batch = 8\n";

}  // namespace

TEST_CASE("a layer list with a DAG, custom layers and every optional key") {
    const Model m = parse_model(header + R"(input_shape = [3, 32, 32]
[[layer]]
name = "conv"
op = "conv2d"
in_channels = 3
out_channels = 8
kernel = [3, 3]
padding = 1
[[layer]]
name = "act"
op = "relu"
[[layer]]
name = "branch"
op = "conv2d"
in_channels = 8
out_channels = 8
kernel = 3
padding = 1
bias = false
[[layer]]
name = "join"
op = "add"
inputs = ["act", "branch"]
[[layer]]
name = "pool"
op = "pool"
kind = "max"
kernel = 2
[[layer]]
name = "flat"
op = "flatten"
[[layer]]
name = "opaque"
op = "custom"
fwd_flops = 2.0e9
bwd_flops = 4e9
params = 1000000
out_bytes = 65536
[[layer]]
name = "shaped"
op = "custom"
fwd_flops = 0
bwd_flops = 0
params = 0
out_shape = [16]
[[layer]]
name = "fc"
op = "linear"
in_features = 16
out_features = 10
)",
                                "m.toml");
    REQUIRE(m.layers.size() == 9);
    CHECK(m.layers[3].inputs == std::vector<std::size_t>{1, 2});
    CHECK(m.layers[4].out_shape == Shape{8, 16, 16});
    CHECK(m.layers[5].out_shape == Shape{2048});
    CHECK(m.layers[6].cost.fwd_flops == 2000000000);
    CHECK(m.layers[6].cost.params == 1000000);
    CHECK(m.layers[7].cost.out_bytes == 64);  // from out_shape at fp32
    CHECK(m.layers[2].cost.params == 8 * 8 * 9);
    CHECK(m.layers[0].where.line == 6);
}

TEST_CASE("a [transformer] table is a whole model") {
    const Model m = parse_model(R"([model]
name = "tiny"
dtype = "bf16"
global_batch = 4
[transformer]
layers = 2
hidden = 64
heads = 4
kv_heads = 2
vocab = 1000
seq_len = 32
norm = "rmsnorm"
mlp = "gated"
position = "rope"
bias = false
)",
                                "t.toml");
    REQUIRE(m.layers.size() == 6);
    CHECK(m.input_shape == Shape{32});
    const auto& block = std::get<TransformerBlockOp>(m.layers[1].op);
    CHECK(block.attention.kv_heads == 2);
    CHECK(block.attention.head_dim == 16);
    CHECK(block.mlp.ffn_hidden == 256);
    CHECK(block.mlp.activation == Activation::silu);
    CHECK(m.layers[0].cost.params == 64000);  // no position table with rope
}

TEST_CASE("errors point at the offending value") {
    CHECK(error_of(header + "[[layer]]\nname = \"a\"\nop = \"lnear\"\n") ==
          "m.toml:7:6: layer \"a\": unknown op \"lnear\" (did you mean \"linear\"?); expected one of \"linear\", "
          "\"embedding\", \"layernorm\", \"rmsnorm\", \"batchnorm\", \"relu\", \"gelu\", \"silu\", \"dropout\", "
          "\"attention\", \"mlp\", \"transformer_block\", \"conv2d\", \"pool\", \"flatten\", \"add\", \"concat\", "
          "\"softmax_xent\", \"custom\"");
    CHECK(error_of(header + "[[layer]]\nname = \"a\"\nop = \"linear\"\nin_feature = 4\nout_features = 2\n") ==
          "m.toml:8:1: layer \"a\": unknown key \"in_feature\" (did you mean \"in_features\"?)");
    CHECK(error_of(header + "[[layer]]\nname = \"a\"\nop = \"linear\"\nout_features = 2\n") ==
          "m.toml:5:1: layer \"a\": missing required key \"in_features\"");
    // out_features is not mistaken for a typo of the missing in_features.
    CHECK(error_of(header + "[[layer]]\nname = \"a\"\nop = \"conv2d\"\nout_channels = 2\nkernel = 3\n") ==
          "m.toml:5:1: layer \"a\": missing required key \"in_channels\"");
    CHECK(error_of(header + "[[layer]]\nname = \"a\"\nop = \"linear\"\nin_features = 4\nout_features = 2\nbais = true\n") ==
          "m.toml:10:1: layer \"a\": unknown key \"bais\" (did you mean \"bias\"?)");
    CHECK(error_of(header + "[[layer]]\nname = \"a\"\nop = \"linear\"\nin_features = 0\nout_features = 2\n") ==
          "m.toml:8:15: layer \"a\": \"in_features\" must be a positive integer, got 0");
    CHECK(error_of(header + "[[layer]]\nname = \"a\"\nop = \"linear\"\nin_features = nan\nout_features = 2\n") ==
          "m.toml:8:15: layer \"a\": \"in_features\" must be a positive integer, got NaN");
    CHECK(error_of(header + "[[layer]]\nname = \"a\"\nop = \"linear\"\nin_features = 1e30\nout_features = 2\n") ==
          "m.toml:8:15: layer \"a\": \"in_features\" = 1e+30 overflows 64 bits");
    CHECK(error_of(header + "[[layer]]\nname = \"a\"\nop = \"linear\"\nin_features = 2.5\nout_features = 2\n") ==
          "m.toml:8:15: layer \"a\": \"in_features\" must be a whole number, got 2.5");
    CHECK(error_of(header + "[[layer]]\nname = \"a\"\nop = \"linear\"\nin_features = \"4\"\nout_features = 2\n") ==
          "m.toml:8:15: layer \"a\": \"in_features\" must be a positive integer, got a string");
    CHECK(error_of("[model]\nname = \"m\"\ndtype = \"fp64\"\nglobal_batch = 8\n").find(
              "m.toml:3:9: [model]: unknown dtype \"fp64\"") == 0);
    CHECK(error_of("[model]\nname = \"m\"\ndtype = \"fp32\"\n") == "m.toml:1:1: [model]: missing required key \"global_batch\"");
    CHECK(error_of("[model\n").find("m.toml:1:7: TOML syntax error") == 0);
    CHECK(error_of("name = 1\n") == "m.toml:1:1: unknown key \"name\"");
    CHECK(error_of(header + "[optimizer]\nlr = 1\n") == "m.toml:5:1: unknown table [optimizer]");
    CHECK(error_of(header) == "m.toml:1:1: the model has no layers: add [[layer]] tables or a [transformer] table");
}

TEST_CASE("[transformer] checks heads and positions where they are written") {
    const std::string t = "[model]\nname = \"t\"\ndtype = \"bf16\"\nglobal_batch = 1\n[transformer]\nlayers = 2\nvocab = 10\n";
    CHECK(error_of(t + "hidden = 100\nheads = 3\nseq_len = 8\n") ==
          "m.toml:9:9: [transformer]: hidden 100 is not divisible by heads 3; give head_dim");
    CHECK(error_of(t + "hidden = 96\nheads = 12\nkv_heads = 5\nseq_len = 8\n") ==
          "m.toml:10:12: [transformer]: heads 12 is not a multiple of kv_heads 5");
    CHECK(error_of(t + "hidden = 96\nheads = 12\nseq_len = 8\nmax_positions = 4\n") ==
          "m.toml:11:17: [transformer]: max_positions 4 is smaller than seq_len 8");
    // A model whose per-sample FLOPs cannot be counted in 64 bits.
    CHECK(error_of(t + "hidden = 4294967296\nheads = 1\nseq_len = 4294967296\n").find("overflow 64 bits") !=
          std::string::npos);
}

TEST_CASE("an unreadable file is bad input naming the file") {
    try {
        (void)load_model("/nonexistent/model.toml");
        FAIL("no error");
    } catch (const InputError& e) {
        CHECK(std::string(e.what()) == "/nonexistent/model.toml: cannot open the file for reading");
    }
}
