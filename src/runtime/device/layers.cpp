// The device backend's layers, written once over DeviceOps: the CPU kernels' math and parameter
// layout (the same ParamLayout calls in the same order), with activations in the compute
// precision, matrix products reading the compute copy of the weights, and biases, norms and
// embeddings reading the fp32 master copy. A split layer is one rank's shard, as the CPU
// kernel splits it (make_device_layer's `shard`).
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <variant>

#include "dpart/core/error.hpp"
#include "dpart/graph/ops.hpp"
#include "dpart/runtime/device.hpp"
#include "dpart/runtime/moe.hpp"
#include "dpart/runtime/param_layout.hpp"
#include "dpart/runtime/tensor.hpp"

namespace dpart::rt {
namespace {

template <class... Ts>
struct Overloaded : Ts... {
    using Ts::operator()...;
};
template <class... Ts>
Overloaded(Ts...) -> Overloaded<Ts...>;

[[noreturn]] void bad_call(const std::string& layer, const std::string& message) {
    throw RuntimeError(fmt::format("device layer \"{}\": {}", layer, message));
}

/// A part's view of its layer's parameters and gradients.
struct Slices {
    const ParamLayout* layout;
    const DeviceParams* params;
    DeviceSpan grads;
    DeviceGroup* tp = nullptr;  ///< the tensor-parallel group, for a layer split over one

    /// The sum over the tensor-parallel group of a row-parallel product's partial results (or
    /// of an input gradient); nothing without a split.
    void allreduce(DeviceOps& ops, DeviceSpan data) const {
        if (layout->shard().size <= 1) return;
        if (tp == nullptr) throw RuntimeError("a tensor-parallel device layer ran without its group (DeviceStep::tp)");
        tp->allreduce_sum(ops, data);
    }

    [[nodiscard]] DeviceSpan master(ParamLayout::Id id) const { return slice(params->master, id); }
    [[nodiscard]] DeviceSpan compute(ParamLayout::Id id) const { return slice(params->compute, id); }
    [[nodiscard]] DeviceSpan grad(ParamLayout::Id id) const { return slice(grads, id); }
    [[nodiscard]] std::optional<DeviceSpan> maybe_master(ParamLayout::Id id) const {
        return id == ParamLayout::absent ? std::nullopt : std::optional<DeviceSpan>(master(id));
    }
    [[nodiscard]] std::optional<DeviceSpan> maybe_grad(ParamLayout::Id id) const {
        return id == ParamLayout::absent ? std::nullopt : std::optional<DeviceSpan>(grad(id));
    }

private:
    [[nodiscard]] DeviceSpan slice(DeviceSpan all, ParamLayout::Id id) const {
        return all.sub(layout->shard_offset(id), layout->shard_count(id));
    }
};

/// y = x W^T (+ b): x [rows, in], W [out, in] (compute copy), b [out] (master).
void dense_forward(DeviceOps& ops, const Slices& p, DeviceSpan x, std::size_t rows, std::size_t in,
                   ParamLayout::Id w, ParamLayout::Id b, std::size_t out, DeviceSpan y) {
    ops.gemm(Trans::none, Trans::trans, rows, out, in, 1.0f, x, in, p.compute(w), in, 0.0f, y, out);
    if (b != ParamLayout::absent) ops.bias_add(y, p.master(b), rows, out);
}

/// dW += dy^T x, db += column sums of dy, dx = dx_beta dx + dy W.
void dense_backward(DeviceOps& ops, const Slices& p, DeviceSpan x, DeviceSpan dy, std::size_t rows, std::size_t in,
                    std::size_t out, ParamLayout::Id w, ParamLayout::Id b, DeviceSpan dx, float dx_beta) {
    ops.gemm(Trans::trans, Trans::none, out, in, rows, 1.0f, dy, out, x, in, 1.0f, p.grad(w), in);
    if (b != ParamLayout::absent) ops.column_sums(dy, p.grad(b), rows, out);
    ops.gemm(Trans::none, Trans::none, rows, in, out, 1.0f, dy, out, p.compute(w), in, dx_beta, dx, in);
}

class Base : public DeviceLayer {
public:
    Base(const Model& model, std::size_t layer, Elem compute, Shard shard = {})
        : layout_(shard), name_(model.layers.at(layer).name), compute_(compute),
          out_row_(element_count(model.layers.at(layer).out_shape)) {}
    [[nodiscard]] std::size_t params() const noexcept final { return layout_.shard_size(); }
    [[nodiscard]] std::size_t out_row() const noexcept final { return out_row_; }

protected:
    [[nodiscard]] Slices slices(const DeviceParams& p, DeviceSpan grads = {}, DeviceGroup* tp = nullptr) const {
        return {&layout_, &p, grads, tp};
    }
    /// A buffer its op overwrites entirely (every use of make() does).
    [[nodiscard]] DeviceBuffer make(DeviceOps& ops, std::size_t count) const {
        return {ops, count, compute_, DeviceBuffer::uninitialized};
    }
    [[nodiscard]] DeviceSpan single(std::span<const DeviceSpan> inputs) const {
        if (inputs.size() != 1) bad_call(name_, fmt::format("expects one input, got {}", inputs.size()));
        return inputs[0];
    }

    ParamLayout layout_;
    std::string name_;
    Elem compute_;
    std::size_t out_row_;
};

// --- parts (shared by single-part layers and the transformer block) ----------------------

class NormPart {
public:
    NormPart(ParamLayout& layout, NormKind kind, std::size_t features, bool bias) : kind_(kind), f_(features) {
        const NormParams p = add_norm_params(layout, kind, features, bias);
        gamma_ = p.gamma;
        beta_ = p.beta;
    }
    static constexpr std::size_t saved_count = 1;
    DeviceBuffer forward(DeviceOps& ops, const Slices& p, DeviceSpan x, Elem compute,
                         std::vector<DeviceBuffer>& saved) const {
        const std::size_t rows = x.count / f_;
        DeviceBuffer y(ops, x.count, compute, DeviceBuffer::uninitialized);
        DeviceBuffer stats(ops, rows * 2, Elem::f32, DeviceBuffer::uninitialized);
        ops.norm_forward(kind_, x, p.master(gamma_), p.maybe_master(beta_), y.span(), stats.span(), rows, f_);
        saved.push_back(std::move(stats));
        return y;
    }
    DeviceBuffer backward(DeviceOps& ops, const Slices& p, DeviceSpan dy, DeviceSpan x, Elem compute,
                          std::span<const DeviceBuffer> saved) const {
        const std::size_t rows = x.count / f_;
        DeviceBuffer dx(ops, x.count, compute, DeviceBuffer::uninitialized);
        ops.norm_backward(kind_, x, p.master(gamma_), saved[0].span(), dy, dx.span(), p.grad(gamma_),
                          p.maybe_grad(beta_), rows, f_);
        return dx;
    }

private:
    NormKind kind_;
    std::size_t f_;
    ParamLayout::Id gamma_, beta_;
};

/// Multi-head or grouped-query self-attention on [n, seq, hidden]. Saved: q, k, v, the
/// probabilities [n, heads, seq, seq] and the heads' output o.
class AttentionPart {
public:
    /// This rank's heads (heads / tp and kv_heads / tp of them) of the layout's shard.
    AttentionPart(ParamLayout& layout, const AttentionOp& op, std::size_t seq)
        : hidden_(op.hidden), seq_(seq), d_(op.head_dim), heads_(op.heads / layout.shard().size),
          kv_heads_(op.kv_heads / layout.shard().size), causal_(op.causal) {
        const AttentionParams p = add_attention_params(layout, op);
        wq_ = p.wq, wk_ = p.wk, wv_ = p.wv, bq_ = p.bq, bk_ = p.bk, bv_ = p.bv, wo_ = p.wo, bo_ = p.bo;
    }
    static constexpr std::size_t saved_count = 5;

