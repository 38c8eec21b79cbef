#pragma once
// model.toml (docs/FORMATS.md): [model], then [[layer]] tables or one [transformer] table.
#include <string>
#include <string_view>

#include "dpart/graph/model.hpp"

namespace dpart {

/// Loads and validates a model file. Throws InputError ("file:line:col: ...") on bad input.
[[nodiscard]] Model load_model(const std::string& path);
/// The same, from text (`path` is used in messages).
[[nodiscard]] Model parse_model(std::string_view text, const std::string& path);

}  // namespace dpart
