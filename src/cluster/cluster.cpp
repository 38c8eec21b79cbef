#include "dpart/cluster/cluster.hpp"

#include <algorithm>
#include <cmath>

namespace dpart {

double transfer_seconds(const LinkSpec& link, std::uint64_t bytes) noexcept {
    return link.latency_us * 1e-6 + static_cast<double>(bytes) / (link.gbs * 1e9);
}

double Device::tflops_for(DType dtype) const noexcept {
    const auto& specific = tflops_by_dtype[static_cast<std::size_t>(dtype)];
    return specific ? *specific : tflops;
}

std::uint64_t Device::mem_bytes() const noexcept {
    return static_cast<std::uint64_t>(std::floor(mem_gib * 1073741824.0));
}

std::uint64_t Cluster::pair_key(std::size_t a, std::size_t b) noexcept {
    const auto lo = static_cast<std::uint64_t>(std::min(a, b));
    const auto hi = static_cast<std::uint64_t>(std::max(a, b));
    return (lo << 32) | hi;
}

LinkKind Cluster::link_kind(std::size_t a, std::size_t b) const {
    if (overrides.count(pair_key(a, b)) != 0) return LinkKind::override_;
    const std::size_t na = devices.at(a).node, nb = devices.at(b).node;
    if (na == nb) return LinkKind::intra_node;
    return node_overrides.count(pair_key(na, nb)) != 0 ? LinkKind::override_ : LinkKind::inter_node;
}

LinkSpec Cluster::link(std::size_t a, std::size_t b) const {
    if (a == b) throw RuntimeError("a device has no link to itself: " + devices.at(a).name);
    if (!overrides.empty())
        if (auto it = overrides.find(pair_key(a, b)); it != overrides.end()) return it->second;
    const std::size_t node = devices.at(a).node;
    if (node == devices.at(b).node) {
        if (nodes.at(node).intra) return *nodes[node].intra;
        if (intra_default) return *intra_default;
    } else {
        if (!node_overrides.empty())
            if (auto it = node_overrides.find(pair_key(node, devices.at(b).node)); it != node_overrides.end())
                return it->second;
        if (inter_default) return *inter_default;
    }
    throw RuntimeError("no link is defined between " + devices[a].name + " and " + devices[b].name);
}

std::optional<std::size_t> Cluster::find_device(const std::string& device_name) const {
    for (std::size_t i = 0; i < devices.size(); ++i)
        if (devices[i].name == device_name) return i;
    return std::nullopt;
}

}  // namespace dpart
