// Self-attention: projections and the per-(sample, head) products through gemm; the
// probabilities are not kept but recomputed in backward from the saved log-sum-exp.
#include <algorithm>
#include <cmath>
#include <limits>

#include "blas.hpp"
#include "parts.hpp"

namespace dpart::rt::cpu {

AttentionPart::AttentionPart(ParamLayout& layout, const AttentionOp& op, std::size_t seq, Shard shard)
    : layout_(&layout), shard_(shard), hidden_(op.hidden), seq_(seq), head_dim_(op.head_dim),
      heads_(op.heads / shard.size), kv_heads_(op.kv_heads / shard.size), causal_(op.causal) {
    const AttentionParams p = add_attention_params(layout, op);
    wq_ = p.wq, wk_ = p.wk, wv_ = p.wv, bq_ = p.bq, bk_ = p.bk, bv_ = p.bv, wo_ = p.wo, bo_ = p.bo;
}

void AttentionPart::project(const Tensor& x, std::span<const float> params, Tensor& q, Tensor& k, Tensor& v) const {
    const ParamLayout& p = *layout_;
    const std::size_t rows = x.size() / hidden_;
    const std::size_t qd = heads_ * head_dim_;
    const std::size_t kd = kv_heads_ * head_dim_;
    dense_forward(x.data.data(), rows, hidden_, p.at(params, wq_), p.at(params, bq_), qd, q.data.data());
    dense_forward(x.data.data(), rows, hidden_, p.at(params, wk_), p.at(params, bk_), kd, k.data.data());
    dense_forward(x.data.data(), rows, hidden_, p.at(params, wv_), p.at(params, bv_), kd, v.data.data());
}

/// s = Q K^T / sqrt(d) for one head of one sample: [seq, seq].
void AttentionPart::scores(const float* q, const float* k, float* s) const {
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim_));
    gemm(Op::none, Op::trans, seq_, seq_, head_dim_, scale, q, heads_ * head_dim_, k, kv_heads_ * head_dim_, 0.0f, s,
         seq_);
}

Tensor AttentionPart::forward(const StepContext& ctx, const Tensor& x, std::span<const float> params,
                              std::vector<Tensor>& saved) const {
    const ParamLayout& p = *layout_;
    const std::size_t n = x.rows();
    const std::size_t d = head_dim_;
    const std::size_t qd = heads_ * d;
    const std::size_t kd = kv_heads_ * d;
    const std::size_t group = heads_ / kv_heads_;
    Tensor q({n, seq_, qd}), k({n, seq_, kd}), v({n, seq_, kd});
    project(x, params, q, k, v);
    Tensor o({n, seq_, qd});
    Tensor lse({n, heads_, seq_});
    std::vector<float> s(seq_ * seq_);
    for (std::size_t b = 0; b < n; ++b)
        for (std::size_t h = 0; h < heads_; ++h) {
            const std::size_t g = h / group;
            scores(q.data.data() + b * seq_ * qd + h * d, k.data.data() + b * seq_ * kd + g * d, s.data());
            for (std::size_t i = 0; i < seq_; ++i) {
                float* row = s.data() + i * seq_;
                const std::size_t visible = causal_ ? i + 1 : seq_;
                const float max = *std::max_element(row, row + visible);
                float sum = 0.0f;
                for (std::size_t j = 0; j < visible; ++j) {
                    row[j] = std::exp(row[j] - max);
                    sum += row[j];
                }
                for (std::size_t j = 0; j < visible; ++j) row[j] /= sum;
                std::fill(row + visible, row + seq_, 0.0f);
                lse.data[(b * heads_ + h) * seq_ + i] = max + std::log(sum);
            }
            gemm(Op::none, Op::none, seq_, d, seq_, 1.0f, s.data(), seq_, v.data.data() + b * seq_ * kd + g * d, kd,
                 0.0f, o.data.data() + b * seq_ * qd + h * d, qd);
        }
    Tensor y(x.shape);
    dense_forward(o.data.data(), n * seq_, qd, p.at(params, wo_), nullptr, hidden_, y.data.data());
    allreduce(ctx, shard_, y.data);
    add_bias(y.data.data(), n * seq_, hidden_, p.at(params, bo_));
    saved.push_back(std::move(q));
    saved.push_back(std::move(k));
    saved.push_back(std::move(v));
    saved.push_back(std::move(o));
    saved.push_back(std::move(lse));
    return y;
}

