// linear and mlp: products with the weight, split Megatron-style over a tensor-parallel group.
#include <fmt/format.h>

#include <algorithm>

#include "parts.hpp"

namespace dpart::rt::cpu {
namespace {

/// y = x W^T + b. Under tensor parallelism W and b are split by output rows (column-parallel):
/// each rank computes its columns of y, which an all-gather assembles. A linear tied to an
/// embedding is never split: it keeps a whole copy of the table on every rank.
class LinearKernel final : public Kernel {
public:
    LinearKernel(const Model& model, std::size_t layer, Shard shard) : Kernel(model, layer, shard) {
        const Layer& l = model.layers[layer];
        const auto& op = std::get<LinearOp>(l.op);
        in_ = op.in_features;
        out_ = op.out_features;
        split_ = shard.size > 1 && !op.tied_to;
        if (split_) require_split(l, out_, "out_features", shard);
        own_ = split_ ? out_ / shard.size : out_;
        const LinearParams p = add_linear_params(layout_, in_, out_, op.bias, split_);
        w_ = p.w;
        b_ = p.b;
    }

    [[nodiscard]] Tensor forward(const StepContext& ctx, std::span<const Tensor* const> inputs,
                                 std::span<const float> params, Saved& saved) const override {
        saved.tensors.clear();
        const Tensor& x = single_input(inputs);
        const std::size_t rows = x.size() / in_;
        Tensor y = output(x.rows());
        if (!split_) {
            dense_forward(x.data.data(), rows, in_, layout_.at(params, w_), layout_.at(params, b_), out_, y.data.data());
            return y;
        }
        std::vector<float> mine(rows * own_);
        dense_forward(x.data.data(), rows, in_, layout_.at(params, w_), layout_.at(params, b_), own_, mine.data());
        std::vector<float> all(rows * out_);
        allgather(ctx, shard_, mine, all);
        // all is [rank][row][own column]: interleave the ranks' columns.
        for (std::size_t r = 0; r < shard_.size; ++r)
            for (std::size_t i = 0; i < rows; ++i)
                std::copy_n(all.data() + (r * rows + i) * own_, own_, y.data.data() + i * out_ + r * own_);
        return y;
    }

