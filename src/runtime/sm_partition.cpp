#include "dpart/runtime/sm_partition.hpp"

#include <fmt/format.h>

#include <cmath>
#include <map>

namespace dpart::rt {

std::uint32_t GpuLayout::used_sms() const noexcept {
    std::uint32_t n = 0;
    for (std::uint32_t s : sms) n += s;
    return n;
}

std::vector<GpuLayout> gpu_layouts(const Cluster& cluster) {
    std::map<std::pair<std::size_t, std::uint32_t>, GpuLayout> by_gpu;
    for (std::size_t i = 0; i < cluster.devices.size(); ++i) {
        const Device& d = cluster.devices[i];
        if (!d.partition) continue;
        GpuLayout& g = by_gpu[{d.node, d.partition->gpu}];
        g.node = d.node;
        g.gpu = d.partition->gpu;
        g.gpu_sms = d.partition->gpu_sms;
        g.devices.push_back(i);
        g.sms.push_back(d.partition->sm);
    }
    std::vector<GpuLayout> out;
    out.reserve(by_gpu.size());
    for (auto& [key, g] : by_gpu) out.push_back(std::move(g));
    return out;
}

std::vector<SplitStep> split_steps(std::span<const std::uint32_t> sms) {
    std::vector<SplitStep> steps;
    for (std::uint32_t s : sms) {
        if (!steps.empty() && steps.back().sm == s) ++steps.back().groups;
        else steps.push_back({s, 1});
    }
    return steps;
}

void check_layout_fits(const GpuLayout& layout, const GpuFacts& gpu, const Cluster& cluster) {
    if (layout.devices.empty()) return;
    const Device& first = cluster.devices.at(layout.devices.front());
    const std::string& node = cluster.nodes.at(layout.node).name;
    const auto step = sm_granularity(gpu.cc_major);
    if (layout.used_sms() > static_cast<std::uint32_t>(std::max(gpu.sm_count, 0)))
        throw InputError(first.where,
                         fmt::format("the partitions of GPU {} of node \"{}\" take {} SMs, but that GPU ({}) has {}",
                                     layout.gpu, node, layout.used_sms(), gpu.name, gpu.sm_count));
    for (std::size_t i = 0; i < layout.devices.size(); ++i)
        if (layout.sms[i] % step != 0 || layout.sms[i] < step)
            throw InputError(cluster.devices.at(layout.devices[i]).where,
                             fmt::format("device \"{}\": {} SMs is not a multiple of {}, the partition step of GPU {} "
                                         "({}, compute capability {}.{})",
                                         cluster.devices.at(layout.devices[i]).name, layout.sms[i], step, layout.gpu,
                                         gpu.name, gpu.cc_major, gpu.cc_minor));
}

std::uint32_t shrunk_sms(std::uint32_t sm, double factor, std::uint32_t granularity) noexcept {
    if (granularity == 0) granularity = 1;
    if (!(factor > 1.0)) return sm;  // also NaN
    const double target = static_cast<double>(sm) / factor;
    const auto steps = static_cast<std::uint32_t>(std::floor(target / granularity));
    return std::max(granularity, std::min(sm, steps * granularity));
}

double partition_slowdown(std::uint32_t sm, std::uint32_t now) noexcept {
    return now == 0 ? 0.0 : static_cast<double>(sm) / static_cast<double>(now);
}

Device resized_partition(const Device& device, std::uint32_t sm) {
    Device d = device;
    if (!device.partition || device.partition->sm == 0) return d;
    const double r = static_cast<double>(sm) / device.partition->sm;
    d.tflops *= r;
    for (auto& t : d.tflops_by_dtype)
        if (t) *t *= r;
    if (d.tflops_tf32) *d.tflops_tf32 *= r;
    const double whole = device.mem_bw_gbs * device.partition->gpu_sms / device.partition->sm;
    d.mem_bw_gbs = std::min(whole, device.mem_bw_gbs * r);
    d.partition->sm = sm;
    return d;
}

}  // namespace dpart::rt