    DeviceBuffer forward(DeviceOps& ops, const Slices& p, DeviceSpan x, Elem compute,
                         std::vector<DeviceBuffer>& saved) const {
        const std::size_t n = x.count / (seq_ * hidden_);
        const std::size_t rows = n * seq_;
        const std::size_t qd = heads_ * d_, kd = kv_heads_ * d_;
        DeviceBuffer q(ops, rows * qd, compute, DeviceBuffer::uninitialized), k(ops, rows * kd, compute, DeviceBuffer::uninitialized), v(ops, rows * kd, compute, DeviceBuffer::uninitialized);
        dense_forward(ops, p, x, rows, hidden_, wq_, bq_, qd, q.span());
        dense_forward(ops, p, x, rows, hidden_, wk_, bk_, kd, k.span());
        dense_forward(ops, p, x, rows, hidden_, wv_, bv_, kd, v.span());
        DeviceBuffer probs(ops, n * heads_ * seq_ * seq_, compute, DeviceBuffer::uninitialized);
        // S = Q K^T per head (scaled inside the softmax), then O = P V.
        each_group(n, [&](std::size_t b, std::size_t h0, std::size_t count, std::size_t k_stride) {
            ops.gemm_batched(Trans::none, Trans::trans, seq_, seq_, d_, 1.0f, q_at(q.span(), b, h0), qd, d_,
                             kv_at(k.span(), b, h0), kd, k_stride, 0.0f, p_at(probs.span(), b, h0), seq_,
                             seq_ * seq_, count);
        });
        ops.attention_softmax_forward(probs.span(), n * heads_, seq_, scale(), causal_);
        DeviceBuffer o(ops, rows * qd, compute, DeviceBuffer::uninitialized);
        each_group(n, [&](std::size_t b, std::size_t h0, std::size_t count, std::size_t k_stride) {
            ops.gemm_batched(Trans::none, Trans::none, seq_, d_, seq_, 1.0f, p_at(probs.span(), b, h0), seq_,
                             seq_ * seq_, kv_at(v.span(), b, h0), kd, k_stride, 0.0f, q_at(o.span(), b, h0), qd, d_,
                             count);
        });
        // Row-parallel output projection: partial sums over this rank's heads, then the bias once.
        DeviceBuffer y(ops, rows * hidden_, compute, DeviceBuffer::uninitialized);
        dense_forward(ops, p, o.span(), rows, qd, wo_, ParamLayout::absent, hidden_, y.span());
        p.allreduce(ops, y.span());
        if (bo_ != ParamLayout::absent) ops.bias_add(y.span(), p.master(bo_), rows, hidden_);
        saved.push_back(std::move(q));
        saved.push_back(std::move(k));
        saved.push_back(std::move(v));
        saved.push_back(std::move(probs));
        saved.push_back(std::move(o));
        return y;
    }

    DeviceBuffer backward(DeviceOps& ops, const Slices& p, DeviceSpan dy, DeviceSpan x, Elem compute,
                          std::span<const DeviceBuffer> saved) const {
        const DeviceSpan q = saved[0].span(), k = saved[1].span(), v = saved[2].span();
        const DeviceSpan probs = saved[3].span(), o = saved[4].span();
        const std::size_t n = x.count / (seq_ * hidden_);
        const std::size_t rows = n * seq_;
        const std::size_t qd = heads_ * d_, kd = kv_heads_ * d_;
        DeviceBuffer dout(ops, rows * qd, compute, DeviceBuffer::uninitialized);
        dense_backward(ops, p, o, dy, rows, qd, hidden_, wo_, bo_, dout.span(), 0.0f);
        // dP = dO V^T, then dS (scaled) in its place.
        DeviceBuffer ds(ops, n * heads_ * seq_ * seq_, compute, DeviceBuffer::uninitialized);
        each_group(n, [&](std::size_t b, std::size_t h0, std::size_t count, std::size_t k_stride) {
            ops.gemm_batched(Trans::none, Trans::trans, seq_, seq_, d_, 1.0f, q_at(dout.span(), b, h0), qd, d_,
                             kv_at(v, b, h0), kd, k_stride, 0.0f, p_at(ds.span(), b, h0), seq_, seq_ * seq_, count);
        });
        ops.attention_softmax_backward(probs, ds.span(), n * heads_, seq_, scale());
        DeviceBuffer dq(ops, rows * qd, compute, DeviceBuffer::uninitialized);
        DeviceBuffer dk(ops, rows * kd, compute), dv(ops, rows * kd, compute);  // zeros: the heads add into them
        // dQ = dS K; dK += dS^T Q and dV += P^T dO, the heads of a group adding in head order.
        each_group(n, [&](std::size_t b, std::size_t h0, std::size_t count, std::size_t k_stride) {
            ops.gemm_batched(Trans::none, Trans::none, seq_, d_, seq_, 1.0f, p_at(ds.span(), b, h0), seq_,
                             seq_ * seq_, kv_at(k, b, h0), kd, k_stride, 0.0f, q_at(dq.span(), b, h0), qd, d_, count);
        });
        for_each_head_into_group(n, [&](std::size_t b, std::size_t h0, std::size_t count) {
            ops.gemm_batched(Trans::trans, Trans::none, seq_, d_, seq_, 1.0f, p_at(ds.span(), b, h0), seq_,
                             seq_ * seq_, q_at(q, b, h0), qd, d_, 1.0f, kv_at(dk.span(), b, h0), kd, d_, count);
            ops.gemm_batched(Trans::trans, Trans::none, seq_, d_, seq_, 1.0f, p_at(probs, b, h0), seq_, seq_ * seq_,
                             q_at(dout.span(), b, h0), qd, d_, 1.0f, kv_at(dv.span(), b, h0), kd, d_, count);
        });
        DeviceBuffer dx(ops, x.count, compute, DeviceBuffer::uninitialized);
        dense_backward(ops, p, x, dq.span(), rows, hidden_, qd, wq_, bq_, dx.span(), 0.0f);
        dense_backward(ops, p, x, dk.span(), rows, hidden_, kd, wk_, bk_, dx.span(), 1.0f);
        dense_backward(ops, p, x, dv.span(), rows, hidden_, kd, wv_, bv_, dx.span(), 1.0f);
        p.allreduce(ops, dx.span());
        return dx;
    }

private:
    [[nodiscard]] float scale() const { return 1.0f / std::sqrt(static_cast<float>(d_)); }
    [[nodiscard]] std::size_t group() const { return heads_ / kv_heads_; }
    /// Head h of sample b in q-like [n, seq, heads * d] and its group's K/V in [n, seq, kv * d].
    [[nodiscard]] DeviceSpan q_at(DeviceSpan t, std::size_t b, std::size_t h) const {
        return t.sub(b * seq_ * heads_ * d_ + h * d_, t.count - (b * seq_ * heads_ * d_ + h * d_));
    }
    [[nodiscard]] DeviceSpan kv_at(DeviceSpan t, std::size_t b, std::size_t h) const {
        const std::size_t at = b * seq_ * kv_heads_ * d_ + (h / group()) * d_;
        return t.sub(at, t.count - at);
    }
    [[nodiscard]] DeviceSpan p_at(DeviceSpan t, std::size_t b, std::size_t h) const {
        const std::size_t at = (b * heads_ + h) * seq_ * seq_;
        return t.sub(at, t.count - at);
    }
    /// Products whose outputs are per head: f(sample, first head, heads, K/V stride between
    /// them). Multi-head attention batches a sample's heads (each its own K and V, d apart);
    /// grouped-query attention a group's heads (sharing one K and V: stride 0).
    template <class F>
    void each_group(std::size_t n, F&& f) const {
        for (std::size_t b = 0; b < n; ++b) {
            if (group() == 1) f(b, 0, heads_, d_);
            else
                for (std::size_t g = 0; g < kv_heads_; ++g) f(b, g * group(), group(), 0);
        }
    }
    /// Products that add into a group's K/V gradient: batched when every head has its own
    /// (multi-head), else one head at a time in head order (deterministic sums).
    template <class F>
    void for_each_head_into_group(std::size_t n, F&& f) const {
        for (std::size_t b = 0; b < n; ++b) {
            if (group() == 1) f(b, 0, heads_);
            else
                for (std::size_t h = 0; h < heads_; ++h) f(b, h, 1);
        }
    }

    std::size_t hidden_, seq_, d_, heads_, kv_heads_;
    bool causal_;
    ParamLayout::Id wq_, wk_, wv_, bq_, bk_, bv_, wo_, bo_;
};

/// Plain (act(x W1 + b1) W2 + b2) or gated MLP. Saved: the gate's pre-activation (gated), the
/// up projection, and the activation h.
class MlpPart {
public:
    /// This rank's inner units (ffn_hidden / tp) of the layout's shard.
    MlpPart(ParamLayout& layout, const MlpOp& op)
        : hidden_(op.hidden), ffn_(op.ffn_hidden / layout.shard().size), gated_(op.kind == MlpKind::gated),
          act_(op.activation) {
        const MlpParams p = add_mlp_params(layout, op);
        gate_ = p.gate, up_ = p.up, down_ = p.down, bgate_ = p.bgate, bup_ = p.bup, bdown_ = p.bdown;
    }
    static constexpr std::size_t saved_count = 3;  // gate (empty when plain), up, h

    DeviceBuffer forward(DeviceOps& ops, const Slices& p, DeviceSpan x, Elem compute,
                         std::vector<DeviceBuffer>& saved) const {
        const std::size_t rows = x.count / hidden_;
        DeviceBuffer up(ops, rows * ffn_, compute, DeviceBuffer::uninitialized), h(ops, rows * ffn_, compute, DeviceBuffer::uninitialized), gate;
        dense_forward(ops, p, x, rows, hidden_, up_, bup_, ffn_, up.span());
        if (gated_) {
            gate = DeviceBuffer(ops, rows * ffn_, compute, DeviceBuffer::uninitialized);
            dense_forward(ops, p, x, rows, hidden_, gate_, bgate_, ffn_, gate.span());
            ops.activation_forward(act_, gate.span(), h.span());
            ops.mul(h.span(), up.span(), h.span());
        } else {
            ops.activation_forward(act_, up.span(), h.span());
        }
        // Row-parallel down projection: partial sums over this rank's units, then the bias once.
        DeviceBuffer y(ops, rows * hidden_, compute, DeviceBuffer::uninitialized);
        dense_forward(ops, p, h.span(), rows, ffn_, down_, ParamLayout::absent, hidden_, y.span());
        p.allreduce(ops, y.span());
        if (bdown_ != ParamLayout::absent) ops.bias_add(y.span(), p.master(bdown_), rows, hidden_);
        saved.push_back(std::move(gate));
        saved.push_back(std::move(up));
        saved.push_back(std::move(h));
        return y;
    }

