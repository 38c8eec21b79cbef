#pragma once
// What the CPU kernels share: the parameter layout (canonical order, tensor-parallel slices,
// initial values), a base class implementing LayerKernel's parameter half from it, the group
// collectives, and small row-wise helpers.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "dpart/graph/model.hpp"
#include "dpart/runtime/backend.hpp"
#include "dpart/runtime/param_layout.hpp"

namespace dpart::rt::cpu {

/// LayerKernel's parameter half, from a ParamLayout the derived kernel fills in its constructor.
class Kernel : public LayerKernel {
public:
    Kernel(const Model& model, std::size_t layer, Shard shard);
    // Parts keep a pointer to layout_.
    Kernel(const Kernel&) = delete;
    Kernel& operator=(const Kernel&) = delete;

    [[nodiscard]] std::size_t full_params() const final { return layout_.full_size(); }
    [[nodiscard]] std::size_t shard_params() const final { return layout_.shard_size(); }
    void init(std::uint64_t seed, std::span<float> full) const final;
    void to_shard(std::span<const float> full, std::span<float> shard) const final;
    void from_shard(std::span<const float> shard, std::span<float> full) const final;

protected:
    /// [n, ...out_shape], zeros.
    [[nodiscard]] Tensor output(std::size_t n) const;
    /// The single input of a one-input op, checked to have `row_size` elements per sample
    /// (0: not checked).
    [[nodiscard]] const Tensor& single_input(std::span<const Tensor* const> inputs, std::size_t row_size = 0) const;

    ParamLayout layout_;
    std::uint64_t index_;
    Shard shard_;
    std::string name_;
    Shape out_shape_;
};

/// The group's sum / concatenation; no-ops on a shard of size 1.
void allreduce(const StepContext& ctx, Shard shard, std::span<float> data);
void allgather(const StepContext& ctx, Shard shard, std::span<const float> mine, std::span<float> all);

/// y[r, :] += b for each of `rows` rows of `cols`.
void add_bias(float* y, std::size_t rows, std::size_t cols, const float* b);
/// db[j] += sum over rows of dy[r, j], rows in order.
void add_column_sums(const float* dy, std::size_t rows, std::size_t cols, float* db);
void add_into(std::span<float> dst, std::span<const float> src);

/// y = x W^T + b: x [rows, in], W [out, in], b [out] or null.
void dense_forward(const float* x, std::size_t rows, std::size_t in, const float* w, const float* b, std::size_t out,
                   float* y);
/// The gradients of dense_forward given dy [rows, out]: dW += dy^T x, db += column sums of dy
/// (when db is not null), dx = dx_beta * dx + dy W (when dx is not null).
void dense_backward(const float* x, const float* dy, std::size_t rows, std::size_t in, std::size_t out,
                    const float* w, float* dw, float* db, float* dx, float dx_beta);

// Inline, so that a loop over one activation (ElementwiseKernel) compiles to that
// activation's arithmetic: relu then vectorises.
[[nodiscard]] inline float activate(Activation a, float x) noexcept {
    switch (a) {
    case Activation::relu: return x > 0.0f ? x : 0.0f;
    case Activation::gelu: return 0.5f * x * (1.0f + std::erf(x * 0.70710678f));
    case Activation::silu: return x / (1.0f + std::exp(-x));
    }
    return x;
}
/// d activate(a, x) / dx.
[[nodiscard]] inline float activate_grad(Activation a, float x) noexcept {
    switch (a) {
    case Activation::relu: return static_cast<float>(x > 0.0f);  // 1 or 0, without a branch: vectorises
    case Activation::gelu: {
        const float cdf = 0.5f * (1.0f + std::erf(x * 0.70710678f));
        const float pdf = 0.39894228f * std::exp(-0.5f * x * x);
        return cdf + x * pdf;
    }
    case Activation::silu: {
        const float s = 1.0f / (1.0f + std::exp(-x));
        return s * (1.0f + x * (1.0f - s));
    }
    }
    return 1.0f;
}
/// Calls f with `a` as a compile-time constant (std::integral_constant), so that a loop
/// inside f is compiled once per activation.
template <class F>
void with_activation(Activation a, F&& f) {
    switch (a) {
    case Activation::relu: f(std::integral_constant<Activation, Activation::relu>{}); return;
    case Activation::gelu: f(std::integral_constant<Activation, Activation::gelu>{}); return;
    case Activation::silu: f(std::integral_constant<Activation, Activation::silu>{}); return;
    }
}


/// Throws InputError at the layer: `what` has no CPU kernel.
[[noreturn]] void unsupported(const Layer& layer, const std::string& what, const std::string& supported);

/// Throws RuntimeError naming the layer: a caller passed tensors of the wrong shape.
[[noreturn]] void bad_call(const std::string& layer, const std::string& message);

}  // namespace dpart::rt::cpu
