#pragma once
// Human-readable numbers for tables. Decimal prefixes for counts, FLOPs and bandwidth
// (GB = 1e9 B, as nccl-tests and nvbandwidth use); binary prefixes (GiB) for memory sizes.
#include <cstdint>
#include <string>

namespace dpart {

/// 124439808 -> "124,439,808"
[[nodiscard]] std::string with_commas(std::uint64_t value);
/// 8.03e9 -> "8.03 G" (decimal prefixes k, M, G, T, P, E)
[[nodiscard]] std::string si(double value, int precision = 3);
/// 65536 -> "64.0 KiB" (binary prefixes)
[[nodiscard]] std::string bytes_iec(double bytes);

}  // namespace dpart