    DeviceBuffer backward(DeviceOps& ops, const Slices& p, DeviceSpan dy, DeviceSpan x, Elem compute,
                          std::span<const DeviceBuffer> saved) const {
        const std::size_t rows = x.count / hidden_;
        const DeviceSpan up = saved[1].span(), h = saved[2].span();
        DeviceBuffer dh(ops, rows * ffn_, compute, DeviceBuffer::uninitialized);
        dense_backward(ops, p, h, dy, rows, ffn_, hidden_, down_, bdown_, dh.span(), 0.0f);
        DeviceBuffer dx(ops, x.count, compute, DeviceBuffer::uninitialized);
        if (gated_) {
            const DeviceSpan gate = saved[0].span();
            DeviceBuffer dgate(ops, rows * ffn_, compute, DeviceBuffer::uninitialized), dup(ops, rows * ffn_, compute, DeviceBuffer::uninitialized);
            ops.mul(dh.span(), up, dgate.span());                                // dh * up
            ops.activation_backward(act_, gate, dgate.span(), dgate.span());    // * act'(gate)
            ops.activation_forward(act_, gate, dup.span());                      // act(gate)
            ops.mul(dh.span(), dup.span(), dup.span());                          // dh * act(gate)
            dense_backward(ops, p, x, dgate.span(), rows, hidden_, ffn_, gate_, bgate_, dx.span(), 0.0f);
            dense_backward(ops, p, x, dup.span(), rows, hidden_, ffn_, up_, bup_, dx.span(), 1.0f);
        } else {
            ops.activation_backward(act_, up, dh.span(), dh.span());
            dense_backward(ops, p, x, dh.span(), rows, hidden_, ffn_, up_, bup_, dx.span(), 0.0f);
        }
        p.allreduce(ops, dx.span());
        return dx;
    }

private:
    std::size_t hidden_, ffn_;
    bool gated_;
    Activation act_;
    ParamLayout::Id gate_, up_, down_, bgate_, bup_, bdown_;
};

/// A mixture of experts: the CPU kernel's MoePart (runtime/moe.hpp's routing), its rows moved
/// by gathers. The router's logits (f32) go to the host, which routes the tokens (one wait per
/// layer, forward and backward; the router's gradient too is taken there, [tokens, experts]
/// values) and uploads each slot's token and weight; each expert is an MlpPart on its block of
/// gathered rows. Saved: the logits, the gathered inputs by slot, the experts' outputs by slot,
/// then each expert's MlpPart buffers (empty for an expert no token chose).
class MoePart {
public:
    MoePart(ParamLayout& layout, const MlpOp& op)
        : hidden_(op.hidden), count_(op.experts), k_(op.experts_per_token), tp_(layout.shard().size),
          router_(layout.add(op.experts, op.hidden, Split::none, Init::weight, op.hidden)) {
        MlpOp expert = op;
        expert.experts = 1;
        expert.experts_per_token = 1;
        experts_.reserve(count_);
        for (std::size_t e = 0; e < count_; ++e) experts_.emplace_back(layout, expert);
    }
    [[nodiscard]] std::size_t saved_count() const { return 3 + MlpPart::saved_count * count_; }

    DeviceBuffer forward(DeviceOps& ops, const Slices& p, DeviceSpan x, Elem compute,
                         std::vector<DeviceBuffer>& saved) const {
        const std::size_t tokens = x.count / hidden_;
        DeviceBuffer logits(ops, tokens * count_, Elem::f32, DeviceBuffer::uninitialized);
        ops.gemm(Trans::none, Trans::trans, tokens, count_, hidden_, 1.0f, x, hidden_, p.compute(router_), hidden_, 0.0f,
                 logits.span(), count_);
        if (tp_ > 1) {
            // Every rank routes from rank 0's logits (the CPU kernel's rule): partitions of other
            // sizes may round the router's product differently, and a token that went to
            // another expert on one rank would leave the group's collectives mismatched.
            if (p.tp == nullptr) throw RuntimeError("a tensor-parallel device layer ran without its group (DeviceStep::tp)");
            DeviceBuffer all(ops, logits.count() * tp_, Elem::f32, DeviceBuffer::uninitialized);
            p.tp->allgather(ops, logits.span(), all.span());
            ops.copy(all.span().sub(0, logits.count()), logits.span());
        }
        const Routed r = route(ops, logits.span(), tokens, false);
        const std::size_t slots = r.routing.slots();
        DeviceBuffer xs(ops, slots * hidden_, compute, DeviceBuffer::uninitialized);
        DeviceBuffer ys(ops, slots * hidden_, compute, DeviceBuffer::uninitialized);
        ops.gather_rows(x, r.token(), xs.span(), slots, hidden_);
        std::vector<DeviceBuffer> kept;
        for (std::size_t e = 0; e < count_; ++e) {
            const std::size_t first = r.routing.offset[e], n = r.routing.offset[e + 1] - first;
            if (n == 0) {  // every rank of a group routes alike: all skip it
                kept.resize(kept.size() + MlpPart::saved_count);
                continue;
            }
            const DeviceBuffer y = experts_[e].forward(ops, p, xs.span().sub(first * hidden_, n * hidden_), compute, kept);
            ops.copy(y.span(), ys.span().sub(first * hidden_, n * hidden_));
        }
        DeviceBuffer out(ops, x.count, compute, DeviceBuffer::uninitialized);
        ops.gather_sum_rows(ys.span(), r.token_slots(), r.weight.span(), out.span(), tokens, k_, hidden_, false);
        saved.push_back(std::move(logits));
        saved.push_back(std::move(xs));
        saved.push_back(std::move(ys));
        for (DeviceBuffer& b : kept) saved.push_back(std::move(b));
        return out;
    }

    DeviceBuffer backward(DeviceOps& ops, const Slices& p, DeviceSpan dy, DeviceSpan x, Elem compute,
                          std::span<const DeviceBuffer> saved) const {
        const std::size_t tokens = x.count / hidden_;
        const DeviceSpan xs = saved[1].span(), ys = saved[2].span();
        const Routed r = route(ops, saved[0].span(), tokens, true);
        const std::size_t slots = r.routing.slots();
        // Each slot's output gradient; its dot with the slot's output is d loss / d weight.
        DeviceBuffer g(ops, slots * hidden_, compute, DeviceBuffer::uninitialized);
        ops.gather_rows(dy, r.token(), g.span(), slots, hidden_);
        DeviceBuffer dweight(ops, slots, Elem::f32, DeviceBuffer::uninitialized);
        ops.row_dots(g.span(), ys, dweight.span(), slots, hidden_);
        std::vector<float> host(slots);
        ops.download(dweight.span(), host);
        // The router: dW += dlogits^T x, dx = dlogits W.
        const std::vector<float> dlogits = router_logit_grads(r.routing, host);
        DeviceBuffer dz(ops, dlogits.size(), compute, DeviceBuffer::uninitialized);
        ops.upload(dlogits, dz.span());
        DeviceBuffer dx(ops, x.count, compute, DeviceBuffer::uninitialized);
        dense_backward(ops, p, x, dz.span(), tokens, hidden_, count_, router_, ParamLayout::absent, dx.span(), 0.0f);
        // The experts, on their slots' weighted output gradients; then each token's input
        // gradients summed in expert order.
        ops.scale_rows(g.span(), r.weight.span(), slots, hidden_);
        DeviceBuffer dxs(ops, slots * hidden_, compute, DeviceBuffer::uninitialized);
        for (std::size_t e = 0; e < count_; ++e) {
            const std::size_t first = r.routing.offset[e], n = r.routing.offset[e + 1] - first;
            if (n == 0) continue;
            const DeviceBuffer dxe =
                experts_[e].backward(ops, p, g.span().sub(first * hidden_, n * hidden_),
                                     xs.sub(first * hidden_, n * hidden_), compute,
                                     saved.subspan(3 + e * MlpPart::saved_count, MlpPart::saved_count));
            ops.copy(dxe.span(), dxs.span().sub(first * hidden_, n * hidden_));
        }
        ops.gather_sum_rows(dxs.span(), r.token_slots(), std::nullopt, dx.span(), tokens, k_, hidden_, true);
        return dx;
    }

private:
    /// The routing, on the host, and what the device needs of it (two uploads).
    struct Routed {
        MoeRouting routing;
        DeviceBuffer indices;  ///< i32: each slot's token [slots], then each token's slots [tokens, k]
        DeviceBuffer weight;   ///< f32: forward, by token [tokens, k]; backward, by slot [slots]
        [[nodiscard]] DeviceSpan token() const { return indices.span().sub(0, routing.slots()); }
        [[nodiscard]] DeviceSpan token_slots() const { return indices.span().sub(routing.slots(), routing.slots()); }
    };
    [[nodiscard]] Routed route(DeviceOps& ops, DeviceSpan logits, std::size_t tokens, bool backward) const {
        std::vector<float> host(tokens * count_);
        ops.download(logits, host);
        Routed r{route_tokens(host, tokens, count_, k_), {}, {}};
        const MoeRouting& m = r.routing;
        const std::size_t slots = m.slots();
        if (slots >= (std::size_t{1} << 24))
            throw RuntimeError(fmt::format("a mixture of experts routes {} slots in one micro-batch; at most 2^24", slots));
        std::vector<float> packed(m.token.begin(), m.token.end());  // exact: below 2^24
        packed.insert(packed.end(), m.token_slots.begin(), m.token_slots.end());
        r.indices = DeviceBuffer(ops, packed.size(), Elem::i32, DeviceBuffer::uninitialized);
        ops.upload(packed, r.indices.span());
        std::vector<float> w(slots);
        for (std::size_t i = 0; i < slots; ++i) w[i] = backward ? m.weight[i] : m.weight[m.token_slots[i]];
        r.weight = DeviceBuffer(ops, slots, Elem::f32, DeviceBuffer::uninitialized);
        ops.upload(w, r.weight.span());
        return r;
    }

