#pragma once
// The parts a transformer block is made of (norm, attention, MLP), each usable alone as a
// layer's kernel too, and the factory of every op's kernel.
//
// A part registers its parameters in its kernel's ParamLayout at construction; forward appends
// what its backward needs to `saved` (saved_count() tensors), and backward reads exactly those.
#include <memory>
#include <span>
#include <variant>
#include <vector>

#include "common.hpp"

namespace dpart::rt::cpu {

/// layernorm or rmsnorm over the last dimension.
class NormPart {
public:
    NormPart(ParamLayout& layout, NormKind kind, std::size_t features, bool bias);
    [[nodiscard]] static constexpr std::size_t saved_count() { return 1; }
    [[nodiscard]] Tensor forward(const StepContext& ctx, const Tensor& x, std::span<const float> params,
                                 std::vector<Tensor>& saved) const;
    [[nodiscard]] Tensor backward(const StepContext& ctx, const Tensor& dy, const Tensor& x,
                                  std::span<const float> params, std::span<const Tensor> saved,
                                  std::span<float> dparams) const;

private:
    const ParamLayout* layout_;
    NormKind kind_;
    std::size_t features_;
    ParamLayout::Id gamma_, beta_;
};

/// Multi-head / grouped-query self-attention on [n, seq, hidden], heads split over the shard.
class AttentionPart {
public:
    AttentionPart(ParamLayout& layout, const AttentionOp& op, std::size_t seq, Shard shard);
    [[nodiscard]] static constexpr std::size_t saved_count() { return 5; }
    [[nodiscard]] Tensor forward(const StepContext& ctx, const Tensor& x, std::span<const float> params,
                                 std::vector<Tensor>& saved) const;
    [[nodiscard]] Tensor backward(const StepContext& ctx, const Tensor& dy, const Tensor& x,
                                  std::span<const float> params, std::span<const Tensor> saved,
                                  std::span<float> dparams) const;

private:
    void scores(const float* q, const float* k, float* s) const;
    void project(const Tensor& x, std::span<const float> params, Tensor& q, Tensor& k, Tensor& v) const;

    const ParamLayout* layout_;
    Shard shard_;
    std::size_t hidden_, seq_, head_dim_;
    std::size_t heads_, kv_heads_;  ///< this shard's
    bool causal_;
    ParamLayout::Id wq_, wk_, wv_, bq_, bk_, bv_, wo_, bo_;
};

/// Plain or gated MLP on [..., hidden], its inner size split over the shard.
class MlpPart {
public:
    MlpPart(ParamLayout& layout, const MlpOp& op, Shard shard);
    [[nodiscard]] std::size_t saved_count() const { return gated_ ? 2 : 1; }
    [[nodiscard]] Tensor forward(const StepContext& ctx, const Tensor& x, std::span<const float> params,
                                 std::vector<Tensor>& saved) const;
    [[nodiscard]] Tensor backward(const StepContext& ctx, const Tensor& dy, const Tensor& x,
                                  std::span<const float> params, std::span<const Tensor> saved,
                                  std::span<float> dparams) const;

private:
    const ParamLayout* layout_;
    Shard shard_;
    std::size_t hidden_, ffn_;  ///< ffn_: this shard's
    bool gated_;
    Activation act_;
    /// Plain: w1 (up), b1, w2 (down), b2. Gated: wg, wu, wd, bg, bu, bd; up_ = wu.
    ParamLayout::Id gate_, up_, down_, bgate_, bup_, bdown_;
};

/// A mixture of experts on [..., hidden] (docs/METHOD.md, "Mixtures of experts"): a router
/// (hidden -> experts, no bias, whole on every rank), then each expert a plain or gated MlpPart
/// on the tokens routed to it (its inner size split over the shard), their outputs weighted and
/// summed per token in expert order. Parameters: the router, then each expert's MLP.
/// Saved: the router's logits, the experts' outputs by slot, then each MlpPart tensor by slot.
class MoePart {
public:
    MoePart(ParamLayout& layout, const MlpOp& op, Shard shard);
    [[nodiscard]] std::size_t saved_count() const { return 2 + experts_.front().saved_count(); }
    [[nodiscard]] Tensor forward(const StepContext& ctx, const Tensor& x, std::span<const float> params,
                                 std::vector<Tensor>& saved) const;
    [[nodiscard]] Tensor backward(const StepContext& ctx, const Tensor& dy, const Tensor& x,
                                  std::span<const float> params, std::span<const Tensor> saved,
                                  std::span<float> dparams) const;

private:
    /// The routing of x's tokens from logits [tokens, experts]: under tensor parallelism every
    /// rank routes from rank 0's logits (an all-gather), so that all send the same tokens to the
    /// same experts (and make the same collectives) even where their products round differently.
    [[nodiscard]] std::vector<float> shared_logits(const StepContext& ctx, std::vector<float> logits) const;