    [[nodiscard]] std::vector<Tensor> backward(const StepContext& ctx, const Tensor& dout,
                                               std::span<const Tensor* const> inputs, std::span<const float> params,
                                               const Saved&, std::span<float> dparams) const override {
        const Tensor& x = single_input(inputs);
        const std::size_t rows = x.size() / in_;
        std::vector<float> own_dy;
        const float* dy = dout.data.data();
        if (split_) {
            own_dy.resize(rows * own_);
            for (std::size_t i = 0; i < rows; ++i)
                std::copy_n(dout.data.data() + i * out_ + shard_.rank * own_, own_, own_dy.data() + i * own_);
            dy = own_dy.data();
        }
        std::vector<Tensor> dx;
        dx.emplace_back(x.shape);
        dense_backward(x.data.data(), dy, rows, in_, own_, layout_.at(params, w_), layout_.at(dparams, w_),
                       layout_.at(dparams, b_), dx[0].data.data(), 0.0f);
        if (split_) allreduce(ctx, shard_, dx[0].data);
        return dx;
    }

private:
    std::size_t in_ = 0, out_ = 0, own_ = 0;
    bool split_ = false;
    ParamLayout::Id w_ = ParamLayout::absent, b_ = ParamLayout::absent;
};

Tensor like(const Tensor& x, std::size_t last) {
    std::vector<std::size_t> shape = x.shape;
    shape.back() = last;
    return Tensor(std::move(shape));
}

}  // namespace

MlpPart::MlpPart(ParamLayout& layout, const MlpOp& op, Shard shard)
    : layout_(&layout), shard_(shard), hidden_(op.hidden), ffn_(op.ffn_hidden / shard.size),
      gated_(op.kind == MlpKind::gated), act_(op.activation) {
    const MlpParams p = add_mlp_params(layout, op);
    gate_ = p.gate, up_ = p.up, down_ = p.down, bgate_ = p.bgate, bup_ = p.bup, bdown_ = p.bdown;
}

Tensor MlpPart::forward(const StepContext& ctx, const Tensor& x, std::span<const float> params,
                        std::vector<Tensor>& saved) const {
    const ParamLayout& p = *layout_;
    const std::size_t rows = x.size() / hidden_;
    Tensor up = like(x, ffn_);
    dense_forward(x.data.data(), rows, hidden_, p.at(params, up_), p.at(params, bup_), ffn_, up.data.data());
    std::vector<float> h(up.size());
    if (gated_) {
        Tensor gate = like(x, ffn_);
        dense_forward(x.data.data(), rows, hidden_, p.at(params, gate_), p.at(params, bgate_), ffn_, gate.data.data());
        for (std::size_t i = 0; i < h.size(); ++i) h[i] = activate(act_, gate.data[i]) * up.data[i];
        saved.push_back(std::move(gate));
    } else {
        for (std::size_t i = 0; i < h.size(); ++i) h[i] = activate(act_, up.data[i]);
    }
    saved.push_back(std::move(up));
    Tensor y = like(x, hidden_);
    // Row-parallel down projection: partial sums over this rank's inner units, then the bias once.
    dense_forward(h.data(), rows, ffn_, p.at(params, down_), nullptr, hidden_, y.data.data());
    allreduce(ctx, shard_, y.data);
    add_bias(y.data.data(), rows, hidden_, p.at(params, bdown_));
    return y;
}

Tensor MlpPart::backward(const StepContext& ctx, const Tensor& dy, const Tensor& x, std::span<const float> params,
                         std::span<const Tensor> saved, std::span<float> dparams) const {
    const ParamLayout& p = *layout_;
    const std::size_t rows = x.size() / hidden_;
    const Tensor* gate = gated_ ? &saved[0] : nullptr;
    const Tensor& up = saved[gated_ ? 1 : 0];
    std::vector<float> h(up.size());
    for (std::size_t i = 0; i < h.size(); ++i)
        h[i] = gated_ ? activate(act_, gate->data[i]) * up.data[i] : activate(act_, up.data[i]);

    std::vector<float> dh(h.size());
    dense_backward(h.data(), dy.data.data(), rows, ffn_, hidden_, p.at(params, down_), p.at(dparams, down_),
                   p.at(dparams, bdown_), dh.data(), 0.0f);
    Tensor dx(x.shape);
    if (gated_) {
        std::vector<float> dgate(h.size()), dup(h.size());
        for (std::size_t i = 0; i < h.size(); ++i) {
            dgate[i] = dh[i] * up.data[i] * activate_grad(act_, gate->data[i]);
            dup[i] = dh[i] * activate(act_, gate->data[i]);
        }
        dense_backward(x.data.data(), dgate.data(), rows, hidden_, ffn_, p.at(params, gate_), p.at(dparams, gate_),
                       p.at(dparams, bgate_), dx.data.data(), 0.0f);
        dense_backward(x.data.data(), dup.data(), rows, hidden_, ffn_, p.at(params, up_), p.at(dparams, up_),
                       p.at(dparams, bup_), dx.data.data(), 1.0f);
    } else {
        for (std::size_t i = 0; i < dh.size(); ++i) dh[i] *= activate_grad(act_, up.data[i]);
        dense_backward(x.data.data(), dh.data(), rows, hidden_, ffn_, p.at(params, up_), p.at(dparams, up_),
                       p.at(dparams, bup_), dx.data.data(), 0.0f);
    }
    allreduce(ctx, shard_, dx.data);
    return dx;
}

KernelPtr make_linear(const Model& model, std::size_t layer, Shard shard) {
    return std::make_unique<LinearKernel>(model, layer, shard);
}

KernelPtr make_mlp(const Model& model, std::size_t layer, Shard shard) {
    const Layer& l = model.layers[layer];
    const auto& op = std::get<MlpOp>(l.op);
    require_split(l, op.ffn_hidden, "ffn_hidden", shard);
    return std::make_unique<PartKernel<FeedForwardPart>>(model, layer, shard, op, shard);
}

}  // namespace dpart::rt::cpu
