#pragma once
// Exact unsigned 64-bit arithmetic that refuses to wrap. Parameter counts, FLOPs and byte
// sizes are integers: a 70B model at sequence 8192 does ~1e15 FLOPs per sample, well inside
// 2^64 (1.8e19), but hand-written inputs can ask for anything, so every product is checked.
#include <cstdint>
#include <initializer_list>
#include <string>

#include "dpart/core/error.hpp"

namespace dpart {

[[nodiscard]] inline std::uint64_t checked_mul(std::uint64_t a, std::uint64_t b) {
    std::uint64_t r = 0;
    if (__builtin_mul_overflow(a, b, &r)) throw OverflowError("value overflows 64 bits");
    return r;
}

[[nodiscard]] inline std::uint64_t checked_add(std::uint64_t a, std::uint64_t b) {
    std::uint64_t r = 0;
    if (__builtin_add_overflow(a, b, &r)) throw OverflowError("value overflows 64 bits");
    return r;
}

/// Product of all factors, checked.
[[nodiscard]] inline std::uint64_t checked_product(std::initializer_list<std::uint64_t> factors) {
    std::uint64_t r = 1;
    for (std::uint64_t f : factors) r = checked_mul(r, f);
    return r;
}

/// Sum of all terms, checked.
[[nodiscard]] inline std::uint64_t checked_sum(std::initializer_list<std::uint64_t> terms) {
    std::uint64_t r = 0;
    for (std::uint64_t t : terms) r = checked_add(r, t);
    return r;
}

}  // namespace dpart
