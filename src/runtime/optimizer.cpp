#include "dpart/runtime/optimizer.hpp"

#include <cmath>

namespace dpart::rt {

std::string_view to_string(OptimizerKind k) noexcept { return k == OptimizerKind::sgd ? "sgd" : "adam"; }

void sgd_step(std::span<float> params, std::span<const float> grads, float lr) {
    for (std::size_t i = 0; i < params.size(); ++i) params[i] += -lr * grads[i];
}

void adam_step(std::span<float> params, std::span<const float> grads, std::span<float> m, std::span<float> v,
               std::uint64_t step, const OptimizerOptions& o) {
    // torch.optim.adam._single_tensor_adam: the bias corrections are computed in double
    // (Python floats), then used as scalars on float tensors.
    const double correction1 = 1.0 - std::pow(static_cast<double>(o.beta1), static_cast<double>(step));
    const double correction2 = 1.0 - std::pow(static_cast<double>(o.beta2), static_cast<double>(step));
    const auto step_size = static_cast<float>(static_cast<double>(o.lr) / correction1);
    const auto correction2_sqrt = static_cast<float>(std::sqrt(correction2));
    const float beta1 = o.beta1, beta2 = o.beta2, eps = o.eps;
    const float one_minus_b1 = 1.0f - beta1;
    const float one_minus_b2 = 1.0f - beta2;
    // Locals and unaliased pointers, so that the loop vectorises (src/CMakeLists.txt).
    float* __restrict p = params.data();
    float* __restrict mm = m.data();
    float* __restrict vv = v.data();
    const float* __restrict gg = grads.data();
    const std::size_t n = params.size();
    for (std::size_t i = 0; i < n; ++i) {
        const float g = gg[i];
        mm[i] = mm[i] * beta1 + g * one_minus_b1;
        vv[i] = vv[i] * beta2 + g * g * one_minus_b2;
        const float denom = std::sqrt(vv[i]) / correction2_sqrt + eps;
        p[i] += -step_size * (mm[i] / denom);
    }
}

}  // namespace dpart::rt