Tensor AttentionPart::backward(const StepContext& ctx, const Tensor& dy, const Tensor& x,
                               std::span<const float> params, std::span<const Tensor> saved,
                               std::span<float> dparams) const {
    const ParamLayout& p = *layout_;
    const Tensor& q = saved[0];
    const Tensor& k = saved[1];
    const Tensor& v = saved[2];
    const Tensor& o = saved[3];
    const Tensor& lse = saved[4];
    const std::size_t n = x.rows();
    const std::size_t d = head_dim_;
    const std::size_t qd = heads_ * d;
    const std::size_t kd = kv_heads_ * d;
    const std::size_t group = heads_ / kv_heads_;
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));

    Tensor dout(o.shape);
    dense_backward(o.data.data(), dy.data.data(), n * seq_, qd, hidden_, p.at(params, wo_), p.at(dparams, wo_),
                   p.at(dparams, bo_), dout.data.data(), 0.0f);
    Tensor dq(q.shape), dk(k.shape), dv(v.shape);
    std::vector<float> prob(seq_ * seq_), dscore(seq_ * seq_);
    for (std::size_t b = 0; b < n; ++b)
        for (std::size_t h = 0; h < heads_; ++h) {
            const std::size_t g = h / group;
            const float* qh = q.data.data() + b * seq_ * qd + h * d;
            const float* oh = o.data.data() + b * seq_ * qd + h * d;
            const float* doh = dout.data.data() + b * seq_ * qd + h * d;
            const float* kg = k.data.data() + b * seq_ * kd + g * d;
            const float* vg = v.data.data() + b * seq_ * kd + g * d;
            scores(qh, kg, prob.data());
            gemm(Op::none, Op::trans, seq_, seq_, d, 1.0f, doh, qd, vg, kd, 0.0f, dscore.data(), seq_);  // dP
            for (std::size_t i = 0; i < seq_; ++i) {
                const std::size_t visible = causal_ ? i + 1 : seq_;
                const float l = lse.data[(b * heads_ + h) * seq_ + i];
                float* pr = prob.data() + i * seq_;
                float* ds = dscore.data() + i * seq_;
                // sum_j P_ij dP_ij = dO_i . O_i
                float dot = 0.0f;
                for (std::size_t c = 0; c < d; ++c) dot += doh[i * qd + c] * oh[i * qd + c];
                for (std::size_t j = 0; j < seq_; ++j) {
                    pr[j] = j < visible ? std::exp(pr[j] - l) : 0.0f;
                    ds[j] = pr[j] * (ds[j] - dot);
                }
            }
            // Heads of one group add into their shared K and V gradients, in head order.
            gemm(Op::trans, Op::none, seq_, d, seq_, 1.0f, prob.data(), seq_, doh, qd, 1.0f,
                 dv.data.data() + b * seq_ * kd + g * d, kd);
            gemm(Op::none, Op::none, seq_, d, seq_, scale, dscore.data(), seq_, kg, kd, 0.0f,
                 dq.data.data() + b * seq_ * qd + h * d, qd);
            gemm(Op::trans, Op::none, seq_, d, seq_, scale, dscore.data(), seq_, qh, qd, 1.0f,
                 dk.data.data() + b * seq_ * kd + g * d, kd);
        }
    Tensor dx(x.shape);
    const std::size_t rows = n * seq_;
    dense_backward(x.data.data(), dq.data.data(), rows, hidden_, qd, p.at(params, wq_), p.at(dparams, wq_),
                   p.at(dparams, bq_), dx.data.data(), 0.0f);
    dense_backward(x.data.data(), dk.data.data(), rows, hidden_, kd, p.at(params, wk_), p.at(dparams, wk_),
                   p.at(dparams, bk_), dx.data.data(), 1.0f);
    dense_backward(x.data.data(), dv.data.data(), rows, hidden_, kd, p.at(params, wv_), p.at(dparams, wv_),
                   p.at(dparams, bv_), dx.data.data(), 1.0f);
    allreduce(ctx, shard_, dx.data);
    return dx;
}

