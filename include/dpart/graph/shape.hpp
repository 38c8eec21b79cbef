#pragma once
// Per-sample tensor shapes. An empty Shape means "opaque": the output of a custom layer whose
// shape was not given; only its byte size is known.
#include <cstdint>
#include <string>
#include <vector>

namespace dpart {

using Shape = std::vector<std::uint64_t>;

/// Number of elements (checked against 64-bit overflow).
[[nodiscard]] std::uint64_t element_count(const Shape& s);
/// Elements in all but the last dimension: the "tokens" a feature-wise op runs over.
[[nodiscard]] std::uint64_t leading_count(const Shape& s);
/// "[1024, 768]", or "[opaque]".
[[nodiscard]] std::string to_string(const Shape& s);

}  // namespace dpart
