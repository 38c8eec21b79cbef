#pragma once
// model.toml (docs/FORMATS.md): [model], then [[layer]] tables or one [transformer] table.
#include <cstddef>
#include <string>
#include <string_view>

#include "dpart/graph/model.hpp"

namespace dpart {

/// Most layers one model may have (after the [transformer] expansion): beyond it the file is
/// rejected before anything is allocated for it (a layer takes about 1 KiB once costed).
inline constexpr std::size_t max_model_layers = 1u << 20;
/// Largest measured time (fwd_ms, bwd_ms) a layer may give: 1e9 ms, about 11 days.
inline constexpr double max_measured_ms = 1e9;

/// Loads and validates a model file. Throws InputError ("file:line:col: ...") on bad input.
[[nodiscard]] Model load_model(const std::string& path);
/// The same, from text (`path` is used in messages).
[[nodiscard]] Model parse_model(std::string_view text, const std::string& path);
/// A model text an importer generated from the file `source`, loaded: a value dpart cannot model
/// (a check the importer does not repeat) is reported against `source`.
[[nodiscard]] Model parse_imported_model(std::string_view text, const std::string& source);

}  // namespace dpart
