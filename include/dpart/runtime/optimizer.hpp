#pragma once
// Optimizer steps as pure functions over spans: the same arithmetic, in the same order, as
// PyTorch's single-tensor SGD and Adam (torch.optim, foreach=False), so that a run can be
// checked step by step against PyTorch.
#include <cstdint>
#include <span>
#include <string_view>

namespace dpart::rt {

enum class OptimizerKind { sgd, adam };
[[nodiscard]] std::string_view to_string(OptimizerKind k) noexcept;

struct OptimizerOptions {
    OptimizerKind kind = OptimizerKind::adam;
    float lr = 1e-3f;
    float beta1 = 0.9f;
    float beta2 = 0.999f;
    float eps = 1e-8f;
};

/// p -= lr * g
void sgd_step(std::span<float> params, std::span<const float> grads, float lr);

/// Adam at step `step` (1-based); m and v are the moment buffers, updated in place.
void adam_step(std::span<float> params, std::span<const float> grads, std::span<float> m, std::span<float> v,
               std::uint64_t step, const OptimizerOptions& o);

}  // namespace dpart::rt
