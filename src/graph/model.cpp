#include "dpart/graph/model.hpp"

#include <fmt/format.h>

#include <functional>
#include <unordered_map>

#include "dpart/core/checked.hpp"
#include "dpart/core/strings.hpp"
#include "dpart/graph/ops.hpp"

namespace dpart {

LayerCost Model::total() const {
    LayerCost t;
    for (const Layer& l : layers) t = t + l.cost;
    return t;
}

std::optional<std::size_t> Model::find(const std::string& layer_name) const {
    for (std::size_t i = 0; i < layers.size(); ++i)
        if (layers[i].name == layer_name) return i;
    return std::nullopt;
}

namespace {

using NameIndex = std::unordered_map<std::string, std::size_t>;

std::vector<std::string> layer_names(const ModelSpec& spec) {
    std::vector<std::string> names;
    names.reserve(spec.layers.size());
    for (const auto& l : spec.layers) names.push_back(l.name);
    return names;
}

/// Follows input edges (including references to later layers) from `start` looking for a path
/// back to it; returns the cycle's names, or empty.
std::vector<std::string> find_cycle(const std::vector<std::vector<std::size_t>>& inputs, const ModelSpec& spec,
                                    std::size_t start) {
    std::vector<int> state(inputs.size(), 0);  // 0 new, 1 on stack, 2 done
    std::vector<std::size_t> stack;
    std::vector<std::string> cycle;
    std::function<bool(std::size_t)> visit = [&](std::size_t v) {
        state[v] = 1;
        stack.push_back(v);
        for (std::size_t u : inputs[v]) {
            if (u == start) {
                // The stack follows inputs (against the data flow): reverse it.
                cycle.push_back(spec.layers[start].name);
                for (auto it = stack.rbegin(); it != stack.rend(); ++it) cycle.push_back(spec.layers[*it].name);
                return true;
            }
            if (state[u] == 0 && visit(u)) return true;
        }
        stack.pop_back();
        state[v] = 2;
        return false;
    };
    visit(start);
    // Reported in data-flow order: each layer feeds the next.
    return cycle;
}

std::vector<std::vector<std::size_t>> resolve_inputs(const ModelSpec& spec, const NameIndex& index) {
    const std::size_t n = spec.layers.size();
    std::vector<std::vector<std::size_t>> inputs(n);
    struct Forward {
        std::size_t layer, input, target;
    };
    std::vector<Forward> forward;
    for (std::size_t i = 0; i < n; ++i) {
        const LayerSpec& l = spec.layers[i];
        if (!l.inputs) {
            if (i > 0) inputs[i] = {i - 1};
            continue;
        }
        if (l.inputs->empty())
            throw InputError(l.where, fmt::format("layer \"{}\": inputs must name at least one layer", l.name));
        for (std::size_t k = 0; k < l.inputs->size(); ++k) {
            const std::string& ref = (*l.inputs)[k];
            const SourceLocation& at = k < l.input_where.size() ? l.input_where[k] : l.where;
            auto it = index.find(ref);
            if (it == index.end())
                throw InputError(at, fmt::format("layer \"{}\": input \"{}\" names no layer{}", l.name, ref,
                                                 did_you_mean(ref, layer_names(spec))));
            if (it->second == i) throw InputError(at, fmt::format("layer \"{}\" lists itself as an input", l.name));
            for (std::size_t seen : inputs[i])
                if (seen == it->second)
                    throw InputError(at, fmt::format("layer \"{}\": input \"{}\" is listed twice", l.name, ref));
            if (it->second > i) forward.push_back({i, k, it->second});
            inputs[i].push_back(it->second);
        }
    }
    for (const Forward& f : forward) {
        const LayerSpec& l = spec.layers[f.layer];
        const SourceLocation& at = f.input < l.input_where.size() ? l.input_where[f.input] : l.where;
        const auto cycle = find_cycle(inputs, spec, f.layer);
        if (!cycle.empty())
            throw InputError(at, fmt::format("layer \"{}\": inputs form a cycle: {}", l.name, join(cycle, " -> ")));
    }
    if (!forward.empty()) {
        const Forward& f = forward.front();
        const LayerSpec& l = spec.layers[f.layer];
        const SourceLocation& at = f.input < l.input_where.size() ? l.input_where[f.input] : l.where;
        const LayerSpec& target = spec.layers[f.target];
        throw InputError(at, fmt::format("layer \"{}\": input \"{}\" is defined later (line {}); list every layer "
                                         "after the layers it reads (layer indices follow the file order)",
                                         l.name, target.name, target.where.line));
    }
    return inputs;
}

std::string input_context(const Model& m, const std::vector<std::size_t>& inputs) {
    if (inputs.empty()) return fmt::format("model input {}", to_string(m.input_shape));
    std::vector<std::string> names;
    for (std::size_t j : inputs) names.push_back('"' + m.layers[j].name + '"');
    return fmt::format("{} {}", inputs.size() == 1 ? "input" : "inputs", join(names));
}

void resolve_tie(const ModelSpec& spec, const NameIndex& index, std::size_t i, OpParams& op) {
    const LayerSpec& l = spec.layers[i];
    if (!l.tied_to) return;
    auto* linear = std::get_if<LinearOp>(&op);
    if (linear == nullptr)
        throw InputError(l.tied_where, fmt::format("layer \"{}\": tied_to applies to linear layers only", l.name));
    auto it = index.find(*l.tied_to);
    if (it == index.end())
        throw InputError(l.tied_where, fmt::format("layer \"{}\": tied_to \"{}\" names no layer{}", l.name,
                                                   *l.tied_to, did_you_mean(*l.tied_to, layer_names(spec))));
    const auto* embedding = std::get_if<EmbeddingOp>(&spec.layers[it->second].op);
    if (embedding == nullptr)
        throw InputError(l.tied_where,
                         fmt::format("layer \"{}\": tied_to \"{}\" must name an embedding layer", l.name, *l.tied_to));
    if (embedding->vocab != linear->out_features || embedding->hidden != linear->in_features || linear->bias)
        throw InputError(l.tied_where,
                         fmt::format("layer \"{}\": a linear {} -> {}{} cannot share the {} x {} table of \"{}\" (it "
                                     "needs in_features = hidden, out_features = vocab, bias = false)",
                                     l.name, linear->in_features, linear->out_features, linear->bias ? " with bias" : "",
                                     embedding->vocab, embedding->hidden, *l.tied_to));
    linear->tied_to = it->second;
}

}  // namespace

Model build_model(const ModelSpec& spec) {
    if (spec.layers.empty()) throw InputError(spec.where, "the model has no layers: add [[layer]] tables or a [transformer] table");
    Model m;
    m.name = spec.name;
    m.dtype = spec.dtype;
    m.global_batch = spec.global_batch;
    m.where = spec.where;
    m.measured = spec.measured;

    NameIndex index;
    for (std::size_t i = 0; i < spec.layers.size(); ++i) {
        const LayerSpec& l = spec.layers[i];
        auto [it, inserted] = index.emplace(l.name, i);
        if (!inserted)
            throw InputError(l.where, fmt::format("duplicate layer name \"{}\" (first defined at line {})", l.name,
                                                  spec.layers[it->second].where.line));
    }
    const auto inputs = resolve_inputs(spec, index);

    const LayerSpec& first = spec.layers.front();
    m.input_shape = spec.input_shape ? *spec.input_shape : implied_input_shape(first.op);
    if (m.input_shape.empty() && !std::holds_alternative<CustomOp>(first.op))
        throw InputError(first.where,
                         fmt::format("layer \"{}\": cannot tell the model's input shape from a first layer of op {}; "
                                     "give [model] input_shape{}",
                                     first.name, op_name(first.op),
                                     std::holds_alternative<EmbeddingOp>(first.op) ||
                                             std::holds_alternative<AttentionOp>(first.op) ||
                                             std::holds_alternative<TransformerBlockOp>(first.op)
                                         ? " or the layer's seq_len"
                                         : ""));

    m.layers.reserve(spec.layers.size());
    for (std::size_t i = 0; i < spec.layers.size(); ++i) {
        const LayerSpec& l = spec.layers[i];
        Layer layer;
        layer.name = l.name;
        layer.op = l.op;
        layer.inputs = inputs[i];
        layer.where = l.where;
        resolve_tie(spec, index, i, layer.op);
        if (const auto* custom = std::get_if<CustomOp>(&layer.op); custom && custom->measured && !spec.measured)
            throw InputError(l.where, fmt::format("layer \"{}\" gives measured times (fwd_ms, bwd_ms): say in a "
                                                  "[measured] table the batch they were measured at",
                                                  l.name));
        std::vector<Shape> in_shapes;
        if (layer.inputs.empty()) in_shapes.push_back(m.input_shape);
        for (std::size_t j : layer.inputs) in_shapes.push_back(m.layers[j].out_shape);
        try {
            OpResult r = evaluate(layer.op, in_shapes, m.dtype);
            layer.out_shape = std::move(r.out_shape);
            layer.cost = r.cost;
        } catch (const ShapeError& e) {
            throw InputError(l.where, fmt::format("layer \"{}\" ({}): {}", l.name, input_context(m, layer.inputs), e.what()));
        } catch (const OverflowError&) {
            throw InputError(l.where, fmt::format("layer \"{}\": its sizes overflow 64 bits (parameters, FLOPs or "
                                                  "bytes per sample)",
                                                  l.name));
        }
        m.layers.push_back(std::move(layer));
    }
    try {
        (void)m.total();
    } catch (const OverflowError&) {
        throw InputError(spec.where, "the model's total parameters, FLOPs or bytes per sample overflow 64 bits");
    }
    return m;
}

Model with_dtype(const Model& model, DType dtype) {
    if (dtype == model.dtype) return model;
    Model m = model;
    m.dtype = dtype;
    const std::uint64_t from = dtype_bytes(model.dtype), to = dtype_bytes(dtype);
    const auto scale = [&](std::uint64_t bytes) { return checked_mul(bytes, to) / from; };
    for (Layer& layer : m.layers) {
        if (std::holds_alternative<CustomOp>(layer.op)) {
            LayerCost& c = layer.cost;
            for (std::uint64_t* b : {&c.out_bytes, &c.saved_bytes, &c.fwd_mem_bytes, &c.bwd_mem_bytes,
                                     &c.workspace_bytes, &c.tp_saved_bytes, &c.fused_saved_less, &c.fused_workspace_less})
                *b = scale(*b);
            c.weight_bytes = checked_mul(c.params, to);
            continue;
        }
        std::vector<Shape> in_shapes;
        if (layer.inputs.empty()) in_shapes.push_back(m.input_shape);
        for (std::size_t j : layer.inputs) in_shapes.push_back(m.layers[j].out_shape);
        layer.cost = evaluate(layer.op, in_shapes, dtype).cost;
    }
    return m;
}

const Model& in_dtype(const Model& model, DType dtype, std::optional<Model>& storage) {
    if (dtype == model.dtype) return model;
    storage = with_dtype(model, dtype);
    return *storage;
}

}  // namespace dpart
