#include "dpart/io/hf_import.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>

#include "dpart/core/format.hpp"
#include "dpart/core/strings.hpp"
#include "dpart/io/input_file.hpp"
#include "dpart/io/model_toml.hpp"

namespace dpart {
namespace {

using u64 = std::uint64_t;
using json = nlohmann::json;

/// Line and column (1-based, columns in bytes) of every byte offset of a text.
class LineIndex {
public:
    explicit LineIndex(std::string_view text) {
        starts_.push_back(0);
        for (std::size_t i = 0; i < text.size(); ++i)
            if (text[i] == '\n') starts_.push_back(i + 1);
    }
    [[nodiscard]] SourceLocation at(const std::string& file, std::size_t offset) const {
        const auto it = std::upper_bound(starts_.begin(), starts_.end(), offset) - 1;
        return SourceLocation{file, static_cast<std::uint32_t>(it - starts_.begin() + 1),
                              static_cast<std::uint32_t>(offset - *it + 1)};
    }

private:
    std::vector<std::size_t> starts_;
};

/// Where each top-level key's value starts, found by walking text that nlohmann has already
/// accepted as JSON (so the walk needs no error handling). A key given twice is an error:
/// nlohmann would silently keep the last.
class KeyPositions {
public:
    KeyPositions(std::string_view text, const std::string& file, const LineIndex& lines) : text_(text) {
        if (text_.starts_with("\xEF\xBB\xBF")) pos_ = 3;  // a byte-order mark, which nlohmann skips too
        skip_ws();
        if (peek() != '{') return;  // not an object: the caller says so
        ++pos_;
        skip_ws();
        if (peek() == '}') return;
        while (pos_ < text_.size()) {
            skip_ws();
            const std::size_t key_at = pos_;
            const std::string key = read_string();
            skip_ws();
            ++pos_;  // ':'
            skip_ws();
            if (!values_.emplace(key, pos_).second)
                throw InputError(lines.at(file, key_at), fmt::format("\"{}\" is given twice", key));
            skip_value();
            skip_ws();
            if (peek() != ',') break;
            ++pos_;
        }
    }
    [[nodiscard]] std::optional<std::size_t> value_offset(const std::string& key) const {
        const auto it = values_.find(key);
        return it == values_.end() ? std::nullopt : std::optional<std::size_t>(it->second);
    }

private:
    [[nodiscard]] char peek() const { return pos_ < text_.size() ? text_[pos_] : '\0'; }
    void skip_ws() {
        while (pos_ < text_.size() &&
               (text_[pos_] == ' ' || text_[pos_] == '\t' || text_[pos_] == '\n' || text_[pos_] == '\r'))
            ++pos_;
    }
    /// The raw characters between the quotes (keys with escapes are compared escaped; config
    /// keys have none).
    std::string read_string() {
        const std::size_t begin = ++pos_;
        while (pos_ < text_.size() && text_[pos_] != '"') pos_ += text_[pos_] == '\\' ? 2 : 1;
        return std::string(text_.substr(begin, (pos_++) - begin));
    }
    void skip_value() {
        const char c = peek();
        if (c == '"') {
            (void)read_string();
        } else if (c == '{' || c == '[') {
            int depth = 0;
            while (pos_ < text_.size()) {
                const char d = text_[pos_];
                if (d == '"') {
                    (void)read_string();
                    continue;
                }
                ++pos_;
                if (d == '{' || d == '[') ++depth;
                if ((d == '}' || d == ']') && --depth == 0) return;
            }
        } else {
            while (pos_ < text_.size() && std::string_view(",}] \t\r\n").find(text_[pos_]) == std::string_view::npos)
                ++pos_;
        }
    }

