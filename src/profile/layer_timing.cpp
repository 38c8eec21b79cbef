// dpart profile --model: per-layer forward and backward times with the CPU kernels.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <exception>
#include <map>
#include <thread>

#include "dpart/core/error.hpp"
#include "dpart/profile/gpu.hpp"
#include "dpart/profile/layers.hpp"
#include "dpart/runtime/backend.hpp"

namespace dpart::profile {

std::vector<std::uint64_t> layer_timing_sizes(std::uint64_t global_batch, std::size_t most) {
    std::vector<std::uint64_t> divisors;
    for (std::uint64_t d = 1; d * d <= global_batch; ++d)
        if (global_batch % d == 0) {
            divisors.push_back(d);
            if (d != global_batch / d) divisors.push_back(global_batch / d);
        }
    std::sort(divisors.begin(), divisors.end());
    if (divisors.size() <= most || most < 2) return divisors;
    // Evenly spread in log scale: the divisor nearest each of `most` targets.
    std::vector<std::uint64_t> out;
    const double lo = std::log(static_cast<double>(divisors.front())), hi = std::log(static_cast<double>(divisors.back()));
    for (std::size_t k = 0; k < most; ++k) {
        const double target = lo + (hi - lo) * static_cast<double>(k) / static_cast<double>(most - 1);
        const auto best = std::min_element(divisors.begin(), divisors.end(), [&](std::uint64_t a, std::uint64_t b) {
            return std::abs(std::log(static_cast<double>(a)) - target) < std::abs(std::log(static_cast<double>(b)) - target);
        });
        if (out.empty() || out.back() != *best) out.push_back(*best);
    }
    return out;
}

namespace {

constexpr std::size_t model_input = static_cast<std::size_t>(-1);
using Clock = std::chrono::steady_clock;

std::vector<std::size_t> inputs_of(const Model& model, std::size_t l) {
    if (model.layers[l].inputs.empty()) return {l == 0 ? model_input : l - 1};
    return model.layers[l].inputs;
}

double seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

double median(std::vector<double> v) { return stats_of(std::move(v)).median; }

}  // namespace

namespace {

/// One core's measurement (see time_layers).
LayerTimes time_layers_on_one_core(const Model& model, const std::vector<std::uint64_t>& sizes, int repeats,
                                   const std::string& kind, std::uint64_t seed) {
    const std::size_t L = model.layers.size();
    std::vector<std::unique_ptr<rt::LayerKernel>> kernels;
    std::vector<std::vector<float>> params, grads;
    for (std::size_t l = 0; l < L; ++l) {
        kernels.push_back(rt::make_cpu_kernel(model, l));
        params.emplace_back(kernels.back()->full_params());
        kernels.back()->init(seed, params.back());
        grads.emplace_back(params.back().size(), 0.0f);
    }
    LayerTimes out;
    out.model = model.name;
    out.kind = kind;
    for (std::uint64_t q : sizes) {
        if (q == 0) throw InputError("a layer timing size of 0 samples");
        std::vector<std::vector<double>> fwd(L), bwd(L);
        for (int r = -1; r < std::max(1, repeats); ++r) {  // r = -1: the warm-up
            rt::StepContext ctx;
            ctx.seed = seed;
            std::map<std::size_t, rt::Tensor> acts;
            acts.emplace(model_input, rt::synthetic_input(model, seed, 0, q));
            std::vector<rt::Saved> saved(L);
            for (std::size_t l = 0; l < L; ++l) {
                std::vector<const rt::Tensor*> in;
                for (std::size_t i : inputs_of(model, l)) in.push_back(&acts.at(i));
                const auto t0 = Clock::now();
                rt::Tensor y = kernels[l]->forward(ctx, in, params[l], saved[l]);
                const auto t1 = Clock::now();
                if (r >= 0) fwd[l].push_back(seconds(t0, t1));
                acts[l] = std::move(y);
            }
            std::map<std::size_t, rt::Tensor> g;
            rt::Tensor last(acts.at(L - 1).shape);
            std::fill(last.data.begin(), last.data.end(), 1.0f / static_cast<float>(model.global_batch));
            g.emplace(L - 1, std::move(last));
            for (std::size_t l = L; l-- > 0;) {
                const auto it = g.find(l);
                if (it == g.end()) {  // nothing reads it
                    if (r >= 0) bwd[l].push_back(0.0);
                    continue;
                }
                const auto inputs = inputs_of(model, l);
                std::vector<const rt::Tensor*> in;
                for (std::size_t i : inputs) in.push_back(&acts.at(i));
                const auto t0 = Clock::now();
                std::vector<rt::Tensor> din = kernels[l]->backward(ctx, it->second, in, params[l], saved[l], grads[l]);
                const auto t1 = Clock::now();
                if (r >= 0) bwd[l].push_back(seconds(t0, t1));
                g.erase(it);
                for (std::size_t j = 0; j < inputs.size(); ++j) {
                    if (inputs[j] == model_input) continue;
                    auto [at, fresh] = g.try_emplace(inputs[j], std::move(din[j]));
                    if (!fresh)
                        for (std::size_t k = 0; k < at->second.data.size(); ++k) at->second.data[k] += din[j].data[k];
                }
            }
        }
        for (std::size_t l = 0; l < L; ++l) out.layers[l].push_back({q, median(fwd[l]), median(bwd[l])});
    }
    return out;
}

}  // namespace

LayerTimes time_layers(const Model& model, const std::vector<std::uint64_t>& sizes, int repeats, const std::string& kind,
                       std::uint64_t seed, unsigned threads) {
    rt::prepare_cpu_workers();
    threads = std::max(1u, threads);
    std::vector<LayerTimes> each(threads);
    std::vector<std::exception_ptr> errors(threads);
    {
        std::vector<std::jthread> pool;
        for (unsigned t = 0; t < threads; ++t)
            pool.emplace_back([&, t] {
                try {
                    each[t] = time_layers_on_one_core(model, sizes, repeats, kind, seed);
                } catch (...) {
                    errors[t] = std::current_exception();
                }
            });
    }
    for (const auto& e : errors)
        if (e) std::rethrow_exception(e);
    // Per layer and size, the median over the cores.
    LayerTimes out = each.front();
    for (auto& [layer, points] : out.layers)
        for (std::size_t k = 0; k < points.size(); ++k) {
            std::vector<double> f, b;
            for (const LayerTimes& e : each) {
                f.push_back(e.layers.at(layer)[k].forward_s);
                b.push_back(e.layers.at(layer)[k].backward_s);
            }
            points[k].forward_s = median(f);
            points[k].backward_s = median(b);
        }
    return out;
}

}  // namespace dpart::profile
