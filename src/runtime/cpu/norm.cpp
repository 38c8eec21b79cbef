// layernorm, rmsnorm and the embedding lookup: row-wise ops, never split over a group.
#include <algorithm>
#include <cassert>
#include <cmath>

#include "parts.hpp"

namespace dpart::rt::cpu {
namespace {

constexpr double norm_eps = 1e-5;

class EmbeddingKernel final : public Kernel {
public:
    EmbeddingKernel(const Model& model, std::size_t layer, Shard shard) : Kernel(model, layer, shard) {
        const auto& op = std::get<EmbeddingOp>(model.layers[layer].op);
        vocab_ = op.vocab;
        hidden_ = op.hidden;
        const EmbeddingParams p = add_embedding_params(layout_, op);
        tok_ = p.tok;
        pos_ = p.pos;
        type_ = p.type;
    }

    [[nodiscard]] Tensor forward(const StepContext&, std::span<const Tensor* const> inputs,
                                 std::span<const float> params, Saved& saved) const override {
        saved.tensors.clear();
        const Tensor& x = single_input(inputs);
        const std::size_t tokens = x.row_size();
        const float* tok = layout_.at(params, tok_);
        const float* pos = layout_.at(params, pos_);
        const float* type = layout_.at(params, type_);
        Tensor y = output(x.rows());
        for (std::size_t i = 0; i < x.rows(); ++i)
            for (std::size_t p = 0; p < tokens; ++p) {
                float* out = y.data.data() + (i * tokens + p) * hidden_;
                std::copy_n(tok + id(x, i * tokens + p) * hidden_, hidden_, out);
                if (pos != nullptr) add_into({out, hidden_}, {pos + p * hidden_, hidden_});
                if (type != nullptr) add_into({out, hidden_}, {type, hidden_});
            }
        return y;
    }

    [[nodiscard]] std::vector<Tensor> backward(const StepContext&, const Tensor& dout,
                                               std::span<const Tensor* const> inputs, std::span<const float>,
                                               const Saved&, std::span<float> dparams) const override {
        const Tensor& x = single_input(inputs);
        const std::size_t tokens = x.row_size();
        float* dtok = layout_.at(dparams, tok_);
        float* dpos = layout_.at(dparams, pos_);
        float* dtype = layout_.at(dparams, type_);
        // Scatter-add in sample order: a repeated token sums its rows in a fixed order.
        for (std::size_t i = 0; i < x.rows(); ++i)
            for (std::size_t p = 0; p < tokens; ++p) {
                const std::span<const float> g(dout.data.data() + (i * tokens + p) * hidden_, hidden_);
                add_into({dtok + id(x, i * tokens + p) * hidden_, hidden_}, g);
                if (dpos != nullptr) add_into({dpos + p * hidden_, hidden_}, g);
                if (dtype != nullptr) add_into({dtype, hidden_}, g);
            }
        std::vector<Tensor> dx;
        dx.emplace_back(x.shape);  // token ids have no gradient
        return dx;
    }

private:
    [[nodiscard]] std::size_t id(const Tensor& x, std::size_t k) const {
        const auto v = static_cast<std::size_t>(x.data[k]);
        assert(x.data[k] >= 0.0f && v < vocab_);
        return v;
    }

    std::size_t vocab_ = 0, hidden_ = 0;
    ParamLayout::Id tok_ = ParamLayout::absent, pos_ = ParamLayout::absent;
    /// Token types (BERT's segments): every token is of type 0, as when no type ids are given.
    ParamLayout::Id type_ = ParamLayout::absent;
};

}  // namespace

NormPart::NormPart(ParamLayout& layout, NormKind kind, std::size_t features, bool bias)
    : layout_(&layout), kind_(kind), features_(features) {
    const NormParams p = add_norm_params(layout, kind, features, bias);
    gamma_ = p.gamma;
    beta_ = p.beta;
}

Tensor NormPart::forward(const StepContext&, const Tensor& x, std::span<const float> params,
                         std::vector<Tensor>& saved) const {
    const std::size_t f = features_;
    const std::size_t rows = x.size() / f;
    const float* gamma = layout_->at(params, gamma_);
    const float* beta = layout_->at(params, beta_);
    Tensor y(x.shape);
    Tensor stats({rows, 2});  // mean (0 for rmsnorm) and 1 / std per row
    for (std::size_t r = 0; r < rows; ++r) {
        const float* in = x.data.data() + r * f;
        double mean = 0.0;
        if (kind_ == NormKind::layernorm) {
            for (std::size_t j = 0; j < f; ++j) mean += in[j];
            mean /= static_cast<double>(f);
        }
        double var = 0.0;
        for (std::size_t j = 0; j < f; ++j) var += (in[j] - mean) * (in[j] - mean);
        const auto rstd = static_cast<float>(1.0 / std::sqrt(var / static_cast<double>(f) + norm_eps));
        const auto m = static_cast<float>(mean);
        float* out = y.data.data() + r * f;
        for (std::size_t j = 0; j < f; ++j) out[j] = (in[j] - m) * rstd * gamma[j] + (beta != nullptr ? beta[j] : 0.0f);
        stats.data[2 * r] = m;
        stats.data[2 * r + 1] = rstd;
    }
    saved.push_back(std::move(stats));
    return y;
}

Tensor NormPart::backward(const StepContext&, const Tensor& dy, const Tensor& x, std::span<const float> params,
                          std::span<const Tensor> saved, std::span<float> dparams) const {
    const std::size_t f = features_;
    const std::size_t rows = x.size() / f;
    const float* gamma = layout_->at(params, gamma_);
    float* dgamma = layout_->at(dparams, gamma_);
    float* dbeta = layout_->at(dparams, beta_);
    const Tensor& stats = saved[0];
    Tensor dx(x.shape);
    std::vector<float> xhat(f), dxhat(f);
    for (std::size_t r = 0; r < rows; ++r) {
        const float* in = x.data.data() + r * f;
        const float* g = dy.data.data() + r * f;
        const float m = stats.data[2 * r];
        const float rstd = stats.data[2 * r + 1];
        double mean_dxhat = 0.0, mean_dxhat_xhat = 0.0;
        for (std::size_t j = 0; j < f; ++j) {
            xhat[j] = (in[j] - m) * rstd;
            dxhat[j] = g[j] * gamma[j];
            dgamma[j] += g[j] * xhat[j];
            if (dbeta != nullptr) dbeta[j] += g[j];
            mean_dxhat += dxhat[j];
            mean_dxhat_xhat += dxhat[j] * xhat[j];
        }
        // rmsnorm subtracts no mean, so its gradient has no mean term either.
        const auto a = kind_ == NormKind::layernorm ? static_cast<float>(mean_dxhat / static_cast<double>(f)) : 0.0f;
        const auto b = static_cast<float>(mean_dxhat_xhat / static_cast<double>(f));
        float* out = dx.data.data() + r * f;
        for (std::size_t j = 0; j < f; ++j) out[j] = rstd * (dxhat[j] - a - xhat[j] * b);
    }
    return dx;
}

KernelPtr make_norm(const Model& model, std::size_t layer, Shard shard) {
    const Layer& l = model.layers[layer];
    const auto& op = std::get<NormOp>(l.op);
    const std::size_t features = op.features != 0 ? op.features : l.out_shape.back();
    return std::make_unique<PartKernel<NormPart>>(model, layer, shard, op.kind, features, op.bias);
}

KernelPtr make_embedding(const Model& model, std::size_t layer, Shard shard) {
    return std::make_unique<EmbeddingKernel>(model, layer, shard);
}

}  // namespace dpart::rt::cpu
