// dpart import hf: every shipped config.json imports to its published parameter count, the
// architecture details a config leaves unsaid are right, and bad configs are named precisely.
#include <doctest/doctest.h>

#include <filesystem>

#include "dpart/graph/ops.hpp"
#include "dpart/io/hf_import.hpp"
#include "dpart/io/model_toml.hpp"

using namespace dpart;
namespace fs = std::filesystem;

namespace {

const fs::path hf_dir = fs::path(DPART_SOURCE_DIR) / "plans" / "hf";

HfImport import_file(const std::string& name, HfImportOptions options = {}) {
    return import_hf_config((hf_dir / name).string(), options, Meta{"test", {}});
}

HfImport import_text(const std::string& json, HfImportOptions options = {}) {
    return import_hf_config_text(json, "config.json", options, Meta{"test", {}});
}

std::string error_of(const std::string& json, HfImportOptions options = {}) {
    try {
        (void)import_text(json, options);
    } catch (const InputError& e) {
        return e.what();
    }
    return "no error";
}

const std::string llama_fields = R"("hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
  "num_attention_heads": 4, "vocab_size": 100, "max_position_embeddings": 32)";

}  // namespace

// Published parameter counts. Each is sum(p.numel() for p in model.parameters()) of the
// transformers model the config builds (AutoModelForCausalLM.from_config; AutoModel for BERT, which
// includes the pooler), the exact form of the rounded size on each model's Hugging Face card and in
// its paper; each is re-derived below from the config alone.
TEST_CASE("every shipped config imports to its published parameter count") {
    struct Case {
        const char* file;
        std::uint64_t params;
    };
    const Case cases[] = {
        // gpt2 (Radford et al. 2019, "124M"): wte 50257*768 + wpe 1024*768 + 12 * 7,087,872 + 2*768.
        {"gpt2.json", 124'439'808ull},
        // Llama-2-7b (Touvron et al. 2023, "7B"; card: 6.74B): 2 * 32000*4096
        // + 32 * (4 * 4096^2 + 3 * 4096*11008 + 2*4096) + 4096.
        {"llama-2-7b.json", 6'738'415'616ull},
        // Meta-Llama-3-8B (card: 8.03B): 2 * 128256*4096
        // + 32 * (2 * 4096^2 + 2 * 4096*1024 + 3 * 4096*14336 + 2*4096) + 4096.
        {"llama-3-8b.json", 8'030'261'248ull},
        // Mistral-7B-v0.1 (Jiang et al. 2023; card: 7.24B): as Llama-3-8B with a 32000 vocabulary.
        {"mistral-7b-v0.1.json", 7'241'732'096ull},
        // Qwen2-7B (Qwen2 technical report, 2024; card: 7.62B): 2 * 152064*3584
        // + 28 * (2 * 3584^2 + 2 * 3584*512 + (3584 + 2*512) qkv bias + 3 * 3584*18944 + 2*3584) + 3584.
        {"qwen2-7b.json", 7'615'616'512ull},
        // Qwen2-0.5B (card: 0.49B; tied embeddings): 151936*896
        // + 24 * (2 * 896^2 + 2 * 896*128 + (896 + 2*128) + 3 * 896*4864 + 2*896) + 896.
        {"qwen2-0.5b.json", 494'032'768ull},
        // Mixtral-8x7B-v0.1 (Jiang et al. 2024, "46.7B total, 12.9B active"): 2 * 32000*4096
        // + 32 * (2 * 4096^2 + 2 * 4096*1024 + 8 * 3 * 4096*14336 + 4096*8 router + 2*4096) + 4096.
        {"mixtral-8x7b-v0.1.json", 46'702'792'704ull},
        // bert-base-uncased (Devlin et al. 2019, "110M"), BertModel with pooler:
        // (30522 + 512 + 2) * 768 + 2*768 + 12 * 7,087,872 + 768*768 + 768.
        {"bert-base-uncased.json", 109'482'240ull},
    };
    for (const Case& c : cases) {
        CAPTURE(c.file);
        const HfImport r = import_file(c.file);
        CHECK(r.model.total().params == c.params);
        // What is returned is what the file holds: dpart inspect and plan read it unchanged.
        CHECK(parse_model(r.toml, "imported.toml").total().params == c.params);
        CHECK(r.toml.rfind("[meta]", 0) == 0);
    }
}

TEST_CASE("the re-derivations in the comments match the importer's formulas") {
    const std::uint64_t llama3_block = 2 * 4096ull * 4096 + 2 * 4096ull * 1024 + 3 * 4096ull * 14336 + 2 * 4096;
    CHECK(2 * 128256ull * 4096 + 32 * llama3_block + 4096 == 8'030'261'248ull);
    const std::uint64_t mixtral_block =
        2 * 4096ull * 4096 + 2 * 4096ull * 1024 + 8 * 3 * 4096ull * 14336 + 4096 * 8 + 2 * 4096;
    CHECK(2 * 32000ull * 4096 + 32 * mixtral_block + 4096 == 46'702'792'704ull);
    const std::uint64_t qwen_block =
        2 * 3584ull * 3584 + 2 * 3584ull * 512 + (3584 + 2 * 512) + 3 * 3584ull * 18944 + 2 * 3584;
    CHECK(2 * 152064ull * 3584 + 28 * qwen_block + 3584 == 7'615'616'512ull);
    CHECK((30522ull + 512 + 2) * 768 + 2 * 768 + 12 * 7'087'872ull + 768 * 768 + 768 == 109'482'240ull);
}

TEST_CASE("architecture details the configs leave unsaid") {
    SUBCASE("gpt2: learned positions, tied head, biases, n_inner defaulting to 4h") {
        const Model m = import_file("gpt2.json").model;
        CHECK(m.layers[0].cost.params == (50257 + 1024) * 768ull);
        const Layer& head = m.layers[*m.find("head")];
        CHECK(head.cost.params == 0);
        CHECK(std::get<LinearOp>(head.op).tied_to == 0u);
        const auto& block = std::get<TransformerBlockOp>(m.layers[1].op);
        CHECK(block.mlp.ffn_hidden == 3072);
        CHECK(block.attention.qkv_bias);
        CHECK(block.mlp.bias);
    }
    SUBCASE("qwen2: q, k, v biases and no other; qwen2-0.5b ties its head") {
        const Model m = import_file("qwen2-7b.json").model;
        const auto& block = std::get<TransformerBlockOp>(m.layers[1].op);
        CHECK(block.attention.qkv_bias);
        CHECK_FALSE(block.attention.bias);
        CHECK_FALSE(block.mlp.bias);
        CHECK(block.attention.kv_heads == 4);
        CHECK(m.layers[*m.find("head")].cost.params == 152064ull * 3584);
        const Model small = import_file("qwen2-0.5b.json").model;
        CHECK(small.layers[*small.find("head")].cost.params == 0);
    }
    SUBCASE("mixtral: 8 experts counted, 2 active in the FLOPs") {
        const Model m = import_file("mixtral-8x7b-v0.1.json").model;
        const auto& block = std::get<TransformerBlockOp>(m.layers[1].op);
        CHECK(block.mlp.experts == 8);
        CHECK(block.mlp.experts_per_token == 2);
        // The block's forward FLOPs are attention + 2 of the 8 gated MLPs + the router.
        const std::uint64_t s = 8192, h = 4096, f = 14336;
        const OpResult attention = evaluate(OpParams{block.attention}, {{s, h}}, DType::bf16);
        const std::uint64_t expected = attention.cost.fwd_flops + 2 * (2 * 3 * s * h * f) + 2 * s * h * 8;
        CHECK(m.layers[1].cost.fwd_flops == expected);
    }
    SUBCASE("bert: token types, embedding layernorm, bidirectional blocks, pooler, no head") {
        const Model m = import_file("bert-base-uncased.json").model;
        REQUIRE(m.layers.size() == 15);  // embed, embed_norm, 12 blocks, pooler
        CHECK(std::get<EmbeddingOp>(m.layers[0].op).token_types == 2);
        CHECK(m.layers[0].cost.params == (30522ull + 512 + 2) * 768);
        CHECK(op_name(m.layers[1].op) == "layernorm");
        CHECK(m.layers[1].cost.params == 2 * 768);
        CHECK_FALSE(std::get<TransformerBlockOp>(m.layers[2].op).attention.causal);
        CHECK(m.layers[2].cost.params == 7'087'872);
        CHECK(m.layers[14].name == "pooler");
        CHECK(m.layers[14].cost.params == 768ull * 768 + 768);
        CHECK(m.layers[14].out_shape == Shape{768});
        CHECK_FALSE(m.find("loss"));
    }
}

TEST_CASE("import options: sequence length, batch, dtype, name") {
    const Model defaults = import_file("mistral-7b-v0.1.json").model;
    CHECK(defaults.input_shape == Shape{default_max_seq_len});  // 32768 in the config, capped
    CHECK(defaults.dtype == DType::bf16);
    CHECK(defaults.global_batch == 512);
    CHECK(defaults.name == "mistral-7b-v0.1");
    HfImportOptions o;
    o.seq_len = 2048;
    o.global_batch = 64;
    o.dtype = DType::fp16;
    o.name = "m7";
    const Model m = import_file("mistral-7b-v0.1.json", o).model;
    CHECK(m.input_shape == Shape{2048});
    CHECK(m.global_batch == 64);
    CHECK(m.dtype == DType::fp16);
    CHECK(m.name == "m7");
    CHECK(m.total().params == defaults.total().params);
    CHECK(import_file("llama-2-7b.json").model.input_shape == Shape{4096});  // its own context
}

TEST_CASE("llama's attention_bias and mlp_bias, and head_dim") {
    const Model m = import_text(R"({"model_type": "llama", )" + llama_fields +
                                R"(, "attention_bias": true, "mlp_bias": false, "head_dim": 32})")
                        .model;
    const auto& block = std::get<TransformerBlockOp>(m.layers[1].op);
    CHECK(block.attention.qkv_bias);
    CHECK(block.attention.bias);
    CHECK_FALSE(block.mlp.bias);
    CHECK(block.attention.head_dim == 32);
    // q, k, v, o of 64 x (4 x 32) with biases; gated MLP 3 x 64 x 128; two RMSNorms.
    CHECK(m.layers[1].cost.params == 4 * 64 * 128 + 3 * 128 + 64 + 3 * 64 * 128 + 2 * 64);
}

TEST_CASE("bad configs name the file, the field and where it is") {
    CHECK(error_of("{\"model_type\": \"llama\",\n  \"hidden_size\": 4096,,\n}") ==
          "config.json:2:23: JSON syntax error: syntax error while parsing object key - unexpected ','; expected "
          "string literal");
    CHECK(error_of("[1, 2]") == "config.json:1:1: a config.json is a JSON object, not an array");
    CHECK(error_of(R"({"hidden_size": 4})") ==
          "config.json: field \"model_type\" is missing (it names the architecture)");
    CHECK(error_of("{\n  \"model_type\": \"falcon\"\n}") ==
          "config.json:2:17: \"model_type\": unknown architecture \"falcon\"; dpart imports gpt2, llama, mistral, "
          "qwen2, mixtral, bert");
    CHECK(error_of(R"({"model_type": "lama"})").find("(did you mean \"llama\"?)") != std::string::npos);
    // A field the architecture needs: named with the architecture.
    CHECK(error_of(R"({"model_type": "mistral", )" + llama_fields + "}") ==
          "config.json: model_type \"mistral\": field \"num_key_value_heads\" is missing (grouped-query attention)");
    CHECK(error_of(R"({"model_type": "llama", "hidden_size": 64})") ==
          "config.json: model_type \"llama\": field \"num_hidden_layers\" is missing");
    CHECK(error_of("{\"model_type\": \"llama\",\n\"num_hidden_layers\": null}") ==
          "config.json:2:22: model_type \"llama\": field \"num_hidden_layers\" is null");
    // Ill-typed and out-of-range values, at their own line and column.
    CHECK(error_of("{\"model_type\": \"llama\",\n \"num_hidden_layers\": \"32\"}") ==
          "config.json:2:23: \"num_hidden_layers\": must be a positive integer, got a string");
    CHECK(error_of("{\"model_type\": \"llama\",\n \"num_hidden_layers\": -2}") ==
          "config.json:2:23: \"num_hidden_layers\": must be positive, got -2");
    CHECK(error_of("{\"model_type\": \"llama\",\n \"num_hidden_layers\": 2.5}") ==
          "config.json:2:23: \"num_hidden_layers\": must be a positive integer, got 2.5");
    CHECK(error_of(R"({"model_type": "llama", )" + llama_fields + R"(, "tie_word_embeddings": 1})") ==
          "config.json:2:102: \"tie_word_embeddings\": expected true or false, got an integer");
    CHECK(error_of(R"({"model_type": "llama", )" + llama_fields + R"(, "num_key_value_heads": 3})")
              .find("\"num_key_value_heads\": 3 key/value heads do not divide the 4 attention heads") !=
          std::string::npos);
    CHECK(error_of(R"({"model_type": "llama", )" + llama_fields + R"(, "hidden_act": "tanh"})")
              .find("\"hidden_act\": unknown activation \"tanh\"") != std::string::npos);
    CHECK(error_of(R"({"model_type": "mixtral", )" + llama_fields +
                   R"(, "num_key_value_heads": 4, "num_local_experts": 2, "num_experts_per_tok": 3})")
              .find("\"num_experts_per_tok\": 3 experts per token exceed the 2 experts") != std::string::npos);
    CHECK(error_of(R"({"model_type": "bert", "num_hidden_layers": 1, "hidden_size": 8, "num_attention_heads": 2,
        "intermediate_size": 16, "vocab_size": 10, "max_position_embeddings": 8, "type_vocab_size": 2,
        "position_embedding_type": "relative_key"})")
              .find("\"position_embedding_type\": \"relative_key\" is not modelled") != std::string::npos);
    CHECK(error_of("{\"model_type\": \"llama\",\n \"model_type\": \"gpt2\"}") ==
          "config.json:2:2: \"model_type\" is given twice");
    // Flags that contradict the config.
    HfImportOptions long_seq;
    long_seq.seq_len = 2048;
    CHECK(error_of(R"({"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 10,
        "n_positions": 1024})",
                   long_seq) == "--seq-len 2048 exceeds the model's 1024 learned positions (\"n_positions\")");
    CHECK(error_of("{\"model_type\": \"llama\",").rfind("config.json:1:24: JSON syntax error:", 0) == 0);
}

TEST_CASE("an unreadable config is named") {
    try {
        (void)import_hf_config("/nonexistent/config.json", {}, Meta{});
        FAIL("no error");
    } catch (const InputError& e) {
        CHECK(std::string(e.what()) == "/nonexistent/config.json: cannot open the file for reading");
    }
}
