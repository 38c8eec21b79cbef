#pragma once
// Green-context partitions as devices (CPU-side logic, no CUDA headers): which GPUs a cluster
// splits, the cuDevSmResourceSplitByCount calls that cut each one, whether a real GPU can hold
// the layout, and what a slowdown leaves of a partition. runtime/cuda turns these into green
// contexts; everything here is tested without a GPU.
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "dpart/cluster/cluster.hpp"

namespace dpart::rt {

/// The partitions of one GPU: the cluster's devices with the same node and `gpu`, in cluster order.
struct GpuLayout {
    std::size_t node = 0;
    std::uint32_t gpu = 0;
    std::uint32_t gpu_sms = 0;
    std::vector<std::size_t> devices;  ///< cluster device indices
    std::vector<std::uint32_t> sms;    ///< SMs of each, in the same order

    [[nodiscard]] std::uint32_t used_sms() const noexcept;
};

/// Every partitioned GPU of `cluster`, ordered by (node, gpu). Devices without a partition are
/// not in any layout.
[[nodiscard]] std::vector<GpuLayout> gpu_layouts(const Cluster& cluster);

/// One cuDevSmResourceSplitByCount call: `groups` groups of `sm` SMs cut from what the previous
/// calls left (the first call cuts the whole GPU).
struct SplitStep {
    std::uint32_t sm = 0;
    std::uint32_t groups = 0;
    friend bool operator==(const SplitStep&, const SplitStep&) = default;
};

/// The calls that cut partitions of `sms` SMs, in that order: consecutive equal sizes are cut by
/// one call. The i-th partition is the i-th group cut.
[[nodiscard]] std::vector<SplitStep> split_steps(std::span<const std::uint32_t> sms);

/// What the runtime finds on the GPU a layout names.
struct GpuFacts {
    int sm_count = 0;
    int cc_major = 0;
    int cc_minor = 0;
    std::string name;
};

/// Throws InputError, at the first partition device's location in the cluster file, when the
/// GPU cannot hold the layout: fewer SMs than the file says, or sizes that are not multiples of
/// the GPU's granularity (8 SMs on Hopper).
void check_layout_fits(const GpuLayout& layout, const GpuFacts& gpu, const Cluster& cluster);

/// The partition a slowdown by `factor` (> 0) leaves of `sm` SMs: the largest multiple of
/// `granularity` at most sm / factor, and never less than `granularity`. A factor <= 1 leaves
/// `sm` (a partition is not grown by a speed-up).
[[nodiscard]] std::uint32_t shrunk_sms(std::uint32_t sm, double factor, std::uint32_t granularity) noexcept;

/// The slowdown a partition of `sm` SMs shrunk to `now` SMs shows: sm / now (compute scales
/// with SMs).
[[nodiscard]] double partition_slowdown(std::uint32_t sm, std::uint32_t now) noexcept;

/// A partition device's figures for `sm` SMs: compute scaled linearly from the device's own
/// figures for its partition's SMs, memory bandwidth likewise but never above the whole GPU's
/// (the device's figure times gpu_sms / its SMs is the bound).
[[nodiscard]] Device resized_partition(const Device& device, std::uint32_t sm);

}  // namespace dpart::rt