    std::string_view text_;
    std::size_t pos_ = 0;
    std::map<std::string, std::size_t> values_;
};

std::string json_type(const json& v) {
    switch (v.type()) {
        case json::value_t::null:
            return "null";
        case json::value_t::object:
            return "an object";
        case json::value_t::array:
            return "an array";
        case json::value_t::string:
            return "a string";
        case json::value_t::boolean:
            return "a boolean";
        case json::value_t::number_integer:
        case json::value_t::number_unsigned:
            return "an integer";
        case json::value_t::number_float:
            return "a float";
        default:
            return "a value";
    }
}

/// Where `token` first stands in JSON text outside a string (npos if nowhere).
std::size_t find_outside_strings(std::string_view text, std::string_view token) {
    bool in_string = false;
    for (std::size_t i = 0; i < text.size(); ++i) {
        if (in_string) {
            if (text[i] == '\\') ++i;
            else if (text[i] == '"') in_string = false;
        } else if (text[i] == '"') {
            in_string = true;
        } else if (text.substr(i, token.size()) == token) {
            return i;
        }
    }
    return std::string_view::npos;
}

/// A config.json: a flat JSON object read strictly, each error naming the field and where it is.
class Config {
public:
    Config(std::string_view text, std::string file) : file_(std::move(file)), lines_(text) {
        try {
            root_ = json::parse(text);
        } catch (const json::parse_error& e) {
            // nlohmann's e.byte counts the characters read, the offending one included.
            const std::size_t offset = std::min<std::size_t>(e.byte == 0 ? 0 : e.byte - 1, text.size());
            std::string what = e.what();
            const auto column = what.find("column ");
            const auto colon = column == std::string::npos ? std::string::npos : what.find(": ", column);
            if (colon != std::string::npos) what = what.substr(colon + 2);
            throw InputError(lines_.at(file_, offset), fmt::format("JSON syntax error: {}", what));
        } catch (const json::exception& e) {
            // A number beyond a double's range ("number overflow parsing '1e999'"): located at
            // that number's first appearance.
            const std::string what = e.what();
            const auto open = what.find('\''), close = what.rfind('\'');
            std::size_t offset = std::string_view::npos;
            if (open != std::string::npos && close > open) offset = find_outside_strings(text, what.substr(open + 1, close - open - 1));
            const std::string reason = what.substr(what.find(']') == std::string::npos ? 0 : what.find(']') + 2);
            throw InputError(offset == std::string_view::npos ? SourceLocation{file_} : lines_.at(file_, offset),
                             fmt::format("JSON value out of range: {}", reason));
        }
        if (!root_.is_object())
            throw InputError(SourceLocation{file_, 1, 1},
                             fmt::format("a config.json is a JSON object, not {}", json_type(root_)));
        positions_.emplace(text, file_, lines_);
    }

    void set_context(std::string context) { context_ = std::move(context); }

    /// Present and not null.
    [[nodiscard]] bool has(const std::string& key) const {
        const auto it = root_.find(key);
        return it != root_.end() && !it->is_null();
    }
    [[nodiscard]] SourceLocation where(const std::string& key) const {
        if (const auto at = positions_->value_offset(key)) return lines_.at(file_, *at);
        return SourceLocation{file_};
    }
    [[noreturn]] void fail(const std::string& key, const std::string& message) const {
        throw InputError(where(key), fmt::format("\"{}\": {}", key, message));
    }
    [[noreturn]] void missing(const std::string& key, std::string_view why = "") const {
        const bool null = root_.contains(key);
        throw InputError(null ? where(key) : SourceLocation{file_},
                         fmt::format("{}field \"{}\" {}{}", context_.empty() ? "" : context_ + ": ", key,
                                     null ? "is null" : "is missing", why));
    }