namespace {

void require_heads_split(const Layer& l, const AttentionOp& op, Shard shard) {
    require_split(l, op.heads, "heads", shard);
    require_split(l, op.kv_heads, "kv_heads", shard);
}

/// x1 = x + attn(norm1(x)); y = x1 + mlp(norm2(x1)). Saved: norm1(x), x1, norm2(x1), then
/// each part's own tensors in the order norm1, attention, norm2, mlp.
class BlockKernel final : public Kernel {
public:
    BlockKernel(const Model& model, std::size_t layer, Shard shard, const TransformerBlockOp& op, std::size_t seq)
        : Kernel(model, layer, shard), norm1_(layout_, op.norm, op.attention.hidden, op.norm_bias),
          attn_(layout_, op.attention, seq, shard), norm2_(layout_, op.norm, op.attention.hidden, op.norm_bias),
          mlp_(layout_, op.mlp, shard) {}

    [[nodiscard]] Tensor forward(const StepContext& ctx, std::span<const Tensor* const> inputs,
                                 std::span<const float> params, Saved& saved) const override {
        const Tensor& x = single_input(inputs);
        std::vector<Tensor>& s = saved.tensors;
        s.clear();
        s.resize(3);  // norm1(x), x1, norm2(x1); the parts append theirs
        Tensor h1 = norm1_.forward(ctx, x, params, s);
        Tensor x1 = attn_.forward(ctx, h1, params, s);
        add_into(x1.data, x.data);
        Tensor h2 = norm2_.forward(ctx, x1, params, s);
        Tensor y = mlp_.forward(ctx, h2, params, s);
        add_into(y.data, x1.data);
        s[0] = std::move(h1);
        s[1] = std::move(x1);
        s[2] = std::move(h2);
        return y;
    }

    [[nodiscard]] std::vector<Tensor> backward(const StepContext& ctx, const Tensor& dout,
                                               std::span<const Tensor* const> inputs, std::span<const float> params,
                                               const Saved& saved, std::span<float> dparams) const override {
        const Tensor& x = single_input(inputs);
        const std::span<const Tensor> s = saved.tensors;
        const std::size_t n1 = 3;
        const std::size_t at = n1 + NormPart::saved_count();
        const std::size_t n2 = at + AttentionPart::saved_count();
        const std::size_t m = n2 + NormPart::saved_count();
        const Tensor dh2 = mlp_.backward(ctx, dout, s[2], params, s.subspan(m, mlp_.saved_count()), dparams);
        Tensor dx1 = norm2_.backward(ctx, dh2, s[1], params, s.subspan(n2, NormPart::saved_count()), dparams);
        add_into(dx1.data, dout.data);
        const Tensor dh1 = attn_.backward(ctx, dx1, s[0], params, s.subspan(at, AttentionPart::saved_count()), dparams);
        std::vector<Tensor> dx;
        dx.push_back(norm1_.backward(ctx, dh1, x, params, s.subspan(n1, NormPart::saved_count()), dparams));
        add_into(dx[0].data, dx1.data);
        return dx;
    }

private:
    NormPart norm1_;
    AttentionPart attn_;
    NormPart norm2_;
    FeedForwardPart mlp_;
};

}  // namespace

KernelPtr make_attention(const Model& model, std::size_t layer, Shard shard) {
    const Layer& l = model.layers[layer];
    const auto& op = std::get<AttentionOp>(l.op);
    require_heads_split(l, op, shard);
    return std::make_unique<PartKernel<AttentionPart>>(model, layer, shard, op, std::size_t{l.out_shape[0]}, shard);
}

KernelPtr make_block(const Model& model, std::size_t layer, Shard shard) {
    const Layer& l = model.layers[layer];
    const auto& op = std::get<TransformerBlockOp>(l.op);
    require_heads_split(l, op.attention, shard);
    require_split(l, op.mlp.ffn_hidden, "ffn_hidden", shard);
    return std::make_unique<BlockKernel>(model, layer, shard, op, l.out_shape[0]);
}

}  // namespace dpart::rt::cpu
