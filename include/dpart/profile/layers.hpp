#pragma once
// `dpart profile --model`: every layer's forward and backward time, measured with the CPU
// kernels `dpart run` uses (one core, as a worker runs), at the microbatch sizes the planner
// considers. The result feeds MeasuredCostModel (dpart/cost/layer_times.hpp).
#include <cstdint>
#include <string>
#include <vector>

#include "dpart/cost/layer_times.hpp"
#include "dpart/graph/model.hpp"

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

/// This host's CPU model name (what `dpart profile --out` writes as its devices' kind).
[[nodiscard]] std::string cpu_kind();

}  // namespace dpart::profile
