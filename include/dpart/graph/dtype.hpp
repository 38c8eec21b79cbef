#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace dpart {

/// Element type of a model's weights and activations.
enum class DType { fp32, bf16, fp16 };

[[nodiscard]] constexpr std::uint64_t dtype_bytes(DType t) noexcept { return t == DType::fp32 ? 4 : 2; }
[[nodiscard]] std::string_view to_string(DType t) noexcept;
[[nodiscard]] std::optional<DType> parse_dtype(std::string_view name) noexcept;

}  // namespace dpart
