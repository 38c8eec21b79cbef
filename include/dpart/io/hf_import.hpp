#pragma once
// dpart import hf: a Hugging Face config.json becomes a model.toml (docs/FORMATS.md, "Imported
// models"). Decoder families (gpt2, llama, mistral, qwen2, mixtral) become a [transformer]
// table; BERT becomes [[layer]] tables (token-type embeddings, embedding layernorm,
// bidirectional blocks, pooler). The text is parsed back before it is returned, so whatever
// `dpart inspect` and `dpart plan` would reject is rejected here.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "dpart/graph/dtype.hpp"
#include "dpart/graph/model.hpp"
#include "dpart/io/meta.hpp"

namespace dpart {

struct HfImportOptions {
    /// Tokens per sample; 0 = the config's context length (max_position_embeddings, n_positions),
    /// at most default_max_seq_len.
    std::uint64_t seq_len = 0;
    std::uint64_t global_batch = 512;  ///< samples per iteration
    DType dtype = DType::bf16;         ///< training dtype: a planning choice, not the checkpoint's
    std::string name;                  ///< [model] name; empty = the config file's stem
};

/// The longest sequence an import takes by default: long-context models (Mistral 32k, Qwen2
/// 128k) are trained mostly at shorter lengths, and the s^2 attention term would dominate.
inline constexpr std::uint64_t default_max_seq_len = 8192;

struct HfImport {
    std::string model_type;    ///< the config's model_type ("llama", ...)
    std::string architecture;  ///< its first architectures entry, or ""
    std::string toml;          ///< the model.toml text, [meta] first
    Model model;               ///< that text, loaded
};

/// The model families `dpart import hf` knows, by model_type.
[[nodiscard]] const std::vector<std::string>& hf_model_types();

/// Reads `path`. Throws InputError naming the file, the field and, when the field is present,
/// its line and column: a JSON syntax error, an unknown model_type, a missing or ill-typed
/// field, a value dpart cannot model.
[[nodiscard]] HfImport import_hf_config(const std::string& path, const HfImportOptions& options, const Meta& meta);
/// The same, from text (`path` names it in messages and gives the default model name).
[[nodiscard]] HfImport import_hf_config_text(std::string_view json, const std::string& path,
                                             const HfImportOptions& options, const Meta& meta);

}  // namespace dpart
