#include "dpart/io/model_toml.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cstdint>

#include "dpart/core/checked.hpp"
#include "dpart/graph/transformer.hpp"
#include "dpart/io/cluster_toml.hpp"
#include "dpart/io/toml_reader.hpp"

namespace dpart {
namespace {

Activation parse_activation(TableReader& r, std::string_view fallback) {
    const std::string a = r.choice("activation", {"gelu", "relu", "silu"}, fallback);
    return a == "gelu" ? Activation::gelu : a == "relu" ? Activation::relu : Activation::silu;
}

NormKind parse_norm(TableReader& r) {
    return r.choice("norm", {"layernorm", "rmsnorm"}, "layernorm") == "layernorm" ? NormKind::layernorm
                                                                                   : NormKind::rmsnorm;
}

MlpKind parse_mlp_kind(TableReader& r, std::string_view key) {
    return r.choice(key, {"plain", "gated"}, "plain") == "plain" ? MlpKind::plain : MlpKind::gated;
}

/// heads, kv_heads, head_dim with their defaults and divisibility checks.
void parse_heads(TableReader& r, AttentionOp& a) {
    a.heads = r.required_count("heads");
    a.kv_heads = r.optional_count("kv_heads", a.heads);
    if (a.kv_heads > a.heads || a.heads % a.kv_heads != 0)
        r.fail("kv_heads", fmt::format("heads {} is not a multiple of kv_heads {}", a.heads, a.kv_heads));
    if (r.has("head_dim")) {
        a.head_dim = r.required_count("head_dim");
    } else {
        if (a.hidden % a.heads != 0)
            r.fail("heads", fmt::format("hidden {} is not divisible by heads {}; give head_dim", a.hidden, a.heads));
        a.head_dim = a.hidden / a.heads;
    }
}

AttentionOp parse_attention(TableReader& r) {
    AttentionOp a;
    a.hidden = r.required_count("hidden");
    parse_heads(r, a);
    a.seq_len = r.optional_count("seq_len", 0, true);
    a.causal = r.optional_bool("causal", true);
    a.bias = r.optional_bool("bias", true);
    a.qkv_bias = r.optional_bool("qkv_bias", a.bias);
    return a;
}

/// experts (default 1: a dense MLP) and experts_per_token (required with more than one expert).
void parse_experts(TableReader& r, std::uint64_t& experts, std::uint64_t& per_token) {
    experts = r.optional_count("experts", 1);
    if (experts == 1) {
        per_token = r.optional_count("experts_per_token", 1);
    } else {
        if (!r.has("experts_per_token")) r.missing("experts_per_token", " (top-k routing: required with experts > 1)");
        per_token = r.required_count("experts_per_token");
    }
    if (per_token > experts)
        r.fail("experts_per_token", fmt::format("experts_per_token {} exceeds the {} experts", per_token, experts));
}

MlpOp parse_mlp(TableReader& r, std::uint64_t hidden, std::string_view kind_key, bool bias) {
    MlpOp m;
    m.hidden = hidden;
    m.ffn_hidden = r.required_count("ffn_hidden");
    m.kind = parse_mlp_kind(r, kind_key);
    m.activation = parse_activation(r, m.kind == MlpKind::gated ? "silu" : "gelu");
    m.bias = bias;
    parse_experts(r, m.experts, m.experts_per_token);
    return m;
}

OpParams parse_op(TableReader& r, const std::string& op, DType dtype, LayerSpec& spec) {
    if (op == "linear") {
        r.expect({"in_features", "out_features", "bias", "tied_to"});
        LinearOp o;
        o.in_features = r.required_count("in_features");
        o.out_features = r.required_count("out_features");
        o.bias = r.optional_bool("bias", true);
        spec.tied_to = r.optional_string("tied_to");
        spec.tied_where = r.where("tied_to");
        return o;
    }
    if (op == "embedding") {
        r.expect({"vocab", "hidden", "positions", "seq_len", "token_types"});
        EmbeddingOp o;
        o.vocab = r.required_count("vocab");
        o.hidden = r.required_count("hidden");
        o.positions = r.optional_count("positions", 0, true);
        o.seq_len = r.optional_count("seq_len", 0, true);
        o.token_types = r.optional_count("token_types", 0, true);
        return o;
    }
    if (op == "layernorm" || op == "rmsnorm") {
        NormOp o;
        o.kind = op == "layernorm" ? NormKind::layernorm : NormKind::rmsnorm;
        o.features = r.optional_count("features", 0, true);
        if (o.kind == NormKind::layernorm) o.bias = r.optional_bool("bias", true);
        return o;
    }
    if (op == "batchnorm") return BatchNormOp{r.optional_count("features", 0, true)};
    if (op == "relu") return ElementwiseOp{Elementwise::relu};
    if (op == "gelu") return ElementwiseOp{Elementwise::gelu};
    if (op == "silu") return ElementwiseOp{Elementwise::silu};
    if (op == "dropout") return ElementwiseOp{Elementwise::dropout};
    if (op == "attention") {
        r.expect({"hidden", "heads", "kv_heads", "head_dim", "seq_len", "causal", "bias", "qkv_bias"});
        return parse_attention(r);
    }
    if (op == "mlp") {
        r.expect({"hidden", "ffn_hidden", "kind", "activation", "bias", "experts", "experts_per_token"});
        const std::uint64_t hidden = r.required_count("hidden");
        return parse_mlp(r, hidden, "kind", r.optional_bool("bias", true));
    }
    if (op == "transformer_block") {
        r.expect({"hidden", "heads", "kv_heads", "head_dim", "seq_len", "causal", "bias", "qkv_bias"});
        r.expect({"ffn_hidden", "mlp", "activation", "norm", "norm_bias", "experts", "experts_per_token"});
        TransformerBlockOp o;
        o.attention = parse_attention(r);
        o.mlp = parse_mlp(r, o.attention.hidden, "mlp", o.attention.bias);
        o.norm = parse_norm(r);
        o.norm_bias = r.optional_bool("norm_bias", true);
        return o;
    }
    if (op == "conv2d") {
        r.expect({"in_channels", "out_channels", "kernel", "stride", "padding", "groups", "bias"});
        Conv2dOp o;
        o.in_channels = r.required_count("in_channels");
        o.out_channels = r.required_count("out_channels");
        const auto kernel = r.optional_pair("kernel");
        if (!kernel) r.missing("kernel");
        o.kernel_h = kernel->first;
        o.kernel_w = kernel->second;
        o.stride = r.optional_count("stride", 1);
        o.padding = r.optional_count("padding", 0, true);
        o.groups = r.optional_count("groups", 1);
        o.bias = r.optional_bool("bias", true);
        return o;
    }
    if (op == "pool") {
        PoolOp o;
        o.kind = r.choice("kind", {"max", "avg"}, "max") == "max" ? PoolKind::max : PoolKind::avg;
        o.global = r.optional_bool("global", false);
        if (o.global) {
            if (r.has("kernel") || r.has("stride") || r.has("padding"))
                r.fail("global", "a global pool takes no kernel, stride or padding");
        } else {
            if (!r.has("kernel")) r.missing("kernel", " (or global = true)");
            o.kernel = r.required_count("kernel");
            o.stride = r.optional_count("stride", o.kernel);
            o.padding = r.optional_count("padding", 0, true);
        }
        return o;
    }
    if (op == "flatten") return FlattenOp{};
    if (op == "add") return AddOp{};
    if (op == "concat") return ConcatOp{r.optional_count("axis", 0, true)};
    if (op == "softmax_xent") return SoftmaxXentOp{r.optional_count("classes", 0, true)};
    // custom
    r.expect({"fwd_flops", "bwd_flops", "params", "out_bytes", "out_shape", "saved_bytes", "fwd_mem_bytes",
              "bwd_mem_bytes", "workspace_bytes", "fwd_ms", "bwd_ms"});
    CustomOp o;
    // A measured layer gives its times; its FLOPs are then optional (a profile rarely has them).
    o.measured = r.has("fwd_ms") || r.has("bwd_ms");
    if (o.measured) {
        for (std::string_view key : {"fwd_ms", "bwd_ms"})
            if (!r.has(key)) r.missing(key, " (a measured layer gives both fwd_ms and bwd_ms)");
        o.fwd_ms = *r.optional_nonnegative("fwd_ms");
        o.bwd_ms = *r.optional_nonnegative("bwd_ms");
        r.check_within("fwd_ms", o.fwd_ms, 0, max_measured_ms, "ms");
        r.check_within("bwd_ms", o.bwd_ms, 0, max_measured_ms, "ms");
    }
    o.fwd_flops = r.optional_count("fwd_flops", 0, true);
    o.bwd_flops = r.optional_count("bwd_flops", 0, true);
    o.params = r.optional_count("params", 0, true);
    for (std::string_view key : {"fwd_flops", "bwd_flops", "params"})
        if (!r.has(key) && !(o.measured && key != "params")) r.missing(key);
    if (auto shape = r.optional_shape("out_shape")) o.out_shape = *shape;
    if (r.has("out_bytes")) {
        o.out_bytes = r.optional_count("out_bytes", 0, true);  // 0: an output too small to count
    } else if (!o.out_shape.empty()) {
        try {
            o.out_bytes = checked_mul(element_count(o.out_shape), dtype_bytes(dtype));
        } catch (const OverflowError&) {
            r.fail("out_shape", "out_shape holds more bytes than fit in 64 bits");
        }
    } else {
        r.missing("out_bytes", " (or out_shape)");
    }
    o.saved_bytes = r.optional_count("saved_bytes", o.out_bytes, true);
    o.fwd_mem_bytes = r.optional_count("fwd_mem_bytes", 0, true);
    o.bwd_mem_bytes = r.optional_count("bwd_mem_bytes", 0, true);
    o.workspace_bytes = r.optional_count("workspace_bytes", 0, true);
    return o;
}

LayerSpec parse_layer(const toml::table& table, const std::string& file, std::size_t index, DType dtype) {
    TableReader r(table, file, fmt::format("[[layer]] #{}", index + 1));
    LayerSpec spec;
    spec.where = r.where();
    spec.name = r.required_string("name");
    r.set_context(fmt::format("layer \"{}\"", spec.name));
    const std::string op = r.choice("op", op_names(), "");
    spec.inputs = r.optional_string_array("inputs", &spec.input_where);
    if (spec.inputs && spec.inputs->empty()) r.fail("inputs", "inputs must name at least one layer");
    spec.op = parse_op(r, op, dtype, spec);
    r.finish();
    return spec;
}

TransformerSpec parse_transformer(TableReader& r) {
    r.expect({"layers", "hidden", "heads", "kv_heads", "head_dim", "ffn_hidden", "vocab", "seq_len", "norm", "mlp",
              "activation", "position", "max_positions", "tied_embeddings", "bias", "qkv_bias", "mlp_bias",
              "norm_bias", "experts", "experts_per_token"});
    TransformerSpec t;
    t.layers = r.required_count("layers");
    if (t.layers > max_model_layers - 4)
        r.fail("layers", fmt::format("{} blocks (+ embed, final_norm, head, loss) are more than the {} layers dpart "
                                     "accepts",
                                     t.layers, max_model_layers));
    t.hidden = r.required_count("hidden");
    t.vocab = r.required_count("vocab");
    t.seq_len = r.required_count("seq_len");
    AttentionOp heads;
    heads.hidden = t.hidden;
    parse_heads(r, heads);
    t.heads = heads.heads;
    t.kv_heads = heads.kv_heads;
    t.head_dim = heads.head_dim;
    t.ffn_hidden = r.optional_count("ffn_hidden", 0);
    if (t.ffn_hidden == 0) {
        if (t.hidden > UINT64_MAX / 4)
            r.fail("hidden", fmt::format("hidden {} makes the default ffn_hidden (4 x hidden) overflow 64 bits", t.hidden));
        t.ffn_hidden = 4 * t.hidden;
    }
    t.norm = parse_norm(r);
    t.mlp = parse_mlp_kind(r, "mlp");
    t.activation = parse_activation(r, t.mlp == MlpKind::gated ? "silu" : "gelu");
    t.learned_positions = r.choice("position", {"learned", "rope"}, "learned") == "learned";
    t.max_positions = r.optional_count("max_positions", t.seq_len);
    if (!t.learned_positions && r.has("max_positions"))
        r.fail("max_positions", "max_positions applies to learned positions only (position = \"learned\")");
    if (t.learned_positions && t.max_positions < t.seq_len)
        r.fail("max_positions", fmt::format("max_positions {} is smaller than seq_len {}", t.max_positions, t.seq_len));
    t.tied_embeddings = r.optional_bool("tied_embeddings", false);
    t.bias = r.optional_bool("bias", true);
    t.qkv_bias = r.optional_bool("qkv_bias", t.bias);
    if (r.has("mlp_bias")) t.mlp_bias = r.optional_bool("mlp_bias", t.bias);
    t.norm_bias = r.optional_bool("norm_bias", true);
    parse_experts(r, t.experts, t.experts_per_token);
    r.finish();
    return t;
}

/// Whether a layer takes time on a device: what the cost model charges is FLOPs, memory traffic
/// and weights (a roofline), or a measured time.
bool costs_time(const Layer& l) {
    const LayerCost& c = l.cost;
    if (c.fwd_flops != 0 || c.bwd_flops != 0 || c.fwd_mem_bytes != 0 || c.bwd_mem_bytes != 0 || c.weight_bytes != 0)
        return true;
    const auto* custom = std::get_if<CustomOp>(&l.op);
    return custom != nullptr && custom->measured && (custom->fwd_ms > 0 || custom->bwd_ms > 0);
}

Model read_model(const toml::table& root, const std::string& path) {
    TableReader top(root, path, "");
    (void)top.optional_table("meta");  // provenance written by dpart import: free-form, not checked
    const toml::table* model = top.optional_table("model");
    const toml::table* measured = top.optional_table("measured");
    const toml::array* layers = top.optional_table_array("layer");
    const toml::table* transformer = top.optional_table("transformer");
    top.finish();
    if (model == nullptr) throw InputError(SourceLocation{path}, "missing the [model] table");

    ModelSpec spec;
    TableReader m(*model, path, "[model]");
    spec.where = m.where();
    spec.name = m.required_string("name");
    const std::string dtype = m.choice("dtype", {"fp32", "bf16", "fp16"}, "");
    spec.dtype = *parse_dtype(dtype);
    spec.global_batch = m.required_count("global_batch");
    spec.input_shape = m.optional_shape("input_shape");
    m.finish();
    if (measured != nullptr) {
        TableReader t(*measured, path, "[measured]");
        MeasuredAt at;
        at.batch = t.required_count("batch");
        at.device = t.optional_string("device").value_or("");
        at.tflops = t.optional_positive("tflops").value_or(0.0);
        if (at.tflops > 0) t.check_within("tflops", at.tflops, min_rate, max_rate, "TFLOP/s");
        t.finish();
        spec.measured = at;
    }

    if (layers != nullptr && transformer != nullptr)
        throw InputError(location_of(*transformer, path),
                         "a model has either [[layer]] tables or a [transformer] table, not both");
    if (transformer != nullptr) {
        TableReader t(*transformer, path, "[transformer]");
        spec.layers = expand_transformer(parse_transformer(t), t.where());
    } else if (layers != nullptr) {
        if (layers->size() > max_model_layers)
            throw InputError(location_of(*layers->get(max_model_layers), path),
                             fmt::format("the model has {} layers, more than the {} dpart accepts", layers->size(),
                                         max_model_layers));
        spec.layers.reserve(layers->size());
        for (std::size_t i = 0; i < layers->size(); ++i)
            spec.layers.push_back(parse_layer(*layers->get(i)->as_table(), path, i, spec.dtype));
    } else {
        throw InputError(spec.where, "the model has no layers: add [[layer]] tables or a [transformer] table");
    }
    Model built = build_model(spec);
    if (std::none_of(built.layers.begin(), built.layers.end(), costs_time))
        throw InputError(spec.where, "the model computes nothing: no layer has FLOPs, memory traffic, weights or a "
                                     "measured time, so every plan of it would take 0 ms");
    return built;
}

}  // namespace

Model load_model(const std::string& path) { return read_model(parse_toml_file(path), path); }

Model parse_model(std::string_view text, const std::string& path) {
    return read_model(parse_toml_text(text, path), path);
}

Model parse_imported_model(std::string_view text, const std::string& source) {
    try {
        return parse_model(text, "<imported model.toml>");
    } catch (const InputError& e) {
        throw InputError(SourceLocation{source}, fmt::format("the model it describes is not valid: {}",
                                                             e.detail().empty() ? std::string(e.what()) : e.detail()));
    }
}

}  // namespace dpart
