#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "dpart/core/error.hpp"
#include "dpart/graph/cost.hpp"
#include "dpart/graph/dtype.hpp"
#include "dpart/graph/op.hpp"
#include "dpart/graph/shape.hpp"

namespace dpart {

struct Layer {
    std::string name;
    OpParams op;
    /// Indices of the layers this one reads, all smaller than its own index; empty for the
    /// first layer, which reads the model input.
    std::vector<std::size_t> inputs;
    Shape out_shape;  ///< empty = opaque
    LayerCost cost;   ///< per sample
    SourceLocation where;
};

/// Where the measured times of a model's custom layers (CustomOp::fwd_ms, bwd_ms) were taken.
struct MeasuredAt {
    std::uint64_t batch = 0;  ///< samples per measured pass
    std::string device;       ///< free text: the reference device
    /// The reference device's dense matmul TFLOP/s at the model dtype: a measured time on a
    /// device of `t` TFLOP/s is scaled by tflops / t. 0 = unknown: times are used unscaled.
    double tflops = 0;
};

/// A model as the planner sees it: layers in a topological order, each with its cost.
struct Model {
    std::string name;
    DType dtype = DType::fp32;
    std::uint64_t global_batch = 0;
    Shape input_shape;
    std::vector<Layer> layers;
    SourceLocation where;
    /// Set when some layers carry measured times.
    std::optional<MeasuredAt> measured;

    /// Sum of all layers' costs (per sample).
    [[nodiscard]] LayerCost total() const;
    /// Index of the layer named `name`, if any.
    [[nodiscard]] std::optional<std::size_t> find(const std::string& name) const;
};

/// Builds a Model from layer specs: checks names, inputs, ordering and cycles, evaluates every
/// op on its input shapes. `where` locations are used in error messages.
struct LayerSpec {
    std::string name;
    OpParams op;
    std::optional<std::vector<std::string>> inputs;  ///< nullopt = the previous layer
    /// Per-input locations for error messages (same length as inputs when given).
    std::vector<SourceLocation> input_where;
    std::optional<std::string> tied_to;
    SourceLocation tied_where;
    SourceLocation where;
};

struct ModelSpec {
    std::string name;
    DType dtype = DType::fp32;
    std::uint64_t global_batch = 0;
    std::optional<Shape> input_shape;
    SourceLocation where;
    std::vector<LayerSpec> layers;
    std::optional<MeasuredAt> measured;
};

/// Throws InputError naming the offending layer's location.
[[nodiscard]] Model build_model(const ModelSpec& spec);

/// The same model trained in another dtype (what `dpart run` computes in: --precision): every
/// layer's cost evaluated again at that element size, its shapes unchanged; a custom layer's
/// bytes (given in the model's dtype) scaled by the ratio of the element sizes.
[[nodiscard]] Model with_dtype(const Model& model, DType dtype);
/// `model` in `dtype` without copying it when it is already in it: with_dtype's copy, kept in
/// `storage`, or `model` itself.
[[nodiscard]] const Model& in_dtype(const Model& model, DType dtype, std::optional<Model>& storage);

}  // namespace dpart
