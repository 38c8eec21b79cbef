#pragma once
// The op library: pure functions from an op's parameters and its input shapes to its output
// shape and its cost. Formulas are derived in docs/METHOD.md. Invalid combinations (a shape
// that does not match, a head count that does not divide) throw ShapeError with a message
// that the model loader prefixes with the layer's file location.
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <vector>

#include "dpart/graph/cost.hpp"
#include "dpart/graph/dtype.hpp"
#include "dpart/graph/op.hpp"
#include "dpart/graph/shape.hpp"

namespace dpart {

class ShapeError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

struct OpResult {
    Shape out_shape;  ///< empty = opaque
    LayerCost cost;
};

/// Output shape and per-sample cost of `op` reading `inputs` (one shape per input edge).
/// Throws ShapeError for mismatches and OverflowError when a size overflows 64 bits.
[[nodiscard]] OpResult evaluate(const OpParams& op, const std::vector<Shape>& inputs, DType dtype);

/// The input shape a model starting with `op` must be fed, when the op implies one
/// (linear -> [in_features]); empty when it cannot be inferred.
[[nodiscard]] Shape implied_input_shape(const OpParams& op);

/// Per-sample workspace (LayerCost::workspace_bytes) on each rank of a tensor-parallel group of
/// `tp` for an op that tensor parallelism splits, given its output shape: attention's and an
/// MLP's inner gradients divided among the ranks, a split linear layer's own columns of dY on
/// top, dY and dX whole on every rank; `fused` without attention's probabilities. Empty for an
/// op whose workspace does not depend on tp.
[[nodiscard]] std::optional<std::uint64_t> split_workspace_bytes(const OpParams& op, const Shape& out_shape,
                                                                 DType dtype, std::uint32_t tp, bool fused);

}  // namespace dpart