    std::size_t hidden_, count_, k_, tp_;
    ParamLayout::Id router_;
    std::vector<MlpPart> experts_;
};

/// An op's MLP: dense, or a mixture of experts when it has more than one.
class FeedForwardPart {
public:
    FeedForwardPart(ParamLayout& layout, const MlpOp& op)
        : part_(op.experts > 1 ? std::variant<MlpPart, MoePart>(std::in_place_type<MoePart>, layout, op)
                               : std::variant<MlpPart, MoePart>(std::in_place_type<MlpPart>, layout, op)) {}
    [[nodiscard]] std::size_t saved_count() const {
        return std::visit(Overloaded{[](const MlpPart&) { return MlpPart::saved_count; },
                                     [](const MoePart& m) { return m.saved_count(); }},
                          part_);
    }
    DeviceBuffer forward(DeviceOps& ops, const Slices& p, DeviceSpan x, Elem compute,
                         std::vector<DeviceBuffer>& saved) const {
        return std::visit([&](const auto& part) { return part.forward(ops, p, x, compute, saved); }, part_);
    }
    DeviceBuffer backward(DeviceOps& ops, const Slices& p, DeviceSpan dy, DeviceSpan x, Elem compute,
                          std::span<const DeviceBuffer> saved) const {
        return std::visit([&](const auto& part) { return part.backward(ops, p, dy, x, compute, saved); }, part_);
    }

private:
    std::variant<MlpPart, MoePart> part_;
};

// --- layers --------------------------------------------------------------------------------

template <class Part>
class PartLayer final : public Base {
public:
    template <class... Args>
    PartLayer(const Model& model, std::size_t layer, Elem compute, Shard shard, const Args&... args)
        : Base(model, layer, compute, shard), part_(layout_, args...) {}
    DeviceBuffer forward(DeviceOps& ops, const DeviceStep& step, std::span<const DeviceSpan> inputs, std::size_t,
                         const DeviceParams& params, std::vector<DeviceBuffer>& saved) const override {
        saved.clear();
        return part_.forward(ops, slices(params, {}, step.tp), single(inputs), compute_, saved);
    }
    std::vector<DeviceBuffer> backward(DeviceOps& ops, const DeviceStep& step, DeviceSpan dout,
                                       std::span<const DeviceSpan> inputs, std::size_t, const DeviceParams& params,
                                       const std::vector<DeviceBuffer>& saved, DeviceSpan grads) const override {
        std::vector<DeviceBuffer> dx;
        dx.push_back(part_.backward(ops, slices(params, grads, step.tp), dout, single(inputs), compute_, saved));
        return dx;
    }

private:
    Part part_;
};

/// y = x W^T + b. Split over a tensor-parallel group (not when tied to an embedding, as on the
/// CPU) by output rows: each rank computes its columns of y, which an all-gather assembles;
/// backward takes its columns of dy and sums dx over the group.
class LinearLayer final : public Base {
public:
    LinearLayer(const Model& model, std::size_t layer, Elem compute, Shard shard)
        : Base(model, layer, compute, LinearLayer::split(model, layer, shard) ? shard : Shard{}) {
        const auto& op = std::get<LinearOp>(model.layers[layer].op);
        in_ = op.in_features;
        out_ = op.out_features;
        split_ = split(model, layer, shard);
        if (split_) require_split(model.layers[layer], out_, "out_features", shard);
        ranks_ = split_ ? shard.size : 1;
        rank_ = split_ ? shard.rank : 0;
        own_ = out_ / ranks_;
        const LinearParams p = add_linear_params(layout_, in_, out_, op.bias, split_);
        w_ = p.w;
        b_ = p.b;
    }
    DeviceBuffer forward(DeviceOps& ops, const DeviceStep& step, std::span<const DeviceSpan> inputs, std::size_t,
                         const DeviceParams& params, std::vector<DeviceBuffer>& saved) const override {
        saved.clear();
        const DeviceSpan x = single(inputs);
        const std::size_t rows = x.count / in_;
        DeviceBuffer y = make(ops, rows * out_);
        if (!split_) {
            dense_forward(ops, slices(params), x, rows, in_, w_, b_, out_, y.span());
            return y;
        }
        DeviceBuffer mine = make(ops, rows * own_), all = make(ops, rows * out_);
        dense_forward(ops, slices(params), x, rows, in_, w_, b_, own_, mine.span());
        group(step).allgather(ops, mine.span(), all.span());
        // all is [rank][row][own column]: each rank's block to its columns of y.
        for (std::size_t r = 0; r < ranks_; ++r)
            ops.copy_2d(all.span().sub(r * rows * own_, rows * own_), own_, y.span().sub(r * own_, y.count() - r * own_),
                        out_, rows, own_);
        return y;
    }
    std::vector<DeviceBuffer> backward(DeviceOps& ops, const DeviceStep& step, DeviceSpan dout,
                                       std::span<const DeviceSpan> inputs, std::size_t, const DeviceParams& params,
                                       const std::vector<DeviceBuffer>&, DeviceSpan grads) const override {
        const DeviceSpan x = single(inputs);
        const std::size_t rows = x.count / in_;
        std::vector<DeviceBuffer> dx;
        dx.push_back(make(ops, x.count));
        DeviceSpan dy = dout;
        DeviceBuffer own_dy;
        if (split_) {  // this rank's columns of dy
            own_dy = make(ops, rows * own_);
            ops.copy_2d(dout.sub(rank_ * own_, dout.count - rank_ * own_), out_, own_dy.span(), own_, rows, own_);
            dy = own_dy.span();
        }
        dense_backward(ops, slices(params, grads), x, dy, rows, in_, own_, w_, b_, dx[0].span(), 0.0f);
        if (split_) group(step).allreduce_sum(ops, dx[0].span());
        return dx;
    }

private:
    static bool split(const Model& model, std::size_t layer, Shard shard) {
        return shard.size > 1 && !std::get<LinearOp>(model.layers[layer].op).tied_to;
    }
    DeviceGroup& group(const DeviceStep& step) const {
        if (step.tp == nullptr) bad_call(name_, "a tensor-parallel linear layer ran without its group (DeviceStep::tp)");
        return *step.tp;
    }