    const ParamLayout* layout_;
    Shard shard_;
    std::size_t hidden_, experts_count_, k_;
    ParamLayout::Id router_;
    std::vector<MlpPart> experts_;
};

/// An op's MLP: dense, or a mixture of experts when it has more than one.
class FeedForwardPart {
public:
    FeedForwardPart(ParamLayout& layout, const MlpOp& op, Shard shard);
    [[nodiscard]] std::size_t saved_count() const;
    [[nodiscard]] Tensor forward(const StepContext& ctx, const Tensor& x, std::span<const float> params,
                                 std::vector<Tensor>& saved) const;
    [[nodiscard]] Tensor backward(const StepContext& ctx, const Tensor& dy, const Tensor& x,
                                  std::span<const float> params, std::span<const Tensor> saved,
                                  std::span<float> dparams) const;

private:
    std::variant<MlpPart, MoePart> part_;
};

/// A layer that is one part.
template <class Part>
class PartKernel final : public Kernel {
public:
    template <class... Args>
    PartKernel(const Model& model, std::size_t layer, Shard shard, const Args&... args)
        : Kernel(model, layer, shard), part_(layout_, args...) {}

    [[nodiscard]] Tensor forward(const StepContext& ctx, std::span<const Tensor* const> inputs,
                                 std::span<const float> params, Saved& saved) const override {
        saved.tensors.clear();
        return part_.forward(ctx, single_input(inputs), params, saved.tensors);
    }
    [[nodiscard]] std::vector<Tensor> backward(const StepContext& ctx, const Tensor& dout,
                                               std::span<const Tensor* const> inputs, std::span<const float> params,
                                               const Saved& saved, std::span<float> dparams) const override {
        std::vector<Tensor> dx;
        dx.push_back(part_.backward(ctx, dout, single_input(inputs), params, saved.tensors, dparams));
        return dx;
    }

private:
    Part part_;
};

using KernelPtr = std::unique_ptr<LayerKernel>;

KernelPtr make_linear(const Model& model, std::size_t layer, Shard shard);
KernelPtr make_embedding(const Model& model, std::size_t layer, Shard shard);
KernelPtr make_norm(const Model& model, std::size_t layer, Shard shard);
KernelPtr make_attention(const Model& model, std::size_t layer, Shard shard);
KernelPtr make_mlp(const Model& model, std::size_t layer, Shard shard);
KernelPtr make_block(const Model& model, std::size_t layer, Shard shard);
KernelPtr make_elementwise(const Model& model, std::size_t layer, Shard shard);
KernelPtr make_add(const Model& model, std::size_t layer, Shard shard);
KernelPtr make_flatten(const Model& model, std::size_t layer, Shard shard);
KernelPtr make_concat(const Model& model, std::size_t layer, Shard shard);
KernelPtr make_softmax_xent(const Model& model, std::size_t layer, Shard shard);
KernelPtr make_custom(const Model& model, std::size_t layer, Shard shard);
KernelPtr make_conv2d(const Model& model, std::size_t layer, Shard shard);
KernelPtr make_batchnorm(const Model& model, std::size_t layer, Shard shard);
KernelPtr make_pool(const Model& model, std::size_t layer, Shard shard);


/// Elements per sample of layer `layer`'s i-th input (the model input for the first layer);
/// 0 when opaque.
[[nodiscard]] std::size_t input_row_size(const Model& model, std::size_t layer, std::size_t i = 0);

}  // namespace dpart::rt::cpu
