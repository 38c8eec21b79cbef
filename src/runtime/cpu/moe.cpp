// Mixtures of experts on the CPU: the router and the routing (runtime/moe.hpp, shared with the
// device layer), each expert an MlpPart on its tokens, the weighted sum per token.
#include <algorithm>

#include "dpart/runtime/moe.hpp"
#include "parts.hpp"

namespace dpart::rt::cpu {
namespace {

/// Rows [first, first + n) of `rows` (a [slots, cols] matrix) as a Tensor [n, cols].
Tensor slice_rows(const std::vector<float>& rows, std::size_t cols, std::size_t first, std::size_t n) {
    Tensor t({n, cols});
    std::copy_n(rows.data() + first * cols, n * cols, t.data.data());
    return t;
}

/// The tokens of slots [first, first + n) of x [tokens, cols] as a Tensor [n, cols].
Tensor gather_tokens(const Tensor& x, const MoeRouting& r, std::size_t cols, std::size_t first, std::size_t n) {
    Tensor t({n, cols});
    for (std::size_t i = 0; i < n; ++i)
        std::copy_n(x.data.data() + r.token[first + i] * cols, cols, t.data.data() + i * cols);
    return t;
}

}  // namespace

MoePart::MoePart(ParamLayout& layout, const MlpOp& op, Shard shard)
    : layout_(&layout), shard_(shard), hidden_(op.hidden), experts_count_(op.experts), k_(op.experts_per_token) {
    router_ = layout.add(op.experts, op.hidden, Split::none, Init::weight, op.hidden);
    MlpOp expert = op;
    expert.experts = 1;
    expert.experts_per_token = 1;
    experts_.reserve(op.experts);
    for (std::size_t e = 0; e < op.experts; ++e) experts_.emplace_back(layout, expert, shard);
}

std::vector<float> MoePart::shared_logits(const StepContext& ctx, std::vector<float> logits) const {
    if (shard_.size <= 1) return logits;
    std::vector<float> all(logits.size() * shard_.size);
    allgather(ctx, shard_, logits, all);
    all.resize(logits.size());  // rank 0's
    return all;
}

Tensor MoePart::forward(const StepContext& ctx, const Tensor& x, std::span<const float> params,
                        std::vector<Tensor>& saved) const {
    const ParamLayout& p = *layout_;
    const std::size_t tokens = x.size() / hidden_;
    Tensor logits({tokens, experts_count_});
    dense_forward(x.data.data(), tokens, hidden_, p.at(params, router_), nullptr, experts_count_, logits.data.data());
    logits.data = shared_logits(ctx, std::move(logits.data));
    const MoeRouting r = route_tokens(logits.data, tokens, experts_count_, k_);

    // Each expert on its block of slots; its outputs and saved tensors kept by slot.
    const std::size_t per_expert = experts_.front().saved_count();
    Tensor outputs({r.slots(), hidden_});
    std::vector<std::vector<float>> kept(per_expert);
    for (std::size_t e = 0; e < experts_count_; ++e) {
        const std::size_t first = r.offset[e], n = r.offset[e + 1] - first;
        if (n == 0) continue;  // every rank of a group routes alike: all skip it
        std::vector<Tensor> mine;
        const Tensor y = experts_[e].forward(ctx, gather_tokens(x, r, hidden_, first, n), params, mine);
        std::copy(y.data.begin(), y.data.end(), outputs.data.begin() + static_cast<std::ptrdiff_t>(first * hidden_));
        for (std::size_t j = 0; j < per_expert; ++j) kept[j].insert(kept[j].end(), mine[j].data.begin(), mine[j].data.end());
    }
    Tensor y(x.shape);
    for (std::size_t t = 0; t < tokens; ++t)
        for (std::size_t j = 0; j < k_; ++j) {
            const std::size_t slot = r.token_slots[t * k_ + j];
            const float w = r.weight[slot];
            const float* o = outputs.data.data() + slot * hidden_;
            float* out = y.data.data() + t * hidden_;
            for (std::size_t c = 0; c < hidden_; ++c) out[c] += w * o[c];
        }
    saved.push_back(std::move(logits));
    saved.push_back(std::move(outputs));
    for (std::vector<float>& v : kept) {
        const std::size_t cols = r.slots() == 0 ? 0 : v.size() / r.slots();
        Tensor t({r.slots(), cols});
        t.data = std::move(v);
        saved.push_back(std::move(t));
    }
    return y;
}

Tensor MoePart::backward(const StepContext& ctx, const Tensor& dy, const Tensor& x, std::span<const float> params,
                         std::span<const Tensor> saved, std::span<float> dparams) const {
    const ParamLayout& p = *layout_;
    const std::size_t tokens = x.size() / hidden_;
    const Tensor& logits = saved[0];
    const Tensor& outputs = saved[1];
    const MoeRouting r = route_tokens(logits.data, tokens, experts_count_, k_);

    // d loss / d weight of each slot: the token's output gradient . that expert's output.
    std::vector<float> dweight(r.slots());
    for (std::size_t s = 0; s < r.slots(); ++s) {
        const float* g = dy.data.data() + r.token[s] * hidden_;
        const float* o = outputs.data.data() + s * hidden_;
        float dot = 0.0f;
        for (std::size_t c = 0; c < hidden_; ++c) dot += g[c] * o[c];
        dweight[s] = dot;
    }
    // The router: dx = dlogits W_router, dW_router += dlogits^T x.
    const std::vector<float> dlogits = router_logit_grads(r, dweight);
    Tensor dx(x.shape);
    dense_backward(x.data.data(), dlogits.data(), tokens, hidden_, experts_count_, p.at(params, router_),
                   p.at(dparams, router_), nullptr, dx.data.data(), 0.0f);

    // Each expert on its slots' weighted output gradients; its input gradients kept by slot.
    const std::size_t per_expert = experts_.front().saved_count();
    std::vector<float> dslots(r.slots() * hidden_);
    for (std::size_t e = 0; e < experts_count_; ++e) {
        const std::size_t first = r.offset[e], n = r.offset[e + 1] - first;
        if (n == 0) continue;
        Tensor dout({n, hidden_});
        for (std::size_t i = 0; i < n; ++i) {
            const float w = r.weight[first + i];
            const float* g = dy.data.data() + r.token[first + i] * hidden_;
            for (std::size_t c = 0; c < hidden_; ++c) dout.data[i * hidden_ + c] = w * g[c];
        }
        std::vector<Tensor> mine;
        for (std::size_t j = 0; j < per_expert; ++j) {
            const Tensor& all = saved[2 + j];
            mine.push_back(slice_rows(all.data, all.row_size(), first, n));
        }
        const Tensor dxe =
            experts_[e].backward(ctx, dout, gather_tokens(x, r, hidden_, first, n), params, mine, dparams);
        std::copy(dxe.data.begin(), dxe.data.end(), dslots.begin() + static_cast<std::ptrdiff_t>(first * hidden_));
    }
    for (std::size_t t = 0; t < tokens; ++t)
        for (std::size_t j = 0; j < k_; ++j) {
            const float* d = dslots.data() + r.token_slots[t * k_ + j] * hidden_;
            float* out = dx.data.data() + t * hidden_;
            for (std::size_t c = 0; c < hidden_; ++c) out[c] += d[c];
        }
    return dx;
}

FeedForwardPart::FeedForwardPart(ParamLayout& layout, const MlpOp& op, Shard shard)
    : part_(op.experts > 1 ? std::variant<MlpPart, MoePart>(std::in_place_type<MoePart>, layout, op, shard)
                           : std::variant<MlpPart, MoePart>(std::in_place_type<MlpPart>, layout, op, shard)) {}

std::size_t FeedForwardPart::saved_count() const {
    return std::visit([](const auto& p) { return p.saved_count(); }, part_);
}

Tensor FeedForwardPart::forward(const StepContext& ctx, const Tensor& x, std::span<const float> params,
                                std::vector<Tensor>& saved) const {
    return std::visit([&](const auto& p) { return p.forward(ctx, x, params, saved); }, part_);
}

Tensor FeedForwardPart::backward(const StepContext& ctx, const Tensor& dy, const Tensor& x,
                                 std::span<const float> params, std::span<const Tensor> saved,
                                 std::span<float> dparams) const {
    return std::visit([&](const auto& p) { return p.backward(ctx, dy, x, params, saved, dparams); }, part_);
}

}  // namespace dpart::rt::cpu
