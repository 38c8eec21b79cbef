#pragma once
// Measured layer times (`dpart profile --model`): each layer's forward and backward time at the
// microbatch sizes the planner considers, on one device of a given kind, without tensor
// parallelism. MeasuredCostModel answers from them for the devices of that kind (interpolating
// between the measured sizes) and from the analytical roofline for the others, so that `plan`,
// `replay` and `run` predict from what the layers take on this machine (docs/METHOD.md).
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "dpart/cost/cost_model.hpp"
#include "dpart/io/csv.hpp"

namespace dpart {

struct LayerTimes {
    struct Point {
        std::uint64_t samples = 0;
        double forward_s = 0;
        double backward_s = 0;
    };
    std::string model;  ///< the model's name
    std::string kind;   ///< the device kind they were measured on (a cluster device's `kind`)
    std::map<std::size_t, std::vector<Point>> layers;  ///< layer index -> points, by samples

    /// A layer's time for `samples`: piecewise linear between the measured sizes, extended
    /// linearly beyond them from the nearest two (never below 0), proportional with one point;
    /// none when the layer was not measured.
    [[nodiscard]] std::optional<double> seconds(std::size_t layer, Pass pass, std::uint64_t samples) const;
};

/// model,kind,layer,samples,fwd_ms,bwd_ms
[[nodiscard]] const std::vector<std::string>& layer_time_columns();
[[nodiscard]] CsvTable layer_times_table(const LayerTimes& t, const Model& model);
/// Reads a layer-times CSV for `model`. Throws InputError at file:line for another model, an
/// unknown layer, a size of 0, a negative or non-finite time, or two kinds in one file.
[[nodiscard]] LayerTimes load_layer_times(const std::string& path, const Model& model);

/// The measured times for devices of their kind (a split op's time divided by the tensor-parallel
/// degree, plus the base model's all-reduces for it); everything else from `base`.
class MeasuredCostModel final : public CostModel {
public:
    MeasuredCostModel(const CostModel& base, const Model& model, const Cluster& cluster, LayerTimes times);
    [[nodiscard]] double layer_seconds(std::size_t layer, Pass pass, std::size_t device, std::uint64_t samples,
                                       std::uint32_t tp) const override;
    [[nodiscard]] std::size_t device_class(std::size_t device) const override { return class_.at(device); }
    [[nodiscard]] double device_speed(std::size_t device) const override { return base_.device_speed(device); }
    [[nodiscard]] double transfer_seconds(std::size_t a, std::size_t b, std::uint64_t bytes) const override {
        return base_.transfer_seconds(a, b, bytes);
    }
    [[nodiscard]] AllreduceCost allreduce_cost(const std::vector<std::size_t>& devices) const override {
        return base_.allreduce_cost(devices);
    }
    [[nodiscard]] double optimizer_seconds(std::size_t device, std::uint64_t params) const override {
        return base_.optimizer_seconds(device, params);
    }
    /// Devices whose layer times are measured ones.
    [[nodiscard]] std::size_t measured_devices() const noexcept { return measured_devices_; }

private:
    const CostModel& base_;
    const Model& model_;
    LayerTimes times_;
    std::vector<bool> measured_;
    std::vector<std::size_t> class_;
    std::size_t measured_devices_ = 0;
};

}  // namespace dpart
