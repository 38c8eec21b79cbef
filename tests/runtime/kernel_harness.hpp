#pragma once
// Test helpers for the CPU kernels: tiny models, random tensors, one forward + backward, a
// finite-difference gradient check, and an in-process tensor-parallel group on threads.
#include <doctest/doctest.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <exception>
#include <optional>
#include <thread>
#include <vector>

#include "dpart/graph/model.hpp"
#include "dpart/runtime/backend.hpp"

namespace kt {

using namespace dpart;
using namespace dpart::rt;

inline LayerSpec layer(std::string name, OpParams op, std::optional<std::vector<std::string>> inputs = std::nullopt) {
    LayerSpec l;
    l.name = std::move(name);
    l.op = std::move(op);
    l.inputs = std::move(inputs);
    l.where = SourceLocation{"k.toml", 3, 1};
    return l;
}

inline Model model(std::vector<LayerSpec> layers, std::optional<Shape> input_shape = std::nullopt) {
    ModelSpec spec;
    spec.name = "k";
    spec.dtype = DType::fp32;
    spec.global_batch = 4;
    spec.input_shape = std::move(input_shape);
    spec.layers = std::move(layers);
    return build_model(spec);
}

/// One layer reading the model input.
inline Model single(OpParams op, Shape input_shape) { return model({layer("op", std::move(op))}, std::move(input_shape)); }

inline Tensor random_tensor(std::vector<std::size_t> shape, std::uint64_t seed, float scale = 1.0f) {
    Tensor t(std::move(shape));
    for (std::size_t i = 0; i < t.size(); ++i) t.data[i] = scale * random_symmetric(seed, 77, i);
    return t;
}

inline std::vector<std::size_t> batch_shape(std::size_t n, const Shape& per_sample) {
    std::vector<std::size_t> s{n};
    s.insert(s.end(), per_sample.begin(), per_sample.end());
    return s;
}

/// Inputs of layer `l` for n samples: token ids for an embedding reading the model input,
/// uniform values otherwise.
inline std::vector<Tensor> inputs_for(const Model& m, std::size_t l, std::size_t n, std::uint64_t seed) {
    const Layer& layer = m.layers[l];
    if (layer.inputs.empty()) {
        if (std::holds_alternative<EmbeddingOp>(layer.op)) return {synthetic_input(m, seed, 0, n)};
        return {random_tensor(batch_shape(n, m.input_shape), seed)};
    }
    std::vector<Tensor> in;
    for (std::size_t k = 0; k < layer.inputs.size(); ++k)
        in.push_back(random_tensor(batch_shape(n, m.layers[layer.inputs[k]].out_shape), seed + 100 * (k + 1)));
    return in;
}

inline std::vector<const Tensor*> pointers(const std::vector<Tensor>& ts) {
    std::vector<const Tensor*> p;
    for (const Tensor& t : ts) p.push_back(&t);
    return p;
}

/// Initial values plus a small perturbation, so that biases and gains are not 0 and 1.
inline std::vector<float> params_for(const LayerKernel& k, std::uint64_t seed) {
    std::vector<float> p(k.full_params());
    k.init(seed, p);
    for (std::size_t i = 0; i < p.size(); ++i) p[i] += 0.1f * random_symmetric(seed, 99, i);
    return p;
}

struct Result {
    Tensor y;
    std::vector<Tensor> dx;
    std::vector<float> dparams;
};

inline Result run(const LayerKernel& k, const StepContext& ctx, const std::vector<Tensor>& in,
                  std::span<const float> params, const Tensor& dout) {
    Result r;
    Saved saved;
    const auto p = pointers(in);
    r.y = k.forward(ctx, p, params, saved);
    r.dparams.assign(k.shard_params(), 0.0f);
    r.dx = k.backward(ctx, dout, p, params, saved, r.dparams);
    return r;
}

/// max |a - b| / max |b|.
inline double rel_diff(std::span<const float> a, std::span<const float> b) {
    REQUIRE(a.size() == b.size());
    double diff = 0.0, scale = 0.0;
    for (std::size_t i = 0; i < a.size(); ++i) {
        diff = std::max(diff, std::abs(static_cast<double>(a[i]) - b[i]));
        scale = std::max(scale, std::abs(static_cast<double>(b[i])));
    }
    return scale == 0.0 ? diff : diff / scale;
}

inline double max_abs(std::span<const float> a) {
    double m = 0.0;
    for (float v : a) m = std::max(m, std::abs(static_cast<double>(v)));
    return m;
}

struct GradCheck {
    std::size_t samples = 2;
    float step = 5e-3f;
    double tolerance = 2e-2;
    bool input_grads = true;
};

/// Checks layer l's input and parameter gradients against central differences of
/// sum(forward * r); returns the number of values compared.
inline std::size_t check_gradients(const Model& m, std::size_t l, GradCheck opt = {}) {
    const auto k = make_cpu_kernel(m, l);
    const StepContext ctx{7, 3, nullptr};
    std::vector<Tensor> in = inputs_for(m, l, opt.samples, 11);
    std::vector<float> params = params_for(*k, 5);
    Saved saved;
    const Tensor y0 = k->forward(ctx, pointers(in), params, saved);
    REQUIRE(y0.size() > 0);
    const Tensor r = random_tensor(y0.shape, 13);
    const Result an = run(*k, ctx, in, params, r);
    const auto objective = [&] {
        Saved s;
        const Tensor y = k->forward(ctx, pointers(in), params, s);
        double sum = 0.0;
        for (std::size_t i = 0; i < y.size(); ++i) sum += static_cast<double>(y.data[i]) * r.data[i];
        return sum;
    };
    const auto numeric = [&](float& v) {
        const float keep = v;
        v = keep + opt.step;
        const double up = objective();
        v = keep - opt.step;
        const double down = objective();
        v = keep;
        return static_cast<float>((up - down) / (2.0 * static_cast<double>(opt.step)));
    };
    std::size_t compared = 0;
    const auto compare = [&](std::span<float> values, std::span<const float> analytic, const char* what) {
        std::vector<float> fd(values.size());
        for (std::size_t i = 0; i < values.size(); ++i) fd[i] = numeric(values[i]);
        INFO(what << ": max |analytic| " << max_abs(analytic) << ", max |numeric| " << max_abs(fd));
        CHECK(max_abs(analytic) > 0.0);
        CHECK(rel_diff(analytic, fd) < opt.tolerance);
        compared += values.size();
    };
    if (opt.input_grads) {
        REQUIRE(an.dx.size() == in.size());
        for (std::size_t i = 0; i < in.size(); ++i) {
            REQUIRE(an.dx[i].shape == in[i].shape);
            compare(in[i].data, an.dx[i].data, "input gradient");
        }
    }
    if (!params.empty()) compare(params, an.dparams, "parameter gradient");
    return compared;
}

/// A tensor-parallel group of t threads: collectives through shared buffers, sums in rank order.
class ThreadGroup {
public:
    explicit ThreadGroup(std::size_t t) : barrier_(static_cast<std::ptrdiff_t>(t)), buffers_(t) {}