    [[nodiscard]] u64 count(const std::string& key, std::string_view why = "") const {
        if (!has(key)) missing(key, why);
        return to_count(key, root_.at(key));
    }
    [[nodiscard]] u64 count_or(const std::string& key, u64 fallback) const {
        return has(key) ? to_count(key, root_.at(key)) : fallback;
    }
    [[nodiscard]] bool boolean_or(const std::string& key, bool fallback) const {
        if (!has(key)) return fallback;
        const json& v = root_.at(key);
        if (!v.is_boolean()) fail(key, fmt::format("expected true or false, got {}", json_type(v)));
        return v.get<bool>();
    }
    [[nodiscard]] std::optional<std::string> string_or_none(const std::string& key) const {
        if (!has(key)) return std::nullopt;
        const json& v = root_.at(key);
        if (!v.is_string()) fail(key, fmt::format("expected a string, got {}", json_type(v)));
        return v.get<std::string>();
    }
    [[nodiscard]] std::string string(const std::string& key, std::string_view why = "") const {
        if (!has(key)) missing(key, why);
        return *string_or_none(key);
    }
    /// The first entry of a string array such as "architectures", or "".
    [[nodiscard]] std::string first_string(const std::string& key) const {
        if (!has(key)) return "";
        const json& v = root_.at(key);
        if (!v.is_array()) fail(key, fmt::format("expected an array of strings, got {}", json_type(v)));
        if (v.empty()) return "";
        if (!v[0].is_string()) fail(key, fmt::format("expected an array of strings, got {} in it", json_type(v[0])));
        return v[0].get<std::string>();
    }

private:
    [[nodiscard]] u64 to_count(const std::string& key, const json& v) const {
        if (v.is_number_unsigned()) {
            const u64 n = v.get<u64>();
            if (n == 0) fail(key, "must be positive, got 0");
            if (n > static_cast<u64>(INT64_MAX)) fail(key, fmt::format("{} is beyond what a model file holds (2^63 - 1)", n));
            return n;
        }
        if (v.is_number_integer()) fail(key, fmt::format("must be positive, got {}", v.get<std::int64_t>()));
        if (v.is_number_float()) {
            const double d = v.get<double>();
            if (!(d > 0) || d != std::floor(d)) fail(key, fmt::format("must be a positive integer, got {}", v.dump()));
            if (d >= 9223372036854775808.0)
                fail(key, fmt::format("{} is beyond what a model file holds (2^63 - 1)", v.dump()));
            return static_cast<u64>(d);
        }
        fail(key, fmt::format("must be a positive integer, got {}", json_type(v)));
    }

