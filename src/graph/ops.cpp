#include "dpart/graph/ops.hpp"

#include <fmt/format.h>

#include <algorithm>

#include "dpart/core/checked.hpp"

namespace dpart {
namespace {

using u64 = std::uint64_t;

u64 mul(std::initializer_list<u64> factors) { return checked_product(factors); }
u64 sum(std::initializer_list<u64> terms) { return checked_sum(terms); }

[[noreturn]] void fail(const std::string& message) { throw ShapeError(message); }

const Shape& shaped_input(const std::vector<Shape>& in, std::string_view op) {
    if (in.size() != 1) fail(fmt::format("{} takes exactly one input, got {}", op, in.size()));
    if (in[0].empty())
        fail(fmt::format("{} cannot read an input of unknown shape (a custom layer without out_shape)", op));
    return in[0];
}

void require_last_dim(const Shape& x, u64 expected, std::string_view key) {
    if (x.back() != expected)
        fail(fmt::format("{} {} does not match the input's last dimension {} (input shape {})", key, expected,
                         x.back(), to_string(x)));
}

u64 per_rank(u64 n, u64 tp) { return (n + tp - 1) / tp; }

// --- Workspace: what a layer's backward holds beyond its output and saved bytes, per sample on
// each of `tp` ranks (dpart run's kernels). One function per op, for eval (tp 1) and
// split_workspace_bytes alike.

/// dY and dX; a split (untied) layer also its own columns of dY.
u64 linear_workspace(const LinearOp& o, u64 tokens, u64 e, u64 tp) {
    const u64 own = tp > 1 && !o.tied_to ? per_rank(o.out_features, tp) : 0;
    return mul({tokens, sum({o.in_features, o.out_features, own}), e});
}

OpResult eval(const LinearOp& o, const std::vector<Shape>& in, u64 e) {
    const Shape& x = shaped_input(in, "linear");
    require_last_dim(x, o.in_features, "in_features");
    const u64 tokens = leading_count(x);
    const u64 weights = sum({mul({o.in_features, o.out_features}), o.bias ? o.out_features : 0});
    const u64 in_elems = mul({tokens, o.in_features});
    const u64 out_elems = mul({tokens, o.out_features});
    OpResult r;
    r.out_shape = x;
    r.out_shape.back() = o.out_features;
    r.cost.params = o.tied_to ? 0 : weights;
    r.cost.fwd_flops = mul({2, tokens, o.in_features, o.out_features});
    r.cost.bwd_flops = mul({4, tokens, o.in_features, o.out_features});  // dX and dW
    r.cost.out_bytes = mul({out_elems, e});
    r.cost.saved_bytes = mul({in_elems, e});  // X, for dW
    r.cost.fwd_mem_bytes = mul({sum({in_elems, out_elems}), e});
    r.cost.bwd_mem_bytes = mul({2, sum({in_elems, out_elems}), e});  // dY twice, X, dX
    r.cost.weight_bytes = mul({weights, e});
    r.cost.workspace_bytes = linear_workspace(o, tokens, e, 1);
    return r;
}

OpResult eval(const EmbeddingOp& o, const std::vector<Shape>& in, u64 e) {
    const Shape& x = shaped_input(in, "embedding");
    const u64 tokens = element_count(x);
    if (o.seq_len != 0 && o.seq_len != tokens)
        fail(fmt::format("seq_len {} does not match the {} tokens of its input {}", o.seq_len, tokens, to_string(x)));
    if (o.positions != 0 && tokens > o.positions)
        fail(fmt::format("{} tokens per sample exceed the position table of {} rows", tokens, o.positions));
    const u64 tables = 1 + (o.positions != 0 ? 1 : 0) + (o.token_types != 0 ? 1 : 0);
    const u64 id_arrays = o.token_types != 0 ? 2 : 1;  // int32 token ids (and token-type ids)
    const u64 out_elems = mul({tokens, o.hidden});
    OpResult r;
    r.out_shape = x;
    r.out_shape.push_back(o.hidden);
    r.cost.params = mul({sum({o.vocab, o.positions, o.token_types}), o.hidden});
    r.cost.out_bytes = mul({out_elems, e});
    r.cost.saved_bytes = mul({id_arrays, tokens, 4});
    // Gather: read the ids and one row per token from each table, write the sum.
    r.cost.fwd_mem_bytes = sum({mul({id_arrays, tokens, 4}), mul({tables + 1, out_elems, e})});
    r.cost.bwd_mem_bytes = sum({mul({id_arrays, tokens, 4}), mul({tables + 1, out_elems, e})});
    r.cost.workspace_bytes = r.cost.out_bytes;  // dY (no gradient for the ids)
    return r;
}

OpResult eval(const NormOp& o, const std::vector<Shape>& in, u64 e) {
    const Shape& x = shaped_input(in, std::string(to_string(o.kind)));
    const u64 features = o.features != 0 ? o.features : x.back();
    require_last_dim(x, features, "features");
    const u64 n = element_count(x);
    const u64 rows = n / features;
    const bool has_bias = o.kind == NormKind::layernorm && o.bias;
    OpResult r;
    r.out_shape = x;
    r.cost.params = mul({has_bias ? u64{2} : u64{1}, features});
    r.cost.out_bytes = mul({n, e});
    // Input, plus fp32 statistics per row (mean and 1/std for layernorm, 1/rms for rmsnorm).
    r.cost.saved_bytes = sum({mul({n, e}), mul({rows, o.kind == NormKind::layernorm ? 8u : 4u})});
    r.cost.fwd_mem_bytes = mul({2, n, e});
    r.cost.bwd_mem_bytes = mul({3, n, e});
    r.cost.weight_bytes = mul({r.cost.params, e});
    r.cost.workspace_bytes = mul({2, n, e});  // dY and dX
    return r;
}

OpResult eval(const BatchNormOp& o, const std::vector<Shape>& in, u64 e) {
    const Shape& x = shaped_input(in, "batchnorm");
    const u64 channels = o.features != 0 ? o.features : x.front();
    if (x.front() != channels)
        fail(fmt::format("features {} does not match the input's {} channels (input shape {})", channels, x.front(),
                         to_string(x)));
    const u64 n = element_count(x);
    OpResult r;
    r.out_shape = x;
    r.cost.params = mul({2, channels});
    r.cost.out_bytes = mul({n, e});
    r.cost.saved_bytes = mul({n, e});
    r.cost.fwd_mem_bytes = mul({3, n, e});  // read for statistics, read to normalise, write
    r.cost.bwd_mem_bytes = mul({4, n, e});  // read dY and X for the reductions, again for dX, write dX
    r.cost.weight_bytes = mul({r.cost.params, e});
    r.cost.workspace_bytes = mul({2, n, e});  // dY and dX
    return r;
}

OpResult eval(const ElementwiseOp& o, const std::vector<Shape>& in, u64 e) {
    const Shape& x = shaped_input(in, op_name(OpParams{o}));
    const u64 n = element_count(x);
    OpResult r;
    r.out_shape = x;
    r.cost.out_bytes = mul({n, e});
    if (o.kind == Elementwise::dropout) {
        r.cost.saved_bytes = n;  // one byte of mask per element
        r.cost.fwd_mem_bytes = sum({mul({2, n, e}), n});
        r.cost.bwd_mem_bytes = sum({mul({2, n, e}), n});
    } else {
        r.cost.saved_bytes = mul({n, e});  // relu keeps its output, gelu and silu their input
        r.cost.fwd_mem_bytes = mul({2, n, e});
        r.cost.bwd_mem_bytes = mul({3, n, e});
    }
    r.cost.workspace_bytes = mul({2, n, e});  // dY and dX
    return r;
}

void check_attention(const AttentionOp& o) {
    if (o.heads == 0 || o.kv_heads == 0 || o.head_dim == 0) fail("heads, kv_heads and head_dim must be positive");
    if (o.heads % o.kv_heads != 0)
        fail(fmt::format("heads {} is not a multiple of kv_heads {}", o.heads, o.kv_heads));
}

Shape sequence_input(const std::vector<Shape>& in, std::string_view op, u64 hidden, u64 seq_len) {
    const Shape& x = shaped_input(in, op);
    if (x.size() != 2)
        fail(fmt::format("{} needs an input of shape [seq_len, hidden], got {}", op, to_string(x)));
    require_last_dim(x, hidden, "hidden");
    if (seq_len != 0 && seq_len != x[0])
        fail(fmt::format("seq_len {} does not match the input's {} positions (input shape {})", seq_len, x[0],
                         to_string(x)));
    return x;
}

/// What attention's backward holds beyond its output's gradient: dO, the probabilities'
/// gradient, dQ, dK, dV (its heads') and dX (whole); fused, no probabilities' gradient.
u64 attention_backward_inner(const AttentionOp& o, u64 s, u64 e, u64 tp, bool fused) {
    const u64 q = mul({o.heads, o.head_dim}), kv = mul({o.kv_heads, o.head_dim});
    return sum({mul({s, sum({mul({2, per_rank(q, tp)}), mul({2, per_rank(kv, tp)}), o.hidden}), e}),
                fused ? 0 : mul({per_rank(o.heads, tp), s, s, e})});
}
/// dY and the above.
u64 attention_workspace(const AttentionOp& o, u64 s, u64 e, u64 tp, bool fused) {
    return sum({mul({s, o.hidden, e}), attention_backward_inner(o, s, e, tp, fused)});
}

/// What an MLP's backward holds beyond its output's gradient, for t tokens: the inner
/// gradient(s) and dX; a mixture of experts also the slots' gradients (k per token) by token and
/// by slot, the router's logit gradients, the routing (int32 slot indices both ways, fp32
/// weights and weight gradients: 16 bytes per slot), and one expert's inner gradients for at
/// most every token.
u64 mlp_backward_inner(const MlpOp& o, u64 t, u64 e, u64 tp) {
    const u64 h = o.hidden, f = per_rank(o.ffn_hidden, tp);
    const u64 inner = sum({o.kind == MlpKind::gated ? mul({3, f}) : f, h});  // dH (dGate, dUp), dX
    if (o.experts <= 1) return mul({t, inner, e});
    const u64 k = o.experts_per_token;
    return sum({mul({t, sum({mul({2, k, h}), o.experts, h, inner}), e}), mul({16, t, k})});
}
/// dY and the above.
u64 mlp_workspace(const MlpOp& o, u64 t, u64 e, u64 tp) { return sum({mul({t, o.hidden, e}), mlp_backward_inner(o, t, e, tp)}); }

/// dY and, at its fullest, the MLP's inner gradients; or, while attention's backward runs, the
/// MLP's dX and the second norm's next to attention's own; or the first norm's (4 x dY-sized).
u64 block_workspace(const TransformerBlockOp& o, u64 s, u64 e, u64 tp, bool fused) {
    const u64 n = mul({s, o.attention.hidden});
    const u64 attention = sum({mul({2, n, e}), attention_backward_inner(o.attention, s, e, tp, fused)});
    return sum({mul({n, e}), std::max({mlp_backward_inner(o.mlp, s, e, tp), attention, mul({4, n, e})})});
}

OpResult eval(const AttentionOp& o, const std::vector<Shape>& in, u64 e) {
    check_attention(o);
    const Shape x = sequence_input(in, "attention", o.hidden, o.seq_len);
    const u64 s = x[0];
    const u64 h = o.hidden;
    const u64 q = mul({o.heads, o.head_dim});
    const u64 kv = mul({o.kv_heads, o.head_dim});
    const u64 qkv = sum({q, mul({2, kv})});
    OpResult r;
    r.out_shape = x;
    r.cost.params = sum({mul({h, qkv}), mul({q, h}), o.qkv_bias ? qkv : 0, o.bias ? h : 0});
    // QKV projection, Q K^T and P V over the full s x s score matrix (Megatron-LM's count,
    // causal masking not subtracted), output projection.
    r.cost.fwd_flops = sum({mul({2, s, h, qkv}), mul({4, s, s, q}), mul({2, s, q, h})});
    r.cost.bwd_flops = mul({2, r.cost.fwd_flops});
    r.cost.out_bytes = mul({s, h, e});
    // Materialised, as dpart run computes attention (and Megatron-LM without flash attention):
    // X, Q, K, V, the attention output and the s x s probabilities of each head.
    r.cost.saved_bytes = sum({mul({s, sum({h, qkv, q}), e}), mul({o.heads, s, s, e})});
    r.cost.tp_saved_bytes = r.cost.saved_bytes - mul({s, h, e});  // each rank its heads' (X whole)
    r.cost.fwd_mem_bytes = mul({s, sum({h, mul({2, qkv}), mul({2, q}), h}), e});
    r.cost.bwd_mem_bytes = mul({2, r.cost.fwd_mem_bytes});
    r.cost.weight_bytes = mul({r.cost.params, e});
    r.cost.workspace_bytes = attention_workspace(o, s, e, 1, false);
    r.cost.fused_saved_less = mul({o.heads, s, s, e}) - std::min(mul({o.heads, s, s, e}), mul({s, o.heads, 4}));
    r.cost.fused_workspace_less = r.cost.workspace_bytes - attention_workspace(o, s, e, 1, true);
    return r;
}

void check_experts(const MlpOp& o) {
    if (o.experts == 0 || o.experts_per_token == 0) fail("experts and experts_per_token must be positive");
    if (o.experts_per_token > o.experts)
        fail(fmt::format("experts_per_token {} exceeds the {} experts", o.experts_per_token, o.experts));
}

OpResult eval(const MlpOp& o, const std::vector<Shape>& in, u64 e) {
    check_experts(o);
    const Shape& x = shaped_input(in, "mlp");
    require_last_dim(x, o.hidden, "hidden");
    const u64 t = leading_count(x);
    const u64 h = o.hidden;
    const u64 f = o.ffn_hidden;
    const bool gated = o.kind == MlpKind::gated;
    const u64 matrices = gated ? 3 : 2;
    // A mixture of experts runs k = experts_per_token experts per token, after a router.
    const bool moe = o.experts > 1;
    const u64 k = o.experts_per_token;
    const u64 expert_params = sum({mul({matrices, h, f}), o.bias ? sum({mul({matrices - 1, f}), h}) : 0});
    OpResult r;
    r.out_shape = x;
    r.cost.params = sum({mul({o.experts, expert_params}), moe ? mul({h, o.experts}) : 0});
    r.cost.fwd_flops = sum({mul({2, k, matrices, t, h, f}), moe ? mul({2, t, h, o.experts}) : 0});
    r.cost.bwd_flops = mul({2, r.cost.fwd_flops});
    r.cost.out_bytes = mul({t, h, e});
    // Plain: X, the activation's input and its output. Gated: X, gate, up and their product;
    // per active expert. A router adds its logits and keeps each token's k dispatched copies and
    // the k expert outputs (what the combine's and the router's gradients read).
    r.cost.saved_bytes = mul({t, sum({h, mul({k, matrices, f}), moe ? sum({o.experts, mul({2, k, h})}) : 0}), e});
    r.cost.tp_saved_bytes = mul({t, k, matrices, f, e});  // each rank its inner units' (X, routing whole)
    // Each active expert reads its tokens and writes its output; a router writes its logits,
    // dispatches k copies of every token and combines k outputs.
    const u64 routing = moe ? sum({o.experts, mul({2, k, h})}) : 0;
    r.cost.fwd_mem_bytes = mul({t, sum({mul({2, k, h}), mul({2 * matrices, k, f}), routing}), e});
    r.cost.bwd_mem_bytes = mul({2, r.cost.fwd_mem_bytes});
    // With more than a handful of tokens per microbatch every expert is hit: all weights are read.
    r.cost.weight_bytes = mul({r.cost.params, e});
    r.cost.workspace_bytes = mlp_workspace(o, t, e, 1);
    return r;
}

OpResult eval(const TransformerBlockOp& o, const std::vector<Shape>& in, u64 e) {
    const Shape x = sequence_input(in, "transformer_block", o.attention.hidden, o.attention.seq_len);
    if (o.mlp.hidden != o.attention.hidden) fail("the block's attention and MLP disagree on hidden");
    const std::vector<Shape> xs{x};
    const NormOp norm{o.norm, o.attention.hidden, o.norm_bias};
    const OpResult n1 = eval(norm, xs, e);
    const OpResult attn = eval(o.attention, xs, e);
    const OpResult mlp = eval(o.mlp, xs, e);
    OpResult r;
    r.out_shape = x;
    r.cost = n1.cost + attn.cost + n1.cost + mlp.cost;
    const u64 n = element_count(x);
    r.cost.out_bytes = mul({n, e});
    // Two residual additions: each reads two tensors and writes one, forward and backward.
    r.cost.fwd_mem_bytes = sum({r.cost.fwd_mem_bytes, mul({6, n, e})});
    r.cost.bwd_mem_bytes = sum({r.cost.bwd_mem_bytes, mul({6, n, e})});
    r.cost.workspace_bytes = block_workspace(o, x[0], e, 1, false);
    r.cost.fused_workspace_less = r.cost.workspace_bytes - block_workspace(o, x[0], e, 1, true);
    return r;
}

u64 window_output(u64 size, u64 kernel, u64 stride, u64 padding, std::string_view what) {
    const u64 padded = sum({size, mul({2, padding})});
    if (kernel > padded)
        fail(fmt::format("kernel {} is larger than the padded input {} ({} {} + 2 x padding {})", kernel, padded, what,
                         size, padding));
    if (stride == 0) fail("stride must be positive");
    return (padded - kernel) / stride + 1;
}

Shape image_input(const std::vector<Shape>& in, std::string_view op) {
    const Shape& x = shaped_input(in, op);
    if (x.size() != 3) fail(fmt::format("{} needs an input of shape [channels, height, width], got {}", op, to_string(x)));
    return x;
}

OpResult eval(const Conv2dOp& o, const std::vector<Shape>& in, u64 e) {
    const Shape x = image_input(in, "conv2d");
    if (x[0] != o.in_channels)
        fail(fmt::format("in_channels {} does not match the input's {} channels (input shape {})", o.in_channels,
                         x[0], to_string(x)));
    if (o.groups == 0 || o.in_channels % o.groups != 0 || o.out_channels % o.groups != 0)
        fail(fmt::format("groups {} must divide in_channels {} and out_channels {}", o.groups, o.in_channels,
                         o.out_channels));
    const u64 oh = window_output(x[1], o.kernel_h, o.stride, o.padding, "height");
    const u64 ow = window_output(x[2], o.kernel_w, o.stride, o.padding, "width");
    const u64 macs_per_output = mul({o.in_channels / o.groups, o.kernel_h, o.kernel_w});
    const u64 out_elems = mul({o.out_channels, oh, ow});
    const u64 in_elems = element_count(x);
    OpResult r;
    r.out_shape = {o.out_channels, oh, ow};
    r.cost.params = sum({mul({o.out_channels, macs_per_output}), o.bias ? o.out_channels : 0});
    r.cost.fwd_flops = mul({2, out_elems, macs_per_output});
    r.cost.bwd_flops = mul({2, r.cost.fwd_flops});
    r.cost.out_bytes = mul({out_elems, e});
    r.cost.saved_bytes = mul({in_elems, e});
    r.cost.fwd_mem_bytes = mul({sum({in_elems, out_elems}), e});
    r.cost.bwd_mem_bytes = mul({2, r.cost.fwd_mem_bytes});
    r.cost.weight_bytes = mul({r.cost.params, e});
    // dY, dX and, on the host ops, the lowered input and its gradient (im2col's columns: one
    // row per weight of a group, one column per output position); cuDNN sizes its own.
    r.cost.workspace_bytes = mul({sum({in_elems, out_elems, mul({2, macs_per_output, oh, ow})}), e});
    return r;
}

OpResult eval(const PoolOp& o, const std::vector<Shape>& in, u64 e) {
    const Shape x = image_input(in, "pool");
    OpResult r;
    if (o.global) {
        r.out_shape = {x[0], 1, 1};
    } else {
        if (o.kernel == 0) fail("kernel must be positive");
        r.out_shape = {x[0], window_output(x[1], o.kernel, o.stride, o.padding, "height"),
                       window_output(x[2], o.kernel, o.stride, o.padding, "width")};
    }
    const u64 in_elems = element_count(x);
    const u64 out_elems = element_count(r.out_shape);
    const bool max = o.kind == PoolKind::max;
    r.cost.out_bytes = mul({out_elems, e});
    r.cost.saved_bytes = max ? mul({in_elems, e}) : 0;  // max pooling keeps its input to route gradients
    r.cost.fwd_mem_bytes = mul({sum({in_elems, out_elems}), e});
    r.cost.bwd_mem_bytes = mul({sum({max ? mul({2, in_elems}) : in_elems, out_elems}), e});
    r.cost.workspace_bytes = mul({sum({in_elems, out_elems}), e});  // dY and dX
    return r;
}

OpResult eval(const FlattenOp&, const std::vector<Shape>& in, u64 e) {
    const Shape& x = shaped_input(in, "flatten");
    OpResult r;
    r.out_shape = {element_count(x)};
    r.cost.out_bytes = mul({r.out_shape[0], e});  // a view: no traffic
    r.cost.workspace_bytes = mul({2, r.out_shape[0], e});  // dY and dX
    return r;
}

OpResult eval(const AddOp&, const std::vector<Shape>& in, u64 e) {
    if (in.size() < 2) fail(fmt::format("add needs at least two inputs, got {}", in.size()));
    for (std::size_t i = 0; i < in.size(); ++i) {
        if (in[i].empty()) fail("add cannot read an input of unknown shape (a custom layer without out_shape)");
        if (in[i] != in[0])
            fail(fmt::format("input {} has shape {} but input 1 has {}: add needs equal shapes", i + 1,
                             to_string(in[i]), to_string(in[0])));
    }
    const u64 n = element_count(in[0]);
    const u64 k = in.size();
    OpResult r;
    r.out_shape = in[0];
    r.cost.out_bytes = mul({n, e});
    r.cost.fwd_mem_bytes = mul({k + 1, n, e});
    r.cost.bwd_mem_bytes = mul({k + 1, n, e});
    r.cost.workspace_bytes = mul({k + 1, n, e});  // dY and each input's gradient
    return r;
}

OpResult eval(const ConcatOp& o, const std::vector<Shape>& in, u64 e) {
    if (in.size() < 2) fail(fmt::format("concat needs at least two inputs, got {}", in.size()));
    const Shape& first = in[0];
    if (first.empty()) fail("concat cannot read an input of unknown shape (a custom layer without out_shape)");
    if (o.axis >= first.size())
        fail(fmt::format("axis {} is out of range for inputs of rank {}", o.axis, first.size()));
    Shape out = first;
    out[o.axis] = 0;
    for (std::size_t i = 0; i < in.size(); ++i) {
        const Shape& s = in[i];
        bool compatible = s.size() == first.size();
        for (std::size_t d = 0; compatible && d < s.size(); ++d) compatible = d == o.axis || s[d] == first[d];
        if (!compatible)
            fail(fmt::format("input {} has shape {}, which cannot be joined with {} along axis {}", i + 1,
                             to_string(s), to_string(first), o.axis));
        out[o.axis] = sum({out[o.axis], s[o.axis]});
    }
    const u64 n = element_count(out);
    OpResult r;
    r.out_shape = out;
    r.cost.out_bytes = mul({n, e});
    r.cost.fwd_mem_bytes = mul({2, n, e});
    r.cost.bwd_mem_bytes = mul({2, n, e});
    r.cost.workspace_bytes = mul({2, n, e});  // dY and the inputs' gradients
    return r;
}

OpResult eval(const SoftmaxXentOp& o, const std::vector<Shape>& in, u64 e) {
    const Shape& x = shaped_input(in, "softmax_xent");
    const u64 classes = o.classes != 0 ? o.classes : x.back();
    require_last_dim(x, classes, "classes");
    const u64 rows = leading_count(x);
    const u64 logits = element_count(x);
    OpResult r;
    r.out_shape = {1};
    r.cost.out_bytes = 4;                                          // the fp32 loss
    r.cost.saved_bytes = sum({mul({logits, e}), mul({rows, 4})});  // logits and int32 labels
    r.cost.tp_saved_bytes = mul({logits, e});  // vocabulary-parallel: each rank its classes' logits
    r.cost.fwd_mem_bytes = sum({mul({logits, e}), mul({rows, 4})});
    r.cost.bwd_mem_bytes = sum({mul({2, logits, e}), mul({rows, 4})});
    r.cost.workspace_bytes = sum({4, mul({logits, e})});  // dLoss and the logits' gradient
    return r;
}

OpResult eval(const CustomOp& o, const std::vector<Shape>&, u64 e) {
    OpResult r;
    r.out_shape = o.out_shape;
    r.cost.params = o.params;
    r.cost.fwd_flops = o.fwd_flops;
    r.cost.bwd_flops = o.bwd_flops;
    r.cost.out_bytes = o.out_bytes;
    r.cost.saved_bytes = o.saved_bytes;
    r.cost.fwd_mem_bytes = o.fwd_mem_bytes;
    r.cost.bwd_mem_bytes = o.bwd_mem_bytes;
    r.cost.weight_bytes = mul({o.params, e});
    r.cost.workspace_bytes = o.workspace_bytes;
    if (!o.out_shape.empty() && mul({element_count(o.out_shape), e}) != o.out_bytes)
        fail(fmt::format("out_bytes {} does not match out_shape {} at {} bytes per element", o.out_bytes,
                         to_string(o.out_shape), e));
    return r;
}

}  // namespace

OpResult evaluate(const OpParams& op, const std::vector<Shape>& inputs, DType dtype) {
    const u64 e = dtype_bytes(dtype);
    return std::visit([&](const auto& o) { return eval(o, inputs, e); }, op);
}

Shape implied_input_shape(const OpParams& op) {
    if (const auto* linear = std::get_if<LinearOp>(&op)) return {linear->in_features};
    if (const auto* embedding = std::get_if<EmbeddingOp>(&op))
        return embedding->seq_len != 0 ? Shape{embedding->seq_len} : Shape{};
    if (const auto* attention = std::get_if<AttentionOp>(&op))
        return attention->seq_len != 0 ? Shape{attention->seq_len, attention->hidden} : Shape{};
    if (const auto* block = std::get_if<TransformerBlockOp>(&op))
        return block->attention.seq_len != 0 ? Shape{block->attention.seq_len, block->attention.hidden} : Shape{};
    if (const auto* norm = std::get_if<NormOp>(&op)) return norm->features != 0 ? Shape{norm->features} : Shape{};
    return {};
}

std::optional<std::uint64_t> split_workspace_bytes(const OpParams& op, const Shape& out_shape, DType dtype,
                                                   std::uint32_t tp, bool fused) {
    const u64 e = dtype_bytes(dtype);
    const u64 t = tp == 0 ? 1 : tp;
    if (out_shape.empty()) return std::nullopt;
    const u64 n = element_count(out_shape);
    if (const auto* l = std::get_if<LinearOp>(&op)) return linear_workspace(*l, n / l->out_features, e, t);
    if (const auto* a = std::get_if<AttentionOp>(&op)) return attention_workspace(*a, out_shape.front(), e, t, fused);
    if (const auto* m = std::get_if<MlpOp>(&op)) return mlp_workspace(*m, n / m->hidden, e, t);
    if (const auto* b = std::get_if<TransformerBlockOp>(&op)) return block_workspace(*b, out_shape.front(), e, t, fused);
    return std::nullopt;
}

}  // namespace dpart