    std::size_t in_ = 0, out_ = 0, own_ = 0, ranks_ = 1, rank_ = 0;
    bool split_ = false;
    ParamLayout::Id w_ = ParamLayout::absent, b_ = ParamLayout::absent;
};

class ActivationLayer final : public Base {
public:
    ActivationLayer(const Model& model, std::size_t layer, Elem compute, Activation a)
        : Base(model, layer, compute), act_(a) {}
    DeviceBuffer forward(DeviceOps& ops, const DeviceStep&, std::span<const DeviceSpan> inputs, std::size_t,
                         const DeviceParams&, std::vector<DeviceBuffer>& saved) const override {
        saved.clear();
        const DeviceSpan x = single(inputs);
        DeviceBuffer y = make(ops, x.count);
        ops.activation_forward(act_, x, y.span());
        return y;
    }
    std::vector<DeviceBuffer> backward(DeviceOps& ops, const DeviceStep&, DeviceSpan dout,
                                       std::span<const DeviceSpan> inputs, std::size_t, const DeviceParams&,
                                       const std::vector<DeviceBuffer>&, DeviceSpan) const override {
        const DeviceSpan x = single(inputs);
        std::vector<DeviceBuffer> dx;
        dx.push_back(make(ops, x.count));
        ops.activation_backward(act_, x, dout, dx[0].span());
        return dx;
    }

private:
    Activation act_;
};

/// Copies (flatten: the same values, another shape) and sums (add).
class CopyLayer final : public Base {
public:
    using Base::Base;
    DeviceBuffer forward(DeviceOps& ops, const DeviceStep&, std::span<const DeviceSpan> inputs, std::size_t,
                         const DeviceParams&, std::vector<DeviceBuffer>& saved) const override {
        saved.clear();
        if (inputs.empty()) bad_call(name_, "expects an input");
        DeviceBuffer y = make(ops, inputs[0].count);
        ops.copy(inputs[0], y.span());
        for (std::size_t i = 1; i < inputs.size(); ++i) {
            if (inputs[i].count != inputs[0].count) bad_call(name_, "add needs inputs of one size");
            ops.add(inputs[i], y.span());
        }
        return y;
    }
    std::vector<DeviceBuffer> backward(DeviceOps& ops, const DeviceStep&, DeviceSpan dout,
                                       std::span<const DeviceSpan> inputs, std::size_t, const DeviceParams&,
                                       const std::vector<DeviceBuffer>&, DeviceSpan) const override {
        std::vector<DeviceBuffer> dx;
        for (std::size_t i = 0; i < inputs.size(); ++i) {
            dx.push_back(make(ops, dout.count));
            ops.copy(dout, dx.back().span());
        }
        return dx;
    }
    [[nodiscard]] bool backward_reads_inputs() const noexcept override { return false; }
};

/// Token (+ learned position, + token type 0) embeddings. Input: token ids (i32), [n, tokens].
class EmbeddingLayer final : public Base {
public:
    EmbeddingLayer(const Model& model, std::size_t layer, Elem compute) : Base(model, layer, compute) {
        const auto& op = std::get<EmbeddingOp>(model.layers[layer].op);
        vocab_ = op.vocab;
        hidden_ = op.hidden;
        const EmbeddingParams p = add_embedding_params(layout_, op);
        tok_ = p.tok;
        pos_ = p.pos;
        type_ = p.type;
    }
    DeviceBuffer forward(DeviceOps& ops, const DeviceStep&, std::span<const DeviceSpan> inputs, std::size_t n,
                         const DeviceParams& params, std::vector<DeviceBuffer>& saved) const override {
        saved.clear();
        const DeviceSpan ids = single(inputs);
        if (ids.elem != Elem::i32) bad_call(name_, "expects token ids (i32)");
        const Slices p = slices(params);
        const std::size_t tokens = ids.count;
        DeviceBuffer y = make(ops, tokens * hidden_);
        ops.embedding_forward(ids, p.master(tok_), y.span(), tokens, hidden_);
        // Position p's row, added to token p of every sample, is a bias over [n, tokens x hidden];
        // token type 0's row, a bias over every token: no ids to make or upload.
        if (pos_ != ParamLayout::absent)
            ops.bias_add(y.span(), p.master(pos_).sub(0, tokens / n * hidden_), n, tokens / n * hidden_);
        if (type_ != ParamLayout::absent) ops.bias_add(y.span(), p.master(type_).sub(0, hidden_), tokens, hidden_);
        return y;
    }
    std::vector<DeviceBuffer> backward(DeviceOps& ops, const DeviceStep& step, DeviceSpan dout,
                                       std::span<const DeviceSpan> inputs, std::size_t n, const DeviceParams& params,
                                       const std::vector<DeviceBuffer>&, DeviceSpan grads) const override {
        const DeviceSpan ids = single(inputs);
        const Slices p = slices(params, grads);
        const std::size_t tokens = ids.count;
        if (step.token_groups.ptr != nullptr && step.token_groups.count == 2 * step.token_group_count + 1 + tokens)
            ops.embedding_backward_grouped(step.token_groups, step.token_group_count, dout, p.grad(tok_), tokens,
                                           hidden_);
        else
            ops.embedding_backward(ids, dout, p.grad(tok_), tokens, hidden_);
        // The rows' gradients summed over samples (positions) or tokens (type 0), in order.
        if (pos_ != ParamLayout::absent)
            ops.column_sums(dout, p.grad(pos_).sub(0, tokens / n * hidden_), n, tokens / n * hidden_);
        if (type_ != ParamLayout::absent) ops.column_sums(dout, p.grad(type_).sub(0, hidden_), tokens, hidden_);
        std::vector<DeviceBuffer> dx(1);  // token ids have no gradient
        return dx;
    }

private:
    std::size_t vocab_ = 0, hidden_ = 0;
    ParamLayout::Id tok_ = ParamLayout::absent, pos_ = ParamLayout::absent, type_ = ParamLayout::absent;
};

/// Per sample: the mean over its positions of -log softmax(x)[label]. Output f32 [n].
class SoftmaxXentLayer final : public Base {
public:
    SoftmaxXentLayer(const Model& model, std::size_t layer, Elem compute, std::size_t classes)
        : Base(model, layer, compute), classes_(classes) {}
    DeviceBuffer forward(DeviceOps& ops, const DeviceStep& step, std::span<const DeviceSpan> inputs, std::size_t n,
                         const DeviceParams&, std::vector<DeviceBuffer>& saved) const override {
        saved.clear();
        const DeviceSpan x = single(inputs);
        const std::size_t rows = x.count / classes_;
        const std::size_t positions = rows / n;
        DeviceBuffer per_row(ops, rows, Elem::f32, DeviceBuffer::uninitialized);
        ops.softmax_xent_forward(x, labels(step, rows), per_row.span(), rows, classes_);
        // The mean over a sample's positions, as a product with a column of 1 / positions.
        DeviceBuffer ones(ops, positions, Elem::f32, DeviceBuffer::uninitialized);
        ops.fill(ones.span(), 1.0f);
        DeviceBuffer y(ops, n, Elem::f32, DeviceBuffer::uninitialized);
        ops.gemm(Trans::none, Trans::none, n, 1, positions, 1.0f / static_cast<float>(positions), per_row.span(),
                 positions, ones.span(), 1, 0.0f, y.span(), 1);
        return y;
    }
    std::vector<DeviceBuffer> backward(DeviceOps& ops, const DeviceStep& step, DeviceSpan,
                                       std::span<const DeviceSpan> inputs, std::size_t n, const DeviceParams&,
                                       const std::vector<DeviceBuffer>&, DeviceSpan) const override {
        const DeviceSpan x = single(inputs);
        const std::size_t rows = x.count / classes_;
        const std::size_t positions = rows / n;
        std::vector<DeviceBuffer> dx;
        dx.push_back(make(ops, x.count));
        ops.softmax_xent_backward(x, labels(step, rows), step.loss_scale / static_cast<float>(positions),
                                  dx[0].span(), rows, classes_);
        return dx;
    }

private:
    [[nodiscard]] DeviceSpan labels(const DeviceStep& step, std::size_t rows) const {
        if (step.labels.elem != Elem::i32 || step.labels.count != rows)
            bad_call(name_, fmt::format("needs {} labels (i32), got {} ({})", rows, step.labels.count,
                                        to_string(step.labels.elem)));
        return step.labels;
    }
    std::size_t classes_;
};

/// x1 = x + attn(norm1(x)); y = x1 + mlp(norm2(x1)). Saved: norm1(x), x1, norm2(x1), then the
/// parts' own, in the order norm1, attention, norm2, mlp.
class BlockLayer final : public Base {
public:
    BlockLayer(const Model& model, std::size_t layer, Elem compute, Shard shard, const TransformerBlockOp& op,
               std::size_t seq)
        : Base(model, layer, compute, shard), norm1_(layout_, op.norm, op.attention.hidden, op.norm_bias),
          attn_(layout_, op.attention, seq), norm2_(layout_, op.norm, op.attention.hidden, op.norm_bias),
          mlp_(layout_, op.mlp) {}
    DeviceBuffer forward(DeviceOps& ops, const DeviceStep& step, std::span<const DeviceSpan> inputs, std::size_t,
                         const DeviceParams& params, std::vector<DeviceBuffer>& saved) const override {
        const DeviceSpan x = single(inputs);
        const Slices p = slices(params, {}, step.tp);
        saved.clear();
        saved.resize(3);
        DeviceBuffer h1 = norm1_.forward(ops, p, x, compute_, saved);
        DeviceBuffer x1 = attn_.forward(ops, p, h1.span(), compute_, saved);
        ops.add(x, x1.span());
        DeviceBuffer h2 = norm2_.forward(ops, p, x1.span(), compute_, saved);
        DeviceBuffer y = mlp_.forward(ops, p, h2.span(), compute_, saved);
        ops.add(x1.span(), y.span());
        saved[0] = std::move(h1);
        saved[1] = std::move(x1);
        saved[2] = std::move(h2);
        return y;
    }
    std::vector<DeviceBuffer> backward(DeviceOps& ops, const DeviceStep& step, DeviceSpan dout,
                                       std::span<const DeviceSpan> inputs, std::size_t, const DeviceParams& params,
                                       const std::vector<DeviceBuffer>& saved, DeviceSpan grads) const override {
        const DeviceSpan x = single(inputs);
        const Slices p = slices(params, grads, step.tp);
        const std::span<const DeviceBuffer> s = saved;
        constexpr std::size_t n1 = 3;
        constexpr std::size_t at = n1 + NormPart::saved_count;
        constexpr std::size_t n2 = at + AttentionPart::saved_count;
        constexpr std::size_t m = n2 + NormPart::saved_count;
        const DeviceBuffer dh2 = mlp_.backward(ops, p, dout, s[2].span(), compute_, s.subspan(m, mlp_.saved_count()));
        DeviceBuffer dx1 = norm2_.backward(ops, p, dh2.span(), s[1].span(), compute_, s.subspan(n2, NormPart::saved_count));
        ops.add(dout, dx1.span());
        const DeviceBuffer dh1 =
            attn_.backward(ops, p, dx1.span(), s[0].span(), compute_, s.subspan(at, AttentionPart::saved_count));
        std::vector<DeviceBuffer> dx;
        dx.push_back(norm1_.backward(ops, p, dh1.span(), x, compute_, s.subspan(n1, NormPart::saved_count)));
        ops.add(dx1.span(), dx[0].span());
        return dx;
    }

private:
    NormPart norm1_;
    AttentionPart attn_;
    NormPart norm2_;
    FeedForwardPart mlp_;
};


// --- Image layers -----------------------------------------------------------------------------

/// The input shape of an image layer: [C, H, W].
const Shape& image_input(const Model& model, std::size_t layer) {
    const Layer& l = model.layers[layer];
    return l.inputs.empty() ? model.input_shape : model.layers[l.inputs[0]].out_shape;
}

/// Samples per im2col batch: the columns of at most 2^26 elements (256 MiB in fp32), at least one.
std::size_t samples_per_batch(std::size_t samples, std::size_t per_sample) {
    constexpr std::size_t budget = std::size_t{1} << 26;
    return std::max<std::size_t>(1, std::min(samples, budget / std::max<std::size_t>(1, per_sample)));
}

/// y = W * x per group (im2col, then one product per group batched over samples), then the
/// bias per channel (a rank-1 product with a row of ones); the CPU kernel's layout and math.
class Conv2dLayer final : public Base {
public:
    Conv2dLayer(const Model& model, std::size_t layer, Elem compute) : Base(model, layer, compute) {
        const Layer& l = model.layers[layer];
        const auto& op = std::get<Conv2dOp>(l.op);
        const Shape& in = image_input(model, layer);
        in_ = op.in_channels;
        out_ = op.out_channels;
        groups_ = op.groups;
        g_ = Window2d{in[1], in[2], op.kernel_h, op.kernel_w, op.stride, op.padding, l.out_shape[1], l.out_shape[2]};
        const Conv2dParams p = add_conv2d_params(layout_, op);
        fan_in_ = p.fan_in;
        w_ = p.w;
        b_ = p.b;
    }
    DeviceBuffer forward(DeviceOps& ops, const DeviceStep&, std::span<const DeviceSpan> inputs, std::size_t,
                         const DeviceParams& params, std::vector<DeviceBuffer>& saved) const override {
        saved.clear();
        const DeviceSpan x = single(inputs);
        const std::size_t samples = x.count / (in_ * g_.h * g_.w), plane = g_.oh * g_.ow;
        const std::size_t cin = in_ / groups_, cout = out_ / groups_;
        const Slices p = slices(params);
        DeviceBuffer y = make(ops, samples * out_ * plane);
        const bool own = ops.conv2d_forward(conv(samples), x, p.compute(w_), y.span());  // cuDNN
        const std::size_t batch = samples_per_batch(samples, fan_in_ * plane);
        for (std::size_t s0 = 0; !own && s0 < samples; s0 += batch) {
            const std::size_t k = std::min(batch, samples - s0);
            DeviceBuffer cols = make(ops, k * fan_in_ * plane);
            for (std::size_t grp = 0; grp < groups_; ++grp) {
                ops.im2col(sample_rows(x, s0, k), k, in_, grp * cin, cin, g_, cols.span());
                ops.gemm_batched(Trans::none, Trans::none, cout, plane, fan_in_, 1.0f,
                                 p.compute(w_).sub(grp * cout * fan_in_, cout * fan_in_), fan_in_, 0, cols.span(),
                                 plane, fan_in_ * plane, 0.0f, out_block(y.span(), s0, k, grp * cout, cout), plane,
                                 out_ * plane, k);
            }
        }
        if (b_ != ParamLayout::absent) {
            DeviceBuffer ones = make(ops, plane);
            ops.fill(ones.span(), 1.0f);
            ops.gemm_batched(Trans::none, Trans::none, out_, plane, 1, 1.0f, p.compute(b_), 1, 0, ones.span(), plane, 0,
                             1.0f, y.span(), plane, out_ * plane, samples);
        }
        return y;
    }
    std::vector<DeviceBuffer> backward(DeviceOps& ops, const DeviceStep&, DeviceSpan dout,
                                       std::span<const DeviceSpan> inputs, std::size_t, const DeviceParams& params,
                                       const std::vector<DeviceBuffer>&, DeviceSpan grads) const override {
        const DeviceSpan x = single(inputs);
        const std::size_t samples = x.count / (in_ * g_.h * g_.w), plane = g_.oh * g_.ow;
        const std::size_t cin = in_ / groups_, cout = out_ / groups_;
        const Slices p = slices(params, grads);
        std::vector<DeviceBuffer> dx;
        // The device's own convolutions where it has them (cuDNN), else im2col and products.
        const bool own_filter = ops.conv2d_backward_filter(conv(samples), x, dout, p.grad(w_));
        dx.emplace_back(ops, x.count, compute_);  // zeros: col2im adds into it
        const bool own_data = ops.conv2d_backward_data(conv(samples), dout, p.compute(w_), dx[0].span());
        const std::size_t batch = samples_per_batch(samples, fan_in_ * plane);
        for (std::size_t s0 = 0; !(own_filter && own_data) && s0 < samples; s0 += batch) {
            const std::size_t k = std::min(batch, samples - s0);
            // Each only where its path runs (im2col for the weight gradient, col2im for dx).
            DeviceBuffer cols = own_filter ? DeviceBuffer{} : make(ops, k * fan_in_ * plane);
            DeviceBuffer dcols = own_data ? DeviceBuffer{} : make(ops, k * fan_in_ * plane);
            for (std::size_t grp = 0; grp < groups_; ++grp) {
                const DeviceSpan w = p.compute(w_).sub(grp * cout * fan_in_, cout * fan_in_);
                const DeviceSpan dy = out_block(dout, s0, k, grp * cout, cout);
                if (!own_filter) ops.im2col(sample_rows(x, s0, k), k, in_, grp * cin, cin, g_, cols.span());
                // dW += dy_s cols_s^T, sample after sample (as the CPU kernel sums them).
                for (std::size_t s = 0; !own_filter && s < k; ++s)
                    ops.gemm(Trans::none, Trans::trans, cout, fan_in_, plane, 1.0f, dy.sub(s * out_ * plane, cout * plane),
                             plane, cols.span().sub(s * fan_in_ * plane, fan_in_ * plane), plane, 1.0f,
                             p.grad(w_).sub(grp * cout * fan_in_, cout * fan_in_), fan_in_);
                if (own_data) continue;
                ops.gemm_batched(Trans::trans, Trans::none, fan_in_, plane, cout, 1.0f, w, fan_in_, 0, dy, plane,
                                 out_ * plane, 0.0f, dcols.span(), plane, fan_in_ * plane, k);
                ops.col2im(dcols.span(), k, in_, grp * cin, cin, g_, sample_rows(dx[0].span(), s0, k));
            }
        }
        if (b_ != ParamLayout::absent) {
            // db[c] += the sum over samples and positions of dy[s, c, :], sample after sample.
            DeviceBuffer ones = make(ops, plane);
            ops.fill(ones.span(), 1.0f);
            for (std::size_t s = 0; s < samples; ++s)
                ops.gemm(Trans::none, Trans::none, out_, 1, plane, 1.0f, dout.sub(s * out_ * plane, out_ * plane), plane,
                         ones.span(), 1, 1.0f, p.grad(b_), 1);
        }
        return dx;
    }

private:
    [[nodiscard]] DeviceOps::Conv conv(std::size_t samples) const { return {samples, in_, out_, groups_, g_}; }
    /// Samples [s0, s0 + k) of x.
    [[nodiscard]] DeviceSpan sample_rows(DeviceSpan x, std::size_t s0, std::size_t k) const {
        const std::size_t per = in_ * g_.h * g_.w;
        return x.sub(s0 * per, k * per);
    }
    /// Channels [c0, c0 + n) of samples [s0, s0 + k) of an output-shaped span, as a strided batch
    /// starts: from sample s0's channel c0 to sample s0 + k - 1's channel c0 + n.
    [[nodiscard]] DeviceSpan out_block(DeviceSpan y, std::size_t s0, std::size_t k, std::size_t c0, std::size_t n) const {
        const std::size_t plane = g_.oh * g_.ow;
        return y.sub((s0 * out_ + c0) * plane, ((k - 1) * out_ + n) * plane);
    }

