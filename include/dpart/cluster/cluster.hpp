#pragma once
// A cluster: devices grouped in nodes, joined by links. Values only; loading is in io/.
#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "dpart/core/error.hpp"
#include "dpart/graph/dtype.hpp"

namespace dpart {

/// One direction of a point-to-point path. Bandwidth in GB/s (1 GB = 1e9 bytes).
struct LinkSpec {
    double gbs = 0;
    double latency_us = 0;
    friend bool operator==(const LinkSpec&, const LinkSpec&) = default;
};

/// Seconds to move `bytes` over `link`: latency + bytes / bandwidth.
[[nodiscard]] double transfer_seconds(const LinkSpec& link, std::uint64_t bytes) noexcept;

enum class LinkKind { intra_node, inter_node, override_ };

/// A virtual device: a green-context partition of `sm` of a GPU's `gpu_sms` streaming
/// multiprocessors (CUDA device `gpu` of its node). Partitions of one GPU share its memory and
/// run concurrently; their figures (tflops, mem_gib, mem_bw_gbs) are the partition's own.
struct SmPartition {
    std::uint32_t gpu = 0;
    std::uint32_t sm = 0;
    std::uint32_t gpu_sms = 0;
    friend bool operator==(const SmPartition&, const SmPartition&) = default;
};

/// SMs per partition step on a GPU of compute capability `major`: Hopper (9.x) and later split
/// in multiples of 8 SMs, earlier GPUs in multiples of 2 (cuDevSmResourceSplitByCount).
[[nodiscard]] constexpr std::uint32_t sm_granularity(int major) noexcept { return major >= 9 ? 8 : 2; }

struct Device {
    std::string name;
    std::string kind;  ///< free text, e.g. "H100-SXM5-80GB"
    std::size_t node = 0;
    double tflops = 0;  ///< achieved dense matmul TFLOP/s at the model dtype (the default)
    /// Per-dtype overrides, indexed by DType (fp32, bf16, fp16), and tf32 for fp32 matmuls.
    std::array<std::optional<double>, 3> tflops_by_dtype{};
    std::optional<double> tflops_tf32;
    double mem_gib = 0;     ///< usable memory, GiB (2^30 bytes)
    double mem_bw_gbs = 0;  ///< achieved memory bandwidth, GB/s
    std::optional<SmPartition> partition;  ///< set when the device is part of a GPU
    SourceLocation where;
    /// Whether a layer's memory traffic overlaps its arithmetic: a GPU's kernels do (a layer
    /// takes the larger of the two times, the roofline); a CPU core runs the products, the
    /// packing and the element-wise passes one after another (the sum of the two).
    bool overlaps_memory = true;

    /// Matmul TFLOP/s for a model of this dtype: the per-dtype figure, else `tflops`.
    [[nodiscard]] double tflops_for(DType dtype) const noexcept;
    [[nodiscard]] std::uint64_t mem_bytes() const noexcept;
};

struct Node {
    std::string name;
    std::optional<LinkSpec> intra;  ///< overrides [network] for links inside this node
    std::vector<std::size_t> devices;
    SourceLocation where;
};

struct Cluster {
    std::string name;
    std::vector<Node> nodes;
    std::vector<Device> devices;
    std::optional<LinkSpec> intra_default;
    std::optional<LinkSpec> inter_default;
    /// [[link]] overrides, keyed by the (smaller, larger) device index pair.
    std::unordered_map<std::uint64_t, LinkSpec> overrides;
    /// [[link]] overrides between two nodes (every pair of their devices), keyed by the node
    /// index pair; a device pair's own override wins.
    std::unordered_map<std::uint64_t, LinkSpec> node_overrides;
    SourceLocation where;

    /// The link between two distinct devices: their override, else their nodes' override, else
    /// the node's or the network's default for their kind of pair. Both defaults exist for every pair of a valid cluster.
    [[nodiscard]] LinkSpec link(std::size_t a, std::size_t b) const;
    [[nodiscard]] LinkKind link_kind(std::size_t a, std::size_t b) const;
    [[nodiscard]] std::optional<std::size_t> find_device(const std::string& device_name) const;
    [[nodiscard]] static std::uint64_t pair_key(std::size_t a, std::size_t b) noexcept;
};

}  // namespace dpart
