// dpart profile --model on a device: per-layer forward and backward times with the device layers.
#include <algorithm>
#include <chrono>
#include <map>

#include "dpart/core/error.hpp"
#include "dpart/profile/gpu.hpp"
#include "dpart/profile/layers.hpp"
#include "dpart/runtime/backend.hpp"
#include "dpart/runtime/stage_compute.hpp"

namespace dpart::profile {
namespace {

using Clock = std::chrono::steady_clock;

/// A layer's parameters on the device: the fp32 master and the compute copy, and its gradients.
struct Layer {
    std::unique_ptr<rt::DeviceLayer> layer;
    rt::DeviceBuffer master, compute, grads;
    [[nodiscard]] rt::DeviceParams params() const {
        return {master.span(), compute.count() > 0 ? compute.span() : master.span()};
    }
};

}  // namespace

LayerTimes time_device_layers(const Model& model, const std::vector<std::uint64_t>& sizes, int repeats,
                              const std::string& kind, rt::DeviceOps& ops, rt::Elem compute, std::uint64_t seed) {
    const std::size_t L = model.layers.size();
    std::vector<Layer> layers(L);
    for (std::size_t l = 0; l < L; ++l) {
        Layer& d = layers[l];
        d.layer = rt::make_device_layer(model, l, compute);
        // The CPU kernel's initial values (the same layout; make_device_layer checked the op).
        const auto kernel = rt::make_cpu_kernel(model, l);
        std::vector<float> values(kernel->full_params());
        kernel->init(seed, values);
        d.master = rt::DeviceBuffer(ops, values.size(), rt::Elem::f32);
        ops.upload(values, d.master.span());
        if (compute != rt::Elem::f32) {
            d.compute = rt::DeviceBuffer(ops, values.size(), compute, rt::DeviceBuffer::uninitialized);
            ops.copy(d.master.span(), d.compute.span());
        }
        d.grads = rt::DeviceBuffer(ops, values.size(), rt::Elem::f32);
    }
    const bool embedding_first = std::holds_alternative<EmbeddingOp>(model.layers.front().op);
    const bool loss_last = std::holds_alternative<SoftmaxXentOp>(model.layers.back().op);
    LayerTimes out;
    out.model = model.name;
    out.kind = kind;
    const auto timed = [&](auto&& pass) {
        ops.synchronize();
        const auto t0 = Clock::now();
        pass();
        ops.synchronize();
        return std::chrono::duration<double>(Clock::now() - t0).count();
    };
    for (std::uint64_t q : sizes) {
        if (q == 0) throw InputError("a layer timing size of 0 samples");
        const std::vector<float> x = rt::synthetic_input(model, seed, 0, q).data;
        rt::DeviceBuffer input(ops, x.size(), embedding_first ? rt::Elem::i32 : compute);
        ops.upload(x, input.span());
        rt::DeviceStep step;
        step.seed = seed;
        step.loss_scale = 1.0f / static_cast<float>(model.global_batch);
        // The tokens grouped by id, as a run's first stage gives its embedding (whose backward
        // then sums the table's rows by group, not by walking every token per column).
        rt::DeviceBuffer groups;
        if (embedding_first) {
            const rt::TokenGroups g = rt::group_tokens(x);
            groups = rt::DeviceBuffer(ops, g.packed.size(), rt::Elem::i32);
            ops.upload(g.packed, groups.span());
            step.token_groups = groups.span();
            step.token_group_count = g.groups;
        }
        rt::DeviceBuffer labels;
        if (loss_last) {
            const rt::LossShape ls = rt::loss_shape(model, L - 1);
            const std::vector<float> y = rt::loss_labels(seed, 0, q, ls.positions, ls.classes);
            labels = rt::DeviceBuffer(ops, y.size(), rt::Elem::i32);
            ops.upload(y, labels.span());
            step.labels = labels.span();
        }
        std::vector<std::vector<double>> fwd(L), bwd(L);
        for (int r = -1; r < std::max(1, repeats); ++r) {  // r = -1: the warm-up
            std::map<std::size_t, rt::DeviceBuffer> acts;
            std::vector<std::vector<rt::DeviceBuffer>> saved(L);
            const auto span_of = [&](std::size_t i) { return i == rt::model_input ? input.span() : acts.at(i).span(); };
            for (std::size_t l = 0; l < L; ++l) {
                std::vector<rt::DeviceSpan> in;
                for (std::size_t i : rt::inputs_of(model, l)) in.push_back(span_of(i));
                rt::DeviceBuffer y;
                const double s = timed([&] { y = layers[l].layer->forward(ops, step, in, q, layers[l].params(), saved[l]); });
                if (r >= 0) fwd[l].push_back(s);
                acts[l] = std::move(y);
            }
            // The last layer's output gradient: the loss's scale (what a run's loss receives), or
            // a constant of the same size.
            std::map<std::size_t, rt::DeviceBuffer> grads;
            {
                const rt::DeviceSpan last = acts.at(L - 1).span();
                rt::DeviceBuffer g(ops, last.count, loss_last ? rt::Elem::f32 : last.elem, rt::DeviceBuffer::uninitialized);
                ops.fill(g.span(), step.loss_scale);
                grads.emplace(L - 1, std::move(g));
            }
            for (std::size_t l = L; l-- > 0;) {
                const auto it = grads.find(l);
                if (it == grads.end()) {  // nothing reads it
                    if (r >= 0) bwd[l].push_back(0.0);
                    continue;
                }
                const auto inputs = rt::inputs_of(model, l);
                std::vector<rt::DeviceSpan> in;
                for (std::size_t i : inputs) in.push_back(span_of(i));
                std::vector<rt::DeviceBuffer> din;
                const double s = timed([&] {
                    din = layers[l].layer->backward(ops, step, it->second.span(), in, q, layers[l].params(), saved[l],
                                                    layers[l].grads.span());
                });
                if (r >= 0) bwd[l].push_back(s);
                grads.erase(it);
                saved[l].clear();
                for (std::size_t j = 0; j < inputs.size(); ++j) {
                    if (inputs[j] == rt::model_input || din[j].span().ptr == nullptr) continue;
                    auto [at, fresh] = grads.try_emplace(inputs[j], std::move(din[j]));
                    if (!fresh) ops.add(din[j].span(), at->second.span());
                }
            }
        }
        for (std::size_t l = 0; l < L; ++l) out.layers[l].push_back({q, stats_of(fwd[l]).median, stats_of(bwd[l]).median});
    }
    return out;
}

}  // namespace dpart::profile
