#pragma once
// cluster.toml (docs/FORMATS.md): [cluster], [network], [[node]], [[device]], [[device_group]], [[link]].
#include <string>
#include <string_view>

#include "dpart/cluster/cluster.hpp"

namespace dpart {

/// Most devices one cluster file may describe; beyond it the file is rejected, not allocated.
inline constexpr std::size_t max_cluster_devices = 1u << 20;

/// The range of the figures a cluster file gives (docs/LIMITS.md): TFLOP/s and GB/s from 1e-6
/// (a millionth of a CPU core) to 1e9, latencies up to 1e9 us. Within it, every time dpart
/// computes from 64-bit sizes is finite and positive.
inline constexpr double min_rate = 1e-6;
inline constexpr double max_rate = 1e9;
inline constexpr double max_latency_us = 1e9;

/// Loads and validates a cluster file. Throws InputError ("file:line:col: ...") on bad input.
[[nodiscard]] Cluster load_cluster(const std::string& path);
/// The same, from text (`path` is used in messages).
[[nodiscard]] Cluster parse_cluster(std::string_view text, const std::string& path);

}  // namespace dpart
