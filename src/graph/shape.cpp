#include "dpart/graph/shape.hpp"

#include "dpart/core/checked.hpp"

namespace dpart {

std::uint64_t element_count(const Shape& s) {
    std::uint64_t n = 1;
    for (std::uint64_t d : s) n = checked_mul(n, d);
    return s.empty() ? 0 : n;
}

std::uint64_t leading_count(const Shape& s) {
    std::uint64_t n = 1;
    for (std::size_t i = 0; i + 1 < s.size(); ++i) n = checked_mul(n, s[i]);
    return n;
}

std::string to_string(const Shape& s) {
    if (s.empty()) return "[opaque]";
    std::string out = "[";
    for (std::size_t i = 0; i < s.size(); ++i) {
        if (i > 0) out += ", ";
        out += std::to_string(s[i]);
    }
    return out + "]";
}

}  // namespace dpart
