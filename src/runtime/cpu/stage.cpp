// The CPU kernels' stage: every layer's state in host memory, forward and backward through
// the CPU kernels (tensor-parallel shards calling the group in ctx.tp).
#include <fmt/format.h>

#include <algorithm>

#include "dpart/core/error.hpp"
#include "dpart/runtime/stage_compute.hpp"

namespace dpart::rt {
namespace {

void accumulate(TensorMap& grads, std::size_t i, Tensor&& g) {
    auto it = grads.find(i);
    if (it == grads.end()) {
        grads.emplace(i, std::move(g));
        return;
    }
    std::vector<float>& acc = it->second.data;
    for (std::size_t k = 0; k < acc.size(); ++k) acc[k] += g.data[k];
}

class CpuStage final : public StageCompute {
public:
    explicit CpuStage(StageSetup setup)
        : model_(*setup.model), stage_(*setup.stage), recompute_(setup.recompute) {
        const Shard shard{static_cast<std::uint32_t>(setup.place.tp_rank), stage_.tp};
        for (std::size_t l = stage_.first_layer; l <= stage_.last_layer; ++l) {
            kernels_.push_back(make_cpu_kernel(model_, l, shard));
            const LayerKernel& k = *kernels_.back();
            ShardState& st = setup.state.at(l - stage_.first_layer);
            if (st.params.size() != k.shard_params() || st.m.size() != k.shard_params() || st.v.size() != k.shard_params())
                throw RuntimeError(fmt::format("layer {}: given a state of {} values for a shard of {}", l,
                                               st.params.size(), k.shard_params()));
            grads_.emplace_back(k.shard_params(), 0.0f);
        }
        state_ = std::move(setup.state);
        // ZeRO-1: only the moments of the optimizer part stay.
        std::size_t base = 0;
        for (ShardState& st : state_) {
            const std::size_t n = st.params.size();
            parts_.push_back(setup.optimizer_part ? layer_part(*setup.optimizer_part, base, n) : ValueRange{0, n});
            const ValueRange r = parts_.back();
            if (r.count != n) {
                st.m = std::vector<float>(st.m.begin() + static_cast<std::ptrdiff_t>(r.first),
                                          st.m.begin() + static_cast<std::ptrdiff_t>(r.first + r.count));
                st.v = std::vector<float>(st.v.begin() + static_cast<std::ptrdiff_t>(r.first),
                                          st.v.begin() + static_cast<std::ptrdiff_t>(r.first + r.count));
            }
            base += n;
        }
    }

    const TensorMap& forward(std::uint32_t mb, const StepContext& ctx, std::size_t, TensorMap inputs,
                             std::span<const std::size_t> keep, DeviceHandoff* device) override {
        no_device(device);
        InFlight& f = in_flight_[mb];
        f.acts = std::move(inputs);
        run_forward(ctx, f);
        if (recompute_) {
            // Checkpointing: the stage's inputs and what leaves it stay; the rest comes back in
            // backward.
            f.saved.clear();
            std::erase_if(f.acts, [&](const auto& a) {
                const bool ours = a.first != model_input && a.first >= stage_.first_layer && a.first <= stage_.last_layer;
                return ours && std::find(keep.begin(), keep.end(), a.first) == keep.end();
            });
        }
        return f.acts;
    }

    TensorMap backward(std::uint32_t mb, const StepContext& ctx, TensorMap grads, std::span<const std::size_t>,
                       DeviceHandoff* device) override {
        no_device(device);
        InFlight& f = in_flight_.at(mb);
        if (recompute_) run_forward(ctx, f);  // the same values: deterministic kernels, the same ctx
        for (std::size_t k = kernels_.size(); k-- > 0;) {
            const std::size_t l = stage_.first_layer + k;
            const auto g = grads.find(l);
            if (g == grads.end()) continue;  // nothing reads it
            const auto inputs = inputs_of(model_, l);
            std::vector<const Tensor*> in;
            for (std::size_t i : inputs) in.push_back(&f.acts.at(i));
            std::vector<Tensor> din = kernels_[k]->backward(ctx, g->second, in, state_[k].params, f.saved[k], grads_[k]);
            grads.erase(g);
            for (std::size_t j = 0; j < inputs.size(); ++j)
                if (inputs[j] != model_input) accumulate(grads, inputs[j], std::move(din[j]));
        }
        in_flight_.erase(mb);
        return grads;
    }

    std::vector<std::vector<float>>& pull_grads() override { return grads_; }
    void push_grads() override {}

