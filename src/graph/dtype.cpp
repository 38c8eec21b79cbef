#include "dpart/graph/dtype.hpp"

namespace dpart {

std::string_view to_string(DType t) noexcept {
    switch (t) {
        case DType::fp32: return "fp32";
        case DType::bf16: return "bf16";
        case DType::fp16: return "fp16";
    }
    return "?";
}

std::optional<DType> parse_dtype(std::string_view name) noexcept {
    if (name == "fp32") return DType::fp32;
    if (name == "bf16") return DType::bf16;
    if (name == "fp16") return DType::fp16;
    return std::nullopt;
}

}  // namespace dpart