    std::size_t in_ = 0, out_ = 0, groups_ = 1, fan_in_ = 0;
    Window2d g_;
    ParamLayout::Id w_ = ParamLayout::absent, b_ = ParamLayout::absent;
};

/// Max or average pooling over each channel's plane (the CPU kernel's rules).
class PoolLayer final : public Base {
public:
    PoolLayer(const Model& model, std::size_t layer, Elem compute) : Base(model, layer, compute) {
        const Layer& l = model.layers[layer];
        const auto& op = std::get<PoolOp>(l.op);
        const Shape& in = image_input(model, layer);
        max_ = op.kind == PoolKind::max;
        channels_ = in[0];
        g_ = op.global ? Window2d{in[1], in[2], in[1], in[2], 1, 0, 1, 1}
                       : Window2d{in[1], in[2], op.kernel, op.kernel, op.stride, op.padding, l.out_shape[1],
                                  l.out_shape[2]};
    }
    DeviceBuffer forward(DeviceOps& ops, const DeviceStep&, std::span<const DeviceSpan> inputs, std::size_t,
                         const DeviceParams&, std::vector<DeviceBuffer>& saved) const override {
        saved.clear();
        const DeviceSpan x = single(inputs);
        const std::size_t planes = x.count / (g_.h * g_.w);
        DeviceBuffer y = make(ops, planes * g_.oh * g_.ow);
        ops.pool_forward(max_, x, y.span(), planes, g_);
        return y;
    }
    std::vector<DeviceBuffer> backward(DeviceOps& ops, const DeviceStep&, DeviceSpan dout,
                                       std::span<const DeviceSpan> inputs, std::size_t, const DeviceParams&,
                                       const std::vector<DeviceBuffer>&, DeviceSpan) const override {
        const DeviceSpan x = single(inputs);
        std::vector<DeviceBuffer> dx;
        dx.emplace_back(ops, x.count, compute_);  // zeros: the windows add into it
        ops.pool_backward(max_, x, dout, dx[0].span(), x.count / (g_.h * g_.w), g_);
        return dx;
    }
    /// Average pooling spreads dY over each window without reading x.
    [[nodiscard]] bool backward_reads_inputs() const noexcept override { return max_; }

private:
    bool max_ = true;
    std::size_t channels_ = 0;
    Window2d g_;
};

/// Batch normalisation with the batch's statistics (the samples of the call: one microbatch's).
class BatchNormLayer final : public Base {
public:
    BatchNormLayer(const Model& model, std::size_t layer, Elem compute) : Base(model, layer, compute) {
        channels_ = model.layers[layer].out_shape.front();
        const NormParams p = add_batchnorm_params(layout_, channels_);
        gamma_ = p.gamma;
        beta_ = p.beta;
    }
    DeviceBuffer forward(DeviceOps& ops, const DeviceStep&, std::span<const DeviceSpan> inputs, std::size_t n,
                         const DeviceParams& params, std::vector<DeviceBuffer>& saved) const override {
        const DeviceSpan x = single(inputs);
        const Slices p = slices(params);
        DeviceBuffer y = make(ops, x.count);
        saved.clear();
        saved.emplace_back(ops, channels_ * 2, Elem::f32, DeviceBuffer::uninitialized);
        ops.batchnorm_forward(x, p.master(gamma_), p.master(beta_), y.span(), saved[0].span(), n, channels_,
                              x.count / std::max<std::size_t>(1, n * channels_));
        return y;
    }
    std::vector<DeviceBuffer> backward(DeviceOps& ops, const DeviceStep&, DeviceSpan dout,
                                       std::span<const DeviceSpan> inputs, std::size_t n, const DeviceParams& params,
                                       const std::vector<DeviceBuffer>& saved, DeviceSpan grads) const override {
        const DeviceSpan x = single(inputs);
        const Slices p = slices(params, grads);
        std::vector<DeviceBuffer> dx;
        dx.push_back(make(ops, x.count));
        ops.batchnorm_backward(x, p.master(gamma_), saved.at(0).span(), dout, dx[0].span(), p.grad(gamma_),
                               p.grad(beta_), n, channels_, x.count / std::max<std::size_t>(1, n * channels_));
        return dx;
    }

private:
    std::size_t channels_ = 0;
    ParamLayout::Id gamma_ = ParamLayout::absent, beta_ = ParamLayout::absent;
};

/// Concatenation along a sample axis: for each sample and each index before the axis, every
/// input's block in turn (copies; backward copies the blocks back out).
class ConcatLayer final : public Base {
public:
    ConcatLayer(const Model& model, std::size_t layer, Elem compute) : Base(model, layer, compute) {
        const Layer& l = model.layers[layer];
        const std::size_t axis = std::get<ConcatOp>(l.op).axis;
        const Shape& first = model.layers[l.inputs.front()].out_shape;
        outer_ = 1;
        for (std::size_t d = 0; d < axis; ++d) outer_ *= first[d];
        for (std::size_t i : l.inputs) {
            const Shape& s = model.layers[i].out_shape;
            std::size_t block = 1;
            for (std::size_t d = axis; d < s.size(); ++d) block *= s[d];
            blocks_.push_back(block);
        }
        total_ = std::accumulate(blocks_.begin(), blocks_.end(), std::size_t{0});
    }
    DeviceBuffer forward(DeviceOps& ops, const DeviceStep&, std::span<const DeviceSpan> inputs, std::size_t n,
                         const DeviceParams&, std::vector<DeviceBuffer>& saved) const override {
        saved.clear();
        if (inputs.size() != blocks_.size())
            bad_call(name_, fmt::format("expects {} inputs, got {}", blocks_.size(), inputs.size()));
        DeviceBuffer y = make(ops, n * outer_ * total_);
        walk(n, [&](std::size_t i, std::size_t from, std::size_t to) {
            ops.copy(inputs[i].sub(from, blocks_[i]), y.span().sub(to, blocks_[i]));
        });
        return y;
    }
    std::vector<DeviceBuffer> backward(DeviceOps& ops, const DeviceStep&, DeviceSpan dout,
                                       std::span<const DeviceSpan> inputs, std::size_t n, const DeviceParams&,
                                       const std::vector<DeviceBuffer>&, DeviceSpan) const override {
        std::vector<DeviceBuffer> dx;
        for (const DeviceSpan& x : inputs) dx.push_back(make(ops, x.count));
        walk(n, [&](std::size_t i, std::size_t from, std::size_t to) {
            ops.copy(dout.sub(to, blocks_[i]), dx[i].span().sub(from, blocks_[i]));
        });
        return dx;
    }
    [[nodiscard]] bool backward_reads_inputs() const noexcept override { return false; }

private:
    /// f(input, offset in the input, offset in the output) for every block.
    template <class F>
    void walk(std::size_t n, F&& f) const {
        for (std::size_t r = 0; r < n * outer_; ++r) {
            std::size_t to = r * total_;
            for (std::size_t i = 0; i < blocks_.size(); ++i) {
                f(i, r * blocks_[i], to);
                to += blocks_[i];
            }
        }
    }