    std::string file_;
    LineIndex lines_;
    json root_;
    std::optional<KeyPositions> positions_;
    std::string context_;
};

/// What the MLP's activation function is called in configs.
Activation activation_of(const Config& c, const std::string& key, Activation fallback) {
    const auto name = c.string_or_none(key);
    if (!name) return fallback;
    static const std::map<std::string, Activation, std::less<>> known{
        {"silu", Activation::silu},        {"swish", Activation::silu},      {"gelu", Activation::gelu},
        {"gelu_new", Activation::gelu},    {"gelu_fast", Activation::gelu},  {"gelu_pytorch_tanh", Activation::gelu},
        {"gelu_python", Activation::gelu}, {"quick_gelu", Activation::gelu}, {"relu", Activation::relu}};
    const auto it = known.find(*name);
    if (it == known.end()) {
        std::vector<std::string> names;
        for (const auto& [k, v] : known) names.push_back(k);
        c.fail(key, fmt::format("unknown activation \"{}\"{}; dpart knows {}", *name, did_you_mean(*name, names),
                                join(names)));
    }
    return it->second;
}

std::string toml_bool(bool b) { return b ? "true" : "false"; }

/// The sequence length: --seq-len, or the config's context length capped at default_max_seq_len.
u64 sequence_length(const Config& c, const HfImportOptions& o, const std::string& positions_key, bool learned) {
    if (o.seq_len != 0) {
        if (learned && c.has(positions_key) && o.seq_len > c.count(positions_key))
            throw InputError(fmt::format("--seq-len {} exceeds the model's {} learned positions (\"{}\")", o.seq_len,
                                         c.count(positions_key), positions_key));
        return o.seq_len;
    }
    const u64 context = c.count(positions_key, " (the context length; or give --seq-len)");
    return std::min(context, default_max_seq_len);
}

struct Emitted {
    std::string comment;  ///< what the config leaves unsaid, as the importer decided it
    std::string body;     ///< [transformer] or [[layer]] tables
};

Emitted decoder(const Config& c, const std::string& type, const HfImportOptions& o) {
    Emitted e;
    const bool gpt2 = type == "gpt2";
    const std::string layers_key = gpt2 ? "n_layer" : "num_hidden_layers";
    const std::string hidden_key = gpt2 ? "n_embd" : "hidden_size";
    const std::string heads_key = gpt2 ? "n_head" : "num_attention_heads";
    const std::string positions_key = gpt2 ? "n_positions" : "max_position_embeddings";
    const u64 layers = c.count(layers_key);
    const u64 hidden = c.count(hidden_key);
    const u64 heads = c.count(heads_key);
    const u64 vocab = c.count("vocab_size");
    const u64 seq = sequence_length(c, o, positions_key, gpt2);

    std::string t = "[transformer]\n";
    t += fmt::format("layers = {}\nhidden = {}\nheads = {}\n", layers, hidden, heads);
    if (gpt2) {
        // GPT-2: learned positions, pre-norm LayerNorm, plain GELU MLP (n_inner, default 4h),
        // biases everywhere, the LM head tied to the token embedding unless said otherwise.
        if (hidden % heads != 0)
            c.fail(heads_key, fmt::format("{} heads do not divide n_embd {}", heads, hidden));
        const u64 ffn = c.count_or("n_inner", 4 * hidden);
        const Activation act = activation_of(c, "activation_function", Activation::gelu);
        const bool tied = c.boolean_or("tie_word_embeddings", true);
        t += fmt::format("ffn_hidden = {}\nvocab = {}\nseq_len = {}\n", ffn, vocab, seq);
        t += fmt::format("position = \"learned\"\nmax_positions = {}\n", c.count(positions_key));
        t += fmt::format("norm = \"layernorm\"\nmlp = \"plain\"\nactivation = \"{}\"\n", to_string(act));
        t += fmt::format("bias = true\ntied_embeddings = {}\n", toml_bool(tied));
        e.comment = fmt::format(
            "GPT-2: learned position table of {} rows, pre-norm LayerNorm with bias, plain GELU MLP,\n"
            "biases in every linear layer, LM head {}.\n",
            c.count(positions_key), tied ? "tied to the token embedding" : "untied");
        e.body = t;
        return e;
    }

    // The Llama family: RoPE (no position parameters), RMSNorm, gated SiLU MLP.
    const u64 ffn = c.count("intermediate_size");
    const bool kv_required = type == "mistral" || type == "mixtral";  // their classes default to 8, not heads
    const u64 kv_heads = kv_required ? c.count("num_key_value_heads", " (grouped-query attention)")
                                     : c.count_or("num_key_value_heads", heads);
    if (kv_heads > heads || heads % kv_heads != 0)
        c.fail("num_key_value_heads",
               fmt::format("{} key/value heads do not divide the {} attention heads", kv_heads, heads));
    const u64 head_dim = c.count_or("head_dim", 0);
    if (head_dim == 0 && hidden % heads != 0)
        c.fail(heads_key,
               fmt::format("{} heads do not divide hidden_size {}; the config needs head_dim", heads, hidden));
    const Activation act = activation_of(c, "hidden_act", Activation::silu);
    const bool tied = c.boolean_or("tie_word_embeddings", false);
    // Biases as the transformers modelling code builds them: Llama's attention_bias (q, k, v
    // and o) and mlp_bias, both off by default; Qwen2 has q, k, v biases and no other; Mistral
    // and Mixtral have none.
    bool qkv_bias = false, out_bias = false, mlp_bias = false;
    if (type == "llama") {
        qkv_bias = out_bias = c.boolean_or("attention_bias", false);
        mlp_bias = c.boolean_or("mlp_bias", false);
    } else if (type == "qwen2") {
        qkv_bias = true;
    }
    t += fmt::format("kv_heads = {}\n", kv_heads);
    if (head_dim != 0) t += fmt::format("head_dim = {}\n", head_dim);
    t += fmt::format("ffn_hidden = {}\nvocab = {}\nseq_len = {}\n", ffn, vocab, seq);
    t += fmt::format("position = \"rope\"\nnorm = \"rmsnorm\"\nmlp = \"gated\"\nactivation = \"{}\"\n", to_string(act));
    t += fmt::format("bias = {}\nqkv_bias = {}\nmlp_bias = {}\ntied_embeddings = {}\n", toml_bool(out_bias),
                     toml_bool(qkv_bias), toml_bool(mlp_bias), toml_bool(tied));
    std::string moe;
    if (type == "mixtral") {
        // A sparse MoE block per layer: num_local_experts gated MLPs, a bias-free router, top-k.
        const u64 experts = c.count("num_local_experts");
        const u64 top_k = c.count("num_experts_per_tok");
        if (top_k > experts)
            c.fail("num_experts_per_tok", fmt::format("{} experts per token exceed the {} experts", top_k, experts));
        t += fmt::format("experts = {}\nexperts_per_token = {}\n", experts, top_k);
        moe = fmt::format(
            "Every MLP is {} experts behind a bias-free router (hidden -> {}), {} active per token:\n"
            "all experts' parameters count, FLOPs are the router's and the active experts'.\n",
            experts, experts, top_k);
    }
    e.comment = fmt::format(
        "{}: RoPE (no position parameters), RMSNorm, gated {} MLP, {}{},\nLM head {}.\n{}", type, to_string(act),
        qkv_bias && out_bias ? "biases on q, k, v and o"
        : qkv_bias           ? "biases on q, k and v only"
                             : "no attention biases",
        mlp_bias ? ", MLP biases" : ", no MLP biases", tied ? "tied to the token embedding" : "untied", moe);
    if (c.has("sliding_window") && type != "qwen2") {
        e.comment += fmt::format(
            "The config's sliding window ({} tokens) is not modelled: attention is costed over the full sequence.\n",
            c.count_or("sliding_window", 0));
    }
    e.body = t;
    return e;
}

Emitted bert(const Config& c, const HfImportOptions& o) {
    const u64 layers = c.count("num_hidden_layers");
    const u64 hidden = c.count("hidden_size");
    const u64 heads = c.count("num_attention_heads");
    const u64 ffn = c.count("intermediate_size");
    const u64 vocab = c.count("vocab_size");
    const u64 positions = c.count("max_position_embeddings");
    const u64 types = c.count("type_vocab_size");
    if (hidden % heads != 0)
        c.fail("num_attention_heads", fmt::format("{} heads do not divide hidden_size {}", heads, hidden));
    if (const auto kind = c.string_or_none("position_embedding_type"); kind && *kind != "absolute")
        c.fail("position_embedding_type",
               fmt::format("\"{}\" is not modelled; dpart imports BERT with absolute (learned) positions", *kind));
    const Activation act = activation_of(c, "hidden_act", Activation::gelu);
    const u64 seq = sequence_length(c, o, "max_position_embeddings", true);
    const u64 e = dtype_bytes(o.dtype);

    Emitted out;
    out.comment = fmt::format(
        "BERT (BertModel): word, position ({} rows) and token-type ({} rows) embeddings summed, then a\n"
        "LayerNorm; {} bidirectional post-norm encoder blocks (same parameters and costs as dpart's\n"
        "pre-norm transformer_block); the pooler (dense {} -> {} with bias and tanh on the first token).\n"
        "Pre-training heads (masked LM, next sentence) are not part of BertModel and not included.\n",
        positions, types, layers, hidden, hidden);
    std::string b;
    b += fmt::format(
        "[[layer]]\nname = \"embed\"\nop = \"embedding\"\nvocab = {}\nhidden = {}\npositions = {}\n"
        "token_types = {}\nseq_len = {}\n",
        vocab, hidden, positions, types, seq);
    b += "\n[[layer]]\nname = \"embed_norm\"\nop = \"layernorm\"\n";
    for (u64 i = 0; i < layers; ++i)
        b += fmt::format(
            "\n[[layer]]\nname = \"block{}\"\nop = \"transformer_block\"\nhidden = {}\nheads = {}\n"
            "ffn_hidden = {}\ncausal = false\nnorm = \"layernorm\"\nmlp = \"plain\"\nactivation = \"{}\"\n",
            i, hidden, heads, ffn, to_string(act));
    // The pooler reads one token of the sequence: no op selects it, so it is given as a custom
    // layer with its exact figures (per sample: one h x h product).
    b += fmt::format(
        "\n[[layer]]\nname = \"pooler\"  # tanh(W x[CLS] + b)\nop = \"custom\"\nparams = {}\n"
        "fwd_flops = {}\nbwd_flops = {}\nout_shape = [{}]\nsaved_bytes = {}\nfwd_mem_bytes = {}\n"
        "bwd_mem_bytes = {}\n",
        hidden * hidden + hidden, 2 * hidden * hidden, 4 * hidden * hidden, hidden, 2 * hidden * e, 2 * hidden * e,
        3 * hidden * e);
    out.body = b;
    return out;
}

}  // namespace

const std::vector<std::string>& hf_model_types() {
    static const std::vector<std::string> types{"gpt2", "llama", "mistral", "qwen2", "mixtral", "bert"};
    return types;
}

HfImport import_hf_config_text(std::string_view text, const std::string& path, const HfImportOptions& options,
                               const Meta& meta) {
    Config c(text, path);
    HfImport r;
    r.model_type = c.string("model_type", " (it names the architecture)");
    r.architecture = c.first_string("architectures");
    const auto& types = hf_model_types();
    if (std::find(types.begin(), types.end(), r.model_type) == types.end())
        c.fail("model_type", fmt::format("unknown architecture \"{}\"{}; dpart imports {}", r.model_type,
                                         did_you_mean(r.model_type, types), join(types)));
    c.set_context(fmt::format("model_type \"{}\"", r.model_type));
    const Emitted e = r.model_type == "bert" ? bert(c, options) : decoder(c, r.model_type, options);

    const std::string name = options.name.empty() ? std::filesystem::path(path).stem().string() : options.name;
    std::string model = "[model]\n";
    model += fmt::format("name = {}\ndtype = \"{}\"\nglobal_batch = {}\n\n", toml_string(name),
                         to_string(options.dtype), options.global_batch);
    // Parse once to count the parameters for the header, then assemble the file and load it
    // as dpart inspect and dpart plan will: what is returned is what they accept.
    const Model counted = parse_imported_model(model + e.body, path);
    std::string header = meta_toml(meta);
    header += fmt::format("# Imported from a Hugging Face config.json (model_type \"{}\"{}).\n", r.model_type,
                          r.architecture.empty() ? "" : ", " + r.architecture);
    for (std::string_view line : {std::string_view(e.comment)}) {
        std::size_t start = 0;
        while (start < line.size()) {
            const std::size_t end = line.find('\n', start);
            header += fmt::format("# {}\n", line.substr(start, end - start));
            start = end == std::string_view::npos ? line.size() : end + 1;
        }
    }
    header += fmt::format("# parameters: {}\n", with_commas(counted.total().params));
    header += "# dtype and global_batch are planning choices (dpart import hf --dtype, --global-batch).\n\n";
    r.toml = header + model + e.body;
    r.model = parse_imported_model(r.toml, path);
    return r;
}

HfImport import_hf_config(const std::string& path, const HfImportOptions& options, const Meta& meta) {
    return import_hf_config_text(read_input_file(path), path, options, meta);
}

}  // namespace dpart
