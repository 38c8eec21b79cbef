#include "dpart/cost/cost_model.hpp"

#include "dpart/graph/ops.hpp"

#include <algorithm>
#include <limits>
#include <map>
#include <tuple>

namespace dpart {

bool tp_splits(const OpParams& op, bool vocab_parallel) noexcept {
    // A linear layer tied to an embedding is not split: each rank holds the whole head (the kernels').
    // With vocab_parallel a tied head is split by vocabulary rows, as its embedding is (Megatron-LM).
    if (const auto* l = std::get_if<LinearOp>(&op)) return !l->tied_to || vocab_parallel;
    return std::holds_alternative<TransformerBlockOp>(op) || std::holds_alternative<AttentionOp>(op) ||
           std::holds_alternative<MlpOp>(op) ||
           (vocab_parallel && (std::holds_alternative<EmbeddingOp>(op) || std::holds_alternative<SoftmaxXentOp>(op)));
}

bool tp_divides(const OpParams& op, std::uint32_t tp) noexcept {
    if (tp <= 1) return true;
    if (const auto* l = std::get_if<LinearOp>(&op)) return l->tied_to.has_value() || l->out_features % tp == 0;
    if (const auto* a = std::get_if<AttentionOp>(&op)) return a->heads % tp == 0 && a->kv_heads % tp == 0;
    if (const auto* m = std::get_if<MlpOp>(&op)) return m->ffn_hidden % tp == 0;
    if (const auto* b = std::get_if<TransformerBlockOp>(&op))
        return b->attention.heads % tp == 0 && b->attention.kv_heads % tp == 0 && b->mlp.ffn_hidden % tp == 0;
    return true;
}

std::uint64_t saved_per_rank(const Layer& layer, std::uint32_t tp, bool fused_attention, bool vocab_parallel) noexcept {
    const LayerCost& c = layer.cost;
    const std::uint64_t less = fused_attention ? c.fused_saved_less : 0;  // within tp_saved_bytes
    if (tp <= 1 || !tp_splits(layer.op, vocab_parallel)) return c.saved_bytes - less;
    const std::uint64_t split = c.tp_saved_bytes - less;
    return c.saved_bytes - c.tp_saved_bytes + (split + tp - 1) / tp;
}

CostOptions run_state_options(CostOptions base, DType compute) noexcept {
    const bool bf16 = compute != DType::fp32;
    base.bytes_per_param = bf16 ? 18 : 16;
    base.replicated_bytes_per_param = bf16 ? 10 : 8;
    base.gradient_bytes = 4;
    return base;
}

std::uint64_t gradient_value_bytes(const CostOptions& o, DType dtype) {
    return o.gradient_bytes != 0 ? o.gradient_bytes : dtype_bytes(dtype);
}

std::uint64_t workspace_per_rank(const Layer& layer, DType dtype, std::uint32_t tp, bool fused_attention,
                                 bool vocab_parallel) {
    const std::uint64_t whole = layer.cost.workspace_bytes - (fused_attention ? layer.cost.fused_workspace_less : 0);
    if (tp <= 1 || !tp_splits(layer.op, vocab_parallel)) return whole;
    // A vocabulary-parallel loss: each rank its columns of the logits' gradient (dLoss whole).
    if (std::holds_alternative<SoftmaxXentOp>(layer.op)) return 4 + ((whole > 4 ? whole - 4 : 0) + tp - 1) / tp;
    return split_workspace_bytes(layer.op, layer.out_shape, dtype, tp, fused_attention).value_or(whole);
}

TpCollectives tp_collectives(const OpParams& op) noexcept {
    // Megatron-LM: a block all-reduces its activation after attention and after the MLP, in
    // forward and again in backward; a standalone attention or MLP (a column- then row-parallel
    // pair) once each way; a vocabulary-parallel embedding once in forward; a column-parallel
    // linear gathers its output once in forward and reduces its input gradient once in backward.
    // A mixture of experts sums each expert's output over the group: k times the output's
    // bytes per token, in as many calls as experts are hit (all E, with more than a handful of
    // tokens), after one all-gather of the router's logits in forward.
    const auto mlp_collectives = [](const MlpOp& m) -> TpCollectives {
        if (m.experts <= 1) return {1, 1, 1, 1};
        const auto k = static_cast<std::uint32_t>(m.experts_per_token);
        const auto e = static_cast<std::uint32_t>(std::min<std::uint64_t>(m.experts, 1u << 20));
        return {k, k, e + 1, e};
    };
    if (const auto* b = std::get_if<TransformerBlockOp>(&op)) {
        const TpCollectives m = mlp_collectives(b->mlp);
        return {1 + m.forward, 1 + m.backward, 1 + m.forward_calls, 1 + m.backward_calls};
    }
    if (const auto* m = std::get_if<MlpOp>(&op)) return mlp_collectives(*m);
    if (std::holds_alternative<AttentionOp>(op)) return {1, 1, 1, 1};
    if (std::holds_alternative<EmbeddingOp>(op)) return {1, 0, 1, 0};
    if (std::holds_alternative<LinearOp>(op)) return {1, 1, 1, 1};
    return {0, 0};  // the vocabulary-parallel loss reduces only per-row scalars: negligible
}

AllreduceCost ring_allreduce(std::size_t n, const LinkSpec& link) noexcept {
    if (n <= 1) return {};
    const double steps = 2.0 * static_cast<double>(n - 1);
    return {steps * link.latency_us * 1e-6, steps / static_cast<double>(n) / (link.gbs * 1e9)};
}

AnalyticalCostModel::AnalyticalCostModel(const Model& model, const Cluster& cluster, CostOptions options)
    : model_(model), cluster_(cluster), options_(options) {
    // Devices with the same figures on nodes with the same intra-node link behave alike.
    std::map<std::tuple<double, double, bool, double, double>, std::size_t> classes;
    device_class_.reserve(cluster.devices.size());
    for (std::size_t d = 0; d < cluster.devices.size(); ++d) {
        const LinkSpec link = tp_link(d);
        const auto key = std::make_tuple(cluster.devices[d].tflops_for(model.dtype), cluster.devices[d].mem_bw_gbs,
                                         cluster.devices[d].overlaps_memory, link.gbs, link.latency_us);
        device_class_.push_back(classes.emplace(key, classes.size()).first->second);
    }
}

LinkSpec AnalyticalCostModel::tp_link(std::size_t device) const {
    const Node& node = cluster_.nodes[cluster_.devices[device].node];
    if (node.devices.size() < 2) return LinkSpec{std::numeric_limits<double>::infinity(), 0};
    const std::size_t other = node.devices[0] == device ? node.devices[1] : node.devices[0];
    return cluster_.link(device, other);
}

double AnalyticalCostModel::layer_seconds(std::size_t layer, Pass pass, std::size_t device, std::uint64_t samples,
                                          std::uint32_t tp) const {
    const Layer& l = model_.layers.at(layer);
    const Device& dev = cluster_.devices.at(device);
    if (const auto* custom = std::get_if<CustomOp>(&l.op); custom != nullptr && custom->measured) {
        // A measured time, for measured->batch samples on the reference device: linear in the
        // samples, and inversely proportional to the device's matmul rate when the reference's is known.
        const MeasuredAt& at = *model_.measured;
        const double ms = pass == Pass::forward ? custom->fwd_ms : custom->bwd_ms;
        double seconds = ms * 1e-3 * static_cast<double>(samples) / static_cast<double>(at.batch);
        if (at.tflops > 0) seconds *= at.tflops / dev.tflops_for(model_.dtype);
        return seconds;
    }
    const bool split = tp > 1 && tp_splits(l.op, options_.vocab_parallel);
    const double share = split ? 1.0 / tp : 1.0;
    const double b = static_cast<double>(samples);
    const bool fwd = pass == Pass::forward;
    const double flops = static_cast<double>(fwd ? l.cost.fwd_flops : l.cost.bwd_flops) * b * share;
    // Backward reads the weights and writes their gradient: twice the forward's weight traffic.
    const double weights = static_cast<double>(l.cost.weight_bytes) * (fwd ? 1.0 : 2.0) * share;
    const double activations = static_cast<double>(fwd ? l.cost.fwd_mem_bytes : l.cost.bwd_mem_bytes) * b * share;
    const double compute = flops / (dev.tflops_for(model_.dtype) * 1e12);
    const double memory = (weights + activations) / (dev.mem_bw_gbs * 1e9);
    double seconds = dev.overlaps_memory ? std::max(compute, memory) : compute + memory;
    if (split) {
        const TpCollectives c = tp_collectives(l.op);
        const std::uint32_t count = fwd ? c.forward : c.backward;
        const std::uint32_t calls = fwd ? c.forward_calls : c.backward_calls;
        const double bytes = static_cast<double>(l.cost.out_bytes) * b;
        if (count > 0 && bytes > 0) {
            const AllreduceCost ring = ring_allreduce(tp, tp_link(device));
            seconds += count * ring.per_byte * bytes + calls * ring.fixed;
        }
    }
    return seconds;
}

double AnalyticalCostModel::device_speed(std::size_t device) const {
    return cluster_.devices.at(device).tflops_for(model_.dtype);
}

double AnalyticalCostModel::transfer_seconds(std::size_t a, std::size_t b, std::uint64_t bytes) const {
    if (a == b) return 0;
    return dpart::transfer_seconds(cluster_.link(a, b), bytes);
}

AllreduceCost AnalyticalCostModel::allreduce_cost(const std::vector<std::size_t>& devices) const {
    if (devices.size() <= 1) return {};
    if (cluster_.overrides.empty() && cluster_.node_overrides.empty() && cluster_.inter_default) {
        // Without per-pair overrides a hop's link follows from the two devices' nodes alone.
        LinkSpec slowest{std::numeric_limits<double>::infinity(), 0};
        auto take = [&](const LinkSpec& l) {
            slowest.gbs = std::min(slowest.gbs, l.gbs);
            slowest.latency_us = std::max(slowest.latency_us, l.latency_us);
        };
        bool crosses = false;
        std::size_t last_intra_node = SIZE_MAX;
        for (std::size_t i = 0; i < devices.size(); ++i) {
            const std::size_t a = devices[i], b = devices[(i + 1) % devices.size()];
            if (a == b) continue;
            const std::size_t na = cluster_.devices[a].node, nb = cluster_.devices[b].node;
            if (na != nb) crosses = true;
            else if (na != last_intra_node) {
                take(cluster_.link(a, b));
                last_intra_node = na;
            }
        }
        if (crosses) take(*cluster_.inter_default);
        return ring_allreduce(devices.size(), slowest);
    }
    // A ring runs at the pace of its slowest hop.
    LinkSpec slowest{std::numeric_limits<double>::infinity(), 0};
    for (std::size_t i = 0; i < devices.size(); ++i) {
        const std::size_t a = devices[i], b = devices[(i + 1) % devices.size()];
        if (a == b) continue;
        const LinkSpec l = cluster_.link(a, b);
        if (l.gbs < slowest.gbs) slowest.gbs = l.gbs;
        slowest.latency_us = std::max(slowest.latency_us, l.latency_us);
    }
    return ring_allreduce(devices.size(), slowest);
}

double AnalyticalCostModel::optimizer_seconds(std::size_t device, std::uint64_t params) const {
    // The step reads and writes the whole training state once.
    const double bytes = 2.0 * static_cast<double>(params) * static_cast<double>(options_.bytes_per_param);
    return bytes / (cluster_.devices.at(device).mem_bw_gbs * 1e9);
}

}  // namespace dpart