    std::size_t outer_ = 1, total_ = 0;
    std::vector<std::size_t> blocks_;
};

/// Dropout: x times a mask of 0 or 1 / (1 - p) drawn as the CPU kernel draws it (dropout_factor
/// of the sample's global index), made on the host and uploaded; backward reuses it.
/// A custom layer: y = x' W^T with x' each sample's input tiled or cut to k (custom_geometry),
/// computed without building x': W's column blocks of the input's width each multiply x, the
/// products summed into y (the declared FLOPs, 2 out k per sample). Backward: each block's
/// weight gradient, and dx summed over the blocks, as the CPU kernel folds x'\'s gradient.
class CustomLayer final : public Base {
public:
    CustomLayer(const Model& model, std::size_t layer, Elem compute)
        : Base(model, layer, compute), g_(custom_geometry(model, layer)) {
        w_ = add_custom_params(layout_, g_);
        out_row_ = g_.out;
    }
    DeviceBuffer forward(DeviceOps& ops, const DeviceStep&, std::span<const DeviceSpan> inputs, std::size_t n,
                         const DeviceParams& params, std::vector<DeviceBuffer>& saved) const override {
        saved.clear();
        const DeviceSpan x = single(inputs);
        if (x.count != n * g_.row)
            bad_call(name_, fmt::format("an input of {} values for {} samples of {}", x.count, n, g_.row));
        const Slices p = slices(params);
        DeviceBuffer y = make(ops, n * g_.out);
        if (g_.row == 0) {
            ops.fill(y.span(), 0.0f);
            return y;
        }
        for_blocks([&](std::size_t at, std::size_t kb, float beta) {
            ops.gemm(Trans::none, Trans::trans, n, g_.out, kb, 1.0f, x, g_.row, block(p.compute(w_), at), g_.k, beta,
                     y.span(), g_.out);
        });
        return y;
    }
    std::vector<DeviceBuffer> backward(DeviceOps& ops, const DeviceStep&, DeviceSpan dout,
                                       std::span<const DeviceSpan> inputs, std::size_t n, const DeviceParams& params,
                                       const std::vector<DeviceBuffer>&, DeviceSpan grads) const override {
        const DeviceSpan x = single(inputs);
        if (x.count != n * g_.row || dout.count != n * g_.out)
            bad_call(name_, fmt::format("backward on {} input and {} output values for {} samples", x.count, dout.count, n));
        const Slices p = slices(params, grads);
        std::vector<DeviceBuffer> dx;
        // A cut input (k < row): the columns past k get no gradient.
        dx.push_back(g_.k < g_.row ? DeviceBuffer(ops, x.count, compute_) : make(ops, x.count));
        if (g_.row == 0) return dx;
        for_blocks([&](std::size_t at, std::size_t kb, float beta) {
            ops.gemm(Trans::trans, Trans::none, g_.out, kb, n, 1.0f, dout, g_.out, x, g_.row, 1.0f,
                     block(p.grad(w_), at), g_.k);
            ops.gemm(Trans::none, Trans::none, n, kb, g_.out, 1.0f, dout, g_.out, block(p.compute(w_), at), g_.k, beta,
                     dx[0].span(), g_.row);
        });
        return dx;
    }

private:
    /// f(first column, width, beta) for each block of the input's width within k: the first
    /// overwrites (beta 0; it is the widest), the others add.
    template <class F>
    void for_blocks(F&& f) const {
        for (std::size_t at = 0; at < g_.k; at += g_.row) f(at, std::min(g_.row, g_.k - at), at == 0 ? 0.0f : 1.0f);
    }
    /// W's columns from `at` on, as a matrix of row stride k.
    [[nodiscard]] static DeviceSpan block(DeviceSpan w, std::size_t at) { return w.sub(at, w.count - at); }