    std::vector<float> gradient(std::size_t layer, std::size_t n) override {
        const std::vector<float>& g = grads_.at(layer);
        return {g.begin(), g.begin() + static_cast<std::ptrdiff_t>(n)};
    }
    void set_gradient(std::size_t layer, std::span<const float> values) override {
        std::copy(values.begin(), values.end(), grads_.at(layer).begin());
    }

    void tie_gradients(std::size_t embedding, std::size_t linear, std::size_t n) override {
        std::vector<float>& e = grads_.at(embedding);
        std::vector<float>& h = grads_.at(linear);
        for (std::size_t i = 0; i < n; ++i) e[i] = e[i] + h[i];
        std::copy_n(e.begin(), static_cast<std::ptrdiff_t>(n), h.begin());
    }

    void step(const OptimizerOptions& o, std::uint64_t step) override {
        for (std::size_t k = 0; k < state_.size(); ++k) {
            ShardState& st = state_[k];
            const ValueRange r = parts_[k];
            const std::span<float> p = std::span<float>(st.params).subspan(r.first, r.count);
            const std::span<const float> g = std::span<const float>(grads_[k]).subspan(r.first, r.count);
            if (o.kind == OptimizerKind::sgd)
                sgd_step(p, g, o.lr);
            else
                adam_step(p, g, st.m, st.v, step, o);
            std::fill(grads_[k].begin(), grads_[k].end(), 0.0f);
        }
    }

    std::vector<float> parameters(std::size_t first, std::size_t n) override {
        std::vector<float> out(n);
        over_parameters(first, n, [&](std::span<float> p, std::size_t at) { std::copy(p.begin(), p.end(), out.begin() + static_cast<std::ptrdiff_t>(at)); });
        return out;
    }
    void set_parameters(std::size_t first, std::span<const float> values) override {
        over_parameters(first, values.size(), [&](std::span<float> p, std::size_t at) {
            const auto from = values.subspan(at, p.size());
            std::copy(from.begin(), from.end(), p.begin());
        });
    }

    std::vector<ShardState>& pull_state() override { return state_; }
    void push_state() override {}

private:
    /// f(values, at) for each layer's values inside [first, first + n) of the stage's
    /// parameters, `at` counted from `first`.
    template <class F>
    void over_parameters(std::size_t first, std::size_t n, F&& f) {
        std::size_t base = 0;
        for (ShardState& st : state_) {
            const ValueRange r = layer_part({first, n}, base, st.params.size());
            if (r.count > 0) f(std::span<float>(st.params).subspan(r.first, r.count), base + r.first - first);
            base += st.params.size();
        }
        if (first + n > base)
            throw RuntimeError(fmt::format("parameter values {}-{} asked of a stage of {}", first, first + n, base));
    }

    struct InFlight;
    /// Every layer's forward on f.acts (which holds the stage's inputs), keeping what backward needs.
    void run_forward(const StepContext& ctx, InFlight& f) {
        f.saved.assign(kernels_.size(), Saved{});
        for (std::size_t k = 0; k < kernels_.size(); ++k) {
            const std::size_t l = stage_.first_layer + k;
            std::vector<const Tensor*> in;
            for (std::size_t i : inputs_of(model_, l)) in.push_back(&f.acts.at(i));
            f.acts[l] = kernels_[k]->forward(ctx, in, state_[k].params, f.saved[k]);
        }
    }

    /// Host memory has no device to hand tensors over on (no memory domain: the executor never asks).
    static void no_device(const DeviceHandoff* device) {
        if (device != nullptr) throw RuntimeError("the CPU stage was asked to hand tensors over on a device");
    }

    struct InFlight {
        TensorMap acts;
        std::vector<Saved> saved;
    };
    const Model& model_;
    const Stage& stage_;
    bool recompute_;
    std::vector<std::unique_ptr<LayerKernel>> kernels_;
    std::vector<ShardState> state_;
    std::vector<ValueRange> parts_;  // per layer: the values it steps (ZeRO-1), relative to the layer
    std::vector<std::vector<float>> grads_;
    std::map<std::uint32_t, InFlight> in_flight_;
};

}  // namespace

DeviceSpan StageCompute::export_gradients(std::size_t, std::size_t) {
    throw RuntimeError("this stage keeps its gradients in host memory: there is nothing to export on a device");
}
void StageCompute::import_gradients(DeviceSpan, std::size_t, bool) {
    throw RuntimeError("this stage keeps its gradients in host memory: it cannot import a device buffer");
}

void StageCompute::import_parameters(DeviceSpan, std::size_t) {
    throw RuntimeError("this stage keeps its parameters in host memory: it cannot import a device buffer");
}

std::unique_ptr<StageCompute> make_cpu_stage(StageSetup setup) { return std::make_unique<CpuStage>(std::move(setup)); }

}  // namespace dpart::rt
