#pragma once
// `dpart profile --model`: every layer's forward and backward time, measured with the kernels
// `dpart run` uses (the CPU kernels on one core, as a worker runs; or the device layers on a
// GPU), at the microbatch sizes the planner considers. The result feeds MeasuredCostModel
// (dpart/cost/layer_times.hpp).
#include <cstdint>
#include <string>
#include <vector>

#include "dpart/cost/layer_times.hpp"
#include "dpart/graph/model.hpp"
#include "dpart/runtime/device.hpp"

namespace dpart::profile {

/// The microbatch sizes to measure: the divisors of the global batch (the sizes the planner
/// considers), at most `most` of them spread evenly in log scale, the smallest and the largest
/// always included.
[[nodiscard]] std::vector<std::uint64_t> layer_timing_sizes(std::uint64_t global_batch, std::size_t most = 8);

/// Runs the whole model forward and backward at each size, `repeats` times after a warm-up,
/// timing each layer's passes, on `threads` cores at once (each its own copy: `dpart run`'s
/// workers share the cores the same way); a layer's figure is the median of its repeats, then
/// the median over the cores.
[[nodiscard]] LayerTimes time_layers(const Model& model, const std::vector<std::uint64_t>& sizes, int repeats,
                                     const std::string& kind, std::uint64_t seed = 1, unsigned threads = 1);

/// time_layers with the device layers of `dpart run --backend cuda` (rt::make_device_layer,
/// computing in `compute`) on `ops`: a GPU's stream (the host DeviceOps in tests). Each pass is
/// timed from an idle stream to the end of its work (ops.synchronize()), as `dpart run` times a
/// task; the median of `repeats` after a warm-up. Parameters start from the CPU kernels' initial
/// values (a mixture of experts then routes as it would in a run).
[[nodiscard]] LayerTimes time_device_layers(const Model& model, const std::vector<std::uint64_t>& sizes, int repeats,
                                            const std::string& kind, rt::DeviceOps& ops, rt::Elem compute,
                                            std::uint64_t seed = 1);

/// This host's CPU model name (what `dpart profile --out` writes as its devices' kind).
[[nodiscard]] std::string cpu_kind();

}  // namespace dpart::profile
