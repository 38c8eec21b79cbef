#include "dpart/core/format.hpp"

#include <array>
#include <cmath>
#include <fmt/format.h>

namespace dpart {

std::string with_commas(std::uint64_t value) {
    std::string digits = std::to_string(value);
    std::string out;
    out.reserve(digits.size() + digits.size() / 3);
    const std::size_t lead = digits.size() % 3;
    for (std::size_t i = 0; i < digits.size(); ++i) {
        if (i > 0 && (i + 3 - lead) % 3 == 0) out += ',';
        out += digits[i];
    }
    return out;
}

std::string si(double value, int precision) {
    static constexpr std::array<const char*, 7> prefixes{"", "k", "M", "G", "T", "P", "E"};
    if (!std::isfinite(value)) return fmt::format("{}", value);
    std::size_t i = 0;
    double v = value;
    while (std::fabs(v) >= 1000.0 && i + 1 < prefixes.size()) {
        v /= 1000.0;
        ++i;
    }
    if (i == 0) return fmt::format("{:.{}g}", v, precision);
    return fmt::format("{:.{}g} {}", v, precision, prefixes[i]);
}

std::string bytes_iec(double bytes) {
    static constexpr std::array<const char*, 7> units{"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
    std::size_t i = 0;
    double v = bytes;
    while (std::fabs(v) >= 1024.0 && i + 1 < units.size()) {
        v /= 1024.0;
        ++i;
    }
    if (i == 0) return fmt::format("{:.0f} B", v);
    return fmt::format("{:.1f} {}", v, units[i]);
}

}  // namespace dpart
