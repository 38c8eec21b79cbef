#pragma once
// The op library: pure functions from an op's parameters and its input shapes to its output
// shape and its cost. Formulas are derived in docs/METHOD.md. Invalid combinations (a shape
// that does not match, a head count that does not divide) throw ShapeError with a message
// that the model loader prefixes with the layer's file location.
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

}  // namespace dpart