    class Comm final : public GroupComm {
    public:
        Comm(ThreadGroup& g, std::size_t rank) : g_(g), rank_(rank) {}
        void allreduce_sum(std::span<float> data) override {
            g_.buffers_[rank_].assign(data.begin(), data.end());
            g_.barrier_.arrive_and_wait();
            for (std::size_t i = 0; i < data.size(); ++i) {
                float sum = g_.buffers_[0][i];
                for (std::size_t r = 1; r < g_.buffers_.size(); ++r) sum += g_.buffers_[r][i];
                data[i] = sum;
            }
            g_.barrier_.arrive_and_wait();
        }
        void allgather(std::span<const float> mine, std::span<float> all) override {
            g_.buffers_[rank_].assign(mine.begin(), mine.end());
            g_.barrier_.arrive_and_wait();
            for (std::size_t r = 0; r < g_.buffers_.size(); ++r)
                std::copy(g_.buffers_[r].begin(), g_.buffers_[r].end(), all.begin() + static_cast<std::ptrdiff_t>(r * mine.size()));
            g_.barrier_.arrive_and_wait();
        }

    private:
        ThreadGroup& g_;
        std::size_t rank_;
    };

private:
    std::barrier<> barrier_;
    std::vector<std::vector<float>> buffers_;
};

struct TpResult {
    std::vector<Result> ranks;
    std::vector<float> dparams_full;  ///< the ranks' gradients reassembled by from_shard
};

/// Forward and backward of layer l split over t ranks on threads, from the full parameters.
inline TpResult run_tp(const Model& m, std::size_t l, std::uint32_t t, const StepContext& base,
                       const std::vector<Tensor>& in, std::span<const float> full, const Tensor& dout) {
    TpResult out;
    out.ranks.resize(t);
    out.dparams_full.assign(full.size(), 0.0f);
    std::vector<std::unique_ptr<LayerKernel>> kernels;
    for (std::uint32_t r = 0; r < t; ++r) kernels.push_back(make_cpu_kernel(m, l, Shard{r, t}));
    ThreadGroup group(t);
    std::vector<std::exception_ptr> errors(t);
    std::vector<std::thread> threads;
    for (std::uint32_t r = 0; r < t; ++r)
        threads.emplace_back([&, r] {
            try {
                ThreadGroup::Comm comm(group, r);
                StepContext ctx = base;
                ctx.tp = t > 1 ? &comm : nullptr;
                std::vector<float> shard(kernels[r]->shard_params());
                kernels[r]->to_shard(full, shard);
                out.ranks[r] = run(*kernels[r], ctx, in, shard, dout);
            } catch (...) {
                errors[r] = std::current_exception();
            }
        });
    for (auto& th : threads) th.join();
    for (auto& e : errors)
        if (e) std::rethrow_exception(e);
    for (std::uint32_t r = 0; r < t; ++r) kernels[r]->from_shard(out.ranks[r].dparams, out.dparams_full);
    return out;
}

/// Runs layer l with t = 1 and with each of `sizes`, checking that the output and the input
/// gradients agree within 1e-6 and the reassembled parameter gradients within 1e-5.
inline void check_tensor_parallel(const Model& m, std::size_t l, std::vector<std::uint32_t> sizes,
                                  std::size_t samples = 2) {
    prepare_cpu_workers();
    const auto whole = make_cpu_kernel(m, l);
    const StepContext ctx{21, 8, nullptr};
    const std::vector<Tensor> in = inputs_for(m, l, samples, 31);
    const std::vector<float> full = params_for(*whole, 9);
    Saved saved;
    const Tensor probe = whole->forward(ctx, pointers(in), full, saved);
    const Tensor dout = random_tensor(probe.shape, 41);
    const TpResult one = run_tp(m, l, 1, ctx, in, full, dout);
    REQUIRE(max_abs(one.ranks[0].y.data) > 0.0);
    REQUIRE(max_abs(one.dparams_full) > 0.0);
    for (std::uint32_t t : sizes) {
        CAPTURE(t);
        const TpResult split = run_tp(m, l, t, ctx, in, full, dout);
        for (std::uint32_t r = 0; r < t; ++r) {
            CAPTURE(r);
            CHECK(split.ranks[r].y.shape == one.ranks[0].y.shape);
            CHECK(rel_diff(split.ranks[r].y.data, one.ranks[0].y.data) < 1e-6);
            REQUIRE(split.ranks[r].dx.size() == one.ranks[0].dx.size());
            for (std::size_t i = 0; i < split.ranks[r].dx.size(); ++i)
                CHECK(rel_diff(split.ranks[r].dx[i].data, one.ranks[0].dx[i].data) < 1e-6);
        }
        CHECK(rel_diff(split.dparams_full, one.dparams_full) < 1e-5);
    }
}

}  // namespace kt