    CustomGeometry g_;
    ParamLayout::Id w_ = ParamLayout::absent;
};

class DropoutLayer final : public Base {
public:
    DropoutLayer(const Model& model, std::size_t layer, Elem compute) : Base(model, layer, compute), index_(layer) {}
    DeviceBuffer forward(DeviceOps& ops, const DeviceStep& step, std::span<const DeviceSpan> inputs, std::size_t n,
                         const DeviceParams&, std::vector<DeviceBuffer>& saved) const override {
        const DeviceSpan x = single(inputs);
        const std::size_t row = x.count / std::max<std::size_t>(1, n);
        std::vector<float> mask(x.count);
        for (std::size_t i = 0; i < mask.size(); ++i)
            mask[i] = dropout_factor(step.seed, index_, (step.first_sample + i / row) * row + i % row);
        saved.clear();
        saved.push_back(make(ops, x.count));
        ops.upload(mask, saved[0].span());
        DeviceBuffer y = make(ops, x.count);
        ops.mul(x, saved[0].span(), y.span());
        return y;
    }
    std::vector<DeviceBuffer> backward(DeviceOps& ops, const DeviceStep&, DeviceSpan dout, std::span<const DeviceSpan>,
                                       std::size_t, const DeviceParams&, const std::vector<DeviceBuffer>& saved,
                                       DeviceSpan) const override {
        std::vector<DeviceBuffer> dx;
        dx.push_back(make(ops, dout.count));
        ops.mul(dout, saved.at(0).span(), dx[0].span());
        return dx;
    }
    /// Backward multiplies dY by the saved mask: x is not read.
    [[nodiscard]] bool backward_reads_inputs() const noexcept override { return false; }

private:
    std::size_t index_;
};

}  // namespace

TokenGroups group_tokens(std::span<const float> ids) {
    // Positions travel as floats (upload's type): exact below 2^24.
    if (ids.size() >= (std::size_t{1} << 24))
        throw InputError(fmt::format("{} tokens to group at once, more than 2^24", ids.size()));
    std::map<std::int32_t, std::vector<std::int32_t>> by_id;
    for (std::size_t t = 0; t < ids.size(); ++t) {
        if (ids[t] < 0.0f) throw InputError(fmt::format("token {} has a negative id ({})", t, ids[t]));
        by_id[static_cast<std::int32_t>(ids[t])].push_back(static_cast<std::int32_t>(t));
    }
    TokenGroups g;
    g.groups = by_id.size();
    g.packed.reserve(2 * g.groups + 1 + ids.size());
    for (const auto& entry : by_id) g.packed.push_back(static_cast<float>(entry.first));
    std::size_t at = 0;
    g.packed.push_back(0.0f);
    for (const auto& entry : by_id) {
        at += entry.second.size();
        g.packed.push_back(static_cast<float>(at));
    }
    for (const auto& entry : by_id)
        for (std::int32_t t : entry.second) g.packed.push_back(static_cast<float>(t));
    return g;
}

std::vector<float> loss_labels(std::uint64_t seed, std::uint64_t first_sample, std::size_t n, std::size_t positions,
                               std::size_t classes) {
    std::vector<float> labels(n * positions);
    for (std::size_t i = 0; i < n; ++i)
        for (std::size_t p = 0; p < positions; ++p)
            labels[i * positions + p] = static_cast<float>(
                random_bits(seed, stream_of(Stream::label), (first_sample + i) * positions + p) % classes);
    return labels;
}

namespace {

void require_heads_split(const Layer& l, const AttentionOp& op, Shard shard) {
    require_split(l, op.heads, "heads", shard);
    require_split(l, op.kv_heads, "kv_heads", shard);
}

}  // namespace

std::unique_ptr<DeviceLayer> make_device_layer(const Model& model, std::size_t layer, Elem compute, Shard shard) {
    if (layer >= model.layers.size())
        throw std::out_of_range(fmt::format("make_device_layer: layer {} of a {}-layer model", layer, model.layers.size()));
    if (compute != Elem::f32 && compute != Elem::bf16)
        throw std::invalid_argument("make_device_layer: layers compute in f32 or bf16");
    const Layer& l = model.layers[layer];
    const auto make = Overloaded{
        [&](const LinearOp&) -> std::unique_ptr<DeviceLayer> {
            return std::make_unique<LinearLayer>(model, layer, compute, shard);
        },
        [&](const EmbeddingOp&) -> std::unique_ptr<DeviceLayer> {
            return std::make_unique<EmbeddingLayer>(model, layer, compute);
        },
        [&](const NormOp& op) -> std::unique_ptr<DeviceLayer> {
            const std::size_t features = op.features != 0 ? op.features : l.out_shape.back();
            return std::make_unique<PartLayer<NormPart>>(model, layer, compute, Shard{}, op.kind, features, op.bias);
        },
        [&](const ElementwiseOp& op) -> std::unique_ptr<DeviceLayer> {
            if (op.kind == Elementwise::dropout) return std::make_unique<DropoutLayer>(model, layer, compute);
            const Activation a = op.kind == Elementwise::relu   ? Activation::relu
                                 : op.kind == Elementwise::gelu ? Activation::gelu
                                                                : Activation::silu;
            return std::make_unique<ActivationLayer>(model, layer, compute, a);
        },
        [&](const AttentionOp& op) -> std::unique_ptr<DeviceLayer> {
            require_heads_split(l, op, shard);
            return std::make_unique<PartLayer<AttentionPart>>(model, layer, compute, shard, op,
                                                              std::size_t{l.out_shape[0]});
        },
        [&](const MlpOp& op) -> std::unique_ptr<DeviceLayer> {
            require_split(l, op.ffn_hidden, "ffn_hidden", shard);
            return std::make_unique<PartLayer<FeedForwardPart>>(model, layer, compute, shard, op);
        },
        [&](const TransformerBlockOp& op) -> std::unique_ptr<DeviceLayer> {
            require_heads_split(l, op.attention, shard);
            require_split(l, op.mlp.ffn_hidden, "ffn_hidden", shard);
            return std::make_unique<BlockLayer>(model, layer, compute, shard, op, std::size_t{l.out_shape[0]});
        },
        [&](const AddOp&) -> std::unique_ptr<DeviceLayer> { return std::make_unique<CopyLayer>(model, layer, compute); },
        [&](const FlattenOp&) -> std::unique_ptr<DeviceLayer> {
            return std::make_unique<CopyLayer>(model, layer, compute);
        },
        [&](const SoftmaxXentOp&) -> std::unique_ptr<DeviceLayer> {
            return std::make_unique<SoftmaxXentLayer>(model, layer, compute, loss_shape(model, layer).classes);
        },
        [&](const BatchNormOp&) -> std::unique_ptr<DeviceLayer> {
            return std::make_unique<BatchNormLayer>(model, layer, compute);
        },
        [&](const Conv2dOp&) -> std::unique_ptr<DeviceLayer> { return std::make_unique<Conv2dLayer>(model, layer, compute); },
        [&](const PoolOp&) -> std::unique_ptr<DeviceLayer> { return std::make_unique<PoolLayer>(model, layer, compute); },
        [&](const ConcatOp&) -> std::unique_ptr<DeviceLayer> { return std::make_unique<ConcatLayer>(model, layer, compute); },
        [&](const CustomOp&) -> std::unique_ptr<DeviceLayer> { return std::make_unique<CustomLayer>(model, layer, compute); },
    };
    return std::visit(make, l.op);
}

}  // namespace dpart::rt
