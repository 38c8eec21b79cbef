// The CPU backend's entry points, and the ops with no parameters to split: element-wise
// activations and dropout, add, flatten, concat, the loss, and custom layers.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "blas.hpp"
#include "parts.hpp"

namespace dpart::rt::cpu {
namespace {

class ElementwiseKernel final : public Kernel {
public:
    ElementwiseKernel(const Model& model, std::size_t layer, Shard shard)
        : Kernel(model, layer, shard), kind_(std::get<ElementwiseOp>(model.layers[layer].op).kind) {}

    [[nodiscard]] Tensor forward(const StepContext& ctx, std::span<const Tensor* const> inputs,
                                 std::span<const float>, Saved& saved) const override {
        saved.tensors.clear();
        const Tensor& x = single_input(inputs);
        Tensor y(x.shape);
        if (kind_ == Elementwise::dropout) {
            for (std::size_t i = 0; i < x.size(); ++i) y.data[i] = x.data[i] * slope(ctx, x, i);
            return y;
        }
        const float* __restrict in = x.data.data();
        float* __restrict out = y.data.data();
        with_activation(activation(), [&](auto a) {
            for (std::size_t i = 0; i < x.size(); ++i) out[i] = activate(a, in[i]);
        });
        return y;
    }

    [[nodiscard]] std::vector<Tensor> backward(const StepContext& ctx, const Tensor& dout,
                                               std::span<const Tensor* const> inputs, std::span<const float>,
                                               const Saved&, std::span<float>) const override {
        const Tensor& x = single_input(inputs);
        std::vector<Tensor> dx;
        dx.emplace_back(x.shape);
        float* __restrict out = dx[0].data.data();
        const float* __restrict dy = dout.data.data();
        const float* __restrict in = x.data.data();
        if (kind_ == Elementwise::dropout) {
            for (std::size_t i = 0; i < x.size(); ++i) out[i] = dy[i] * slope(ctx, x, i);
        } else {
            with_activation(activation(), [&](auto a) {
                for (std::size_t i = 0; i < x.size(); ++i) out[i] = dy[i] * activate_grad(a, in[i]);
            });
        }
        return dx;
    }

private:
    [[nodiscard]] Activation activation() const {
        return kind_ == Elementwise::relu ? Activation::relu
               : kind_ == Elementwise::gelu ? Activation::gelu
                                            : Activation::silu;
    }

    /// dy/dx at element i; for dropout, 0 or 1 / (1 - p) by a mask drawn from the sample's
    /// global index, so backward redraws the mask its forward used.
    [[nodiscard]] float slope(const StepContext& ctx, const Tensor& x, std::size_t i) const {
        if (kind_ != Elementwise::dropout) return activate_grad(activation(), x.data[i]);
        const std::size_t row = x.row_size();
        return dropout_factor(ctx.seed, index_, (ctx.first_sample + i / row) * row + i % row);
    }

    Elementwise kind_;
};

class AddKernel final : public Kernel {
public:
    using Kernel::Kernel;

    [[nodiscard]] Tensor forward(const StepContext&, std::span<const Tensor* const> inputs, std::span<const float>,
                                 Saved& saved) const override {
        saved.tensors.clear();
        if (inputs.size() < 2) bad_call(name_, fmt::format("add expects two inputs or more, got {}", inputs.size()));
        Tensor y = *inputs[0];
        for (std::size_t k = 1; k < inputs.size(); ++k) {
            if (inputs[k]->size() != y.size()) bad_call(name_, "add needs inputs of one size");
            add_into(y.data, inputs[k]->data);
        }
        return y;
    }

    [[nodiscard]] std::vector<Tensor> backward(const StepContext&, const Tensor& dout,
                                               std::span<const Tensor* const> inputs, std::span<const float>,
                                               const Saved&, std::span<float>) const override {
        return std::vector<Tensor>(inputs.size(), dout);
    }
};

class FlattenKernel final : public Kernel {
public:
    using Kernel::Kernel;

    [[nodiscard]] Tensor forward(const StepContext&, std::span<const Tensor* const> inputs, std::span<const float>,
                                 Saved& saved) const override {
        saved.tensors.clear();
        const Tensor& x = single_input(inputs);
        Tensor y;
        y.shape = {x.rows(), x.row_size()};
        y.data = x.data;
        return y;
    }

    [[nodiscard]] std::vector<Tensor> backward(const StepContext&, const Tensor& dout,
                                               std::span<const Tensor* const> inputs, std::span<const float>,
                                               const Saved&, std::span<float>) const override {
        std::vector<Tensor> dx(1);
        dx[0].shape = single_input(inputs).shape;
        dx[0].data = dout.data;
        return dx;
    }
};

/// Joins per-sample tensors along `axis`: each sample is `outer` blocks, block k of input i
/// being `chunk(i)` contiguous elements.
class ConcatKernel final : public Kernel {
public:
    ConcatKernel(const Model& model, std::size_t layer, Shard shard)
        : Kernel(model, layer, shard), axis_(std::get<ConcatOp>(model.layers[layer].op).axis) {}

    [[nodiscard]] Tensor forward(const StepContext&, std::span<const Tensor* const> inputs, std::span<const float>,
                                 Saved& saved) const override {
        saved.tensors.clear();
        Tensor y = output(inputs[0]->rows());
        walk(inputs, [&](std::size_t i, std::size_t from, std::size_t to, std::size_t count) {
            std::copy_n(inputs[i]->data.data() + from, count, y.data.data() + to);
        });
        return y;
    }

    [[nodiscard]] std::vector<Tensor> backward(const StepContext&, const Tensor& dout,
                                               std::span<const Tensor* const> inputs, std::span<const float>,
                                               const Saved&, std::span<float>) const override {
        std::vector<Tensor> dx;
        for (const Tensor* x : inputs) dx.emplace_back(x->shape);
        walk(inputs, [&](std::size_t i, std::size_t from, std::size_t to, std::size_t count) {
            std::copy_n(dout.data.data() + to, count, dx[i].data.data() + from);
        });
        return dx;
    }

private:
    /// Calls f(input index, offset in the input, offset in the output, count) for every run.
    template <class F>
    void walk(std::span<const Tensor* const> inputs, F&& f) const {
        const std::vector<std::size_t>& shape = inputs[0]->shape;
        std::size_t outer = 1;
        for (std::size_t d = 1; d <= axis_; ++d) outer *= shape[d];
        std::vector<std::size_t> chunk;
        std::size_t out_chunk = 0;
        for (const Tensor* x : inputs) {
            std::size_t c = 1;
            for (std::size_t d = axis_ + 1; d < x->shape.size(); ++d) c *= x->shape[d];
            chunk.push_back(c);
            out_chunk += c;
        }
        for (std::size_t b = 0; b < inputs[0]->rows(); ++b)
            for (std::size_t o = 0; o < outer; ++o) {
                std::size_t to = (b * outer + o) * out_chunk;
                for (std::size_t i = 0; i < inputs.size(); ++i) {
                    f(i, (b * outer + o) * chunk[i], to, chunk[i]);
                    to += chunk[i];
                }
            }
    }

    std::size_t axis_;
};

/// Per sample: the mean over its positions of -log softmax(x)[label]; labels drawn from the
/// sample's global index.
class SoftmaxXentKernel final : public Kernel {
public:
    SoftmaxXentKernel(const Model& model, std::size_t layer, Shard shard) : Kernel(model, layer, shard) {
        classes_ = loss_shape(model, layer).classes;
    }

    [[nodiscard]] Tensor forward(const StepContext& ctx, std::span<const Tensor* const> inputs,
                                 std::span<const float>, Saved& saved) const override {
        saved.tensors.clear();
        const Tensor& x = single_input(inputs);
        const std::size_t positions = x.row_size() / classes_;
        Tensor y = output(x.rows());
        for (std::size_t i = 0; i < x.rows(); ++i) {
            double loss = 0.0;
            for (std::size_t p = 0; p < positions; ++p) {
                const float* row = x.data.data() + (i * positions + p) * classes_;
                loss += log_sum_exp(row) - row[label(ctx, i, p, positions)];
            }
            y.data[i] = static_cast<float>(loss / static_cast<double>(positions));
        }
        return y;
    }

    [[nodiscard]] std::vector<Tensor> backward(const StepContext& ctx, const Tensor& dout,
                                               std::span<const Tensor* const> inputs, std::span<const float>,
                                               const Saved&, std::span<float>) const override {
        const Tensor& x = single_input(inputs);
        const std::size_t positions = x.row_size() / classes_;
        std::vector<Tensor> dx;
        dx.emplace_back(x.shape);
        for (std::size_t i = 0; i < x.rows(); ++i) {
            const float scale = dout.data[i] / static_cast<float>(positions);
            for (std::size_t p = 0; p < positions; ++p) {
                const std::size_t at = (i * positions + p) * classes_;
                const float* row = x.data.data() + at;
                const float lse = log_sum_exp(row);
                float* g = dx[0].data.data() + at;
                for (std::size_t c = 0; c < classes_; ++c) g[c] = scale * std::exp(row[c] - lse);
                g[label(ctx, i, p, positions)] -= scale;
            }
        }
        return dx;
    }

private:
    [[nodiscard]] float log_sum_exp(const float* row) const {
        const float max = *std::max_element(row, row + classes_);
        float sum = 0.0f;
        for (std::size_t c = 0; c < classes_; ++c) sum += std::exp(row[c] - max);
        return max + std::log(sum);
    }

    [[nodiscard]] std::size_t label(const StepContext& ctx, std::size_t i, std::size_t p, std::size_t positions) const {
        return random_bits(ctx.seed, stream_of(Stream::label), (ctx.first_sample + i) * positions + p) % classes_;
    }

    std::size_t classes_ = 0;
};

/// y = x' W^T, W [out, k], x' the sample's input repeated or cut to k elements: a real product
/// of the declared forward FLOPs. Its parameter count is out * k, whatever `params` says.
class CustomKernel final : public Kernel {
public:
    CustomKernel(const Model& model, std::size_t layer, Shard shard)
        : Kernel(model, layer, shard), out_(custom_geometry(model, layer).out), k_(custom_geometry(model, layer).k) {
        w_ = add_custom_params(layout_, custom_geometry(model, layer));
    }

    [[nodiscard]] Tensor forward(const StepContext&, std::span<const Tensor* const> inputs,
                                 std::span<const float> params, Saved& saved) const override {
        saved.tensors.clear();
        const Tensor& x = single_input(inputs);
        const std::vector<float> xt = tiled(x);
        Tensor y = out_shape_.empty() ? Tensor({x.rows(), out_}) : output(x.rows());
        gemm(Op::none, Op::trans, x.rows(), out_, k_, 1.0f, xt.data(), k_, layout_.at(params, w_), k_, 0.0f,
             y.data.data(), out_);
        return y;
    }

    [[nodiscard]] std::vector<Tensor> backward(const StepContext&, const Tensor& dout,
                                               std::span<const Tensor* const> inputs, std::span<const float> params,
                                               const Saved&, std::span<float> dparams) const override {
        const Tensor& x = single_input(inputs);
        const std::size_t n = x.rows();
        const std::vector<float> xt = tiled(x);
        std::vector<float> dxt(n * k_);
        dense_backward(xt.data(), dout.data.data(), n, k_, out_, layout_.at(params, w_), layout_.at(dparams, w_),
                       nullptr, dxt.data(), 0.0f);
        std::vector<Tensor> dx;
        dx.emplace_back(x.shape);
        const std::size_t row = x.row_size();
        if (row == 0) return dx;
        for (std::size_t i = 0; i < n; ++i)
            for (std::size_t j = 0; j < k_; ++j) dx[0].data[i * row + j % row] += dxt[i * k_ + j];
        return dx;
    }

private:
    [[nodiscard]] std::vector<float> tiled(const Tensor& x) const {
        const std::size_t row = x.row_size();
        std::vector<float> xt(x.rows() * k_, 0.0f);
        if (row == 0) return xt;
        for (std::size_t i = 0; i < x.rows(); ++i)
            for (std::size_t j = 0; j < k_; ++j) xt[i * k_ + j] = x.data[i * row + j % row];
        return xt;
    }

    std::size_t out_, k_;
    ParamLayout::Id w_ = ParamLayout::absent;
};

template <class... F>
struct Overloaded : F... {
    using F::operator()...;
};
// Clang before 17 deduces no aggregate's template arguments (scripts/fuzz.sh builds with clang 14).
template <class... F>
Overloaded(F...) -> Overloaded<F...>;

}  // namespace

KernelPtr make_elementwise(const Model& model, std::size_t layer, Shard shard) {
    return std::make_unique<ElementwiseKernel>(model, layer, shard);
}
KernelPtr make_add(const Model& model, std::size_t layer, Shard shard) {
    return std::make_unique<AddKernel>(model, layer, shard);
}
KernelPtr make_flatten(const Model& model, std::size_t layer, Shard shard) {
    return std::make_unique<FlattenKernel>(model, layer, shard);
}
KernelPtr make_concat(const Model& model, std::size_t layer, Shard shard) {
    return std::make_unique<ConcatKernel>(model, layer, shard);
}
KernelPtr make_softmax_xent(const Model& model, std::size_t layer, Shard shard) {
    return std::make_unique<SoftmaxXentKernel>(model, layer, shard);
}
KernelPtr make_custom(const Model& model, std::size_t layer, Shard shard) {
    return std::make_unique<CustomKernel>(model, layer, shard);
}

std::size_t input_row_size(const Model& model, std::size_t layer, std::size_t i) {
    const Layer& l = model.layers.at(layer);
    if (l.inputs.empty()) {
        if (!model.input_shape.empty()) return element_count(model.input_shape);
        return std::holds_alternative<CustomOp>(l.op) ? custom_geometry(model, layer).k : 0;
    }
    const std::size_t from = l.inputs.at(i);
    const Layer& src = model.layers[from];
    if (!src.out_shape.empty()) return element_count(src.out_shape);
    return std::holds_alternative<CustomOp>(src.op) ? custom_geometry(model, from).out : 0;
}

}  // namespace dpart::rt::cpu

namespace dpart::rt {

std::unique_ptr<LayerKernel> make_cpu_kernel(const Model& model, std::size_t layer, Shard shard) {
    using namespace cpu;
    if (layer >= model.layers.size())
        throw std::out_of_range(fmt::format("make_cpu_kernel: layer {} of a {}-layer model", layer, model.layers.size()));
    if (shard.size == 0 || shard.rank >= shard.size)
        throw std::invalid_argument(fmt::format("make_cpu_kernel: rank {} of a group of {}", shard.rank, shard.size));
    const auto make = Overloaded{
        [&](const LinearOp&) { return make_linear(model, layer, shard); },
        [&](const EmbeddingOp&) { return make_embedding(model, layer, shard); },
        [&](const NormOp&) { return make_norm(model, layer, shard); },
        [&](const BatchNormOp&) { return make_batchnorm(model, layer, shard); },
        [&](const ElementwiseOp&) { return make_elementwise(model, layer, shard); },
        [&](const AttentionOp&) { return make_attention(model, layer, shard); },
        [&](const MlpOp&) { return make_mlp(model, layer, shard); },
        [&](const TransformerBlockOp&) { return make_block(model, layer, shard); },
        [&](const Conv2dOp&) { return make_conv2d(model, layer, shard); },
        [&](const PoolOp&) { return make_pool(model, layer, shard); },
        [&](const FlattenOp&) { return make_flatten(model, layer, shard); },
        [&](const AddOp&) { return make_add(model, layer, shard); },
        [&](const ConcatOp&) { return make_concat(model, layer, shard); },
        [&](const SoftmaxXentOp&) { return make_softmax_xent(model, layer, shard); },
        [&](const CustomOp&) { return make_custom(model, layer, shard); },
    };
    return std::visit(make, model.layers[layer].op);
}

LossShape loss_shape(const Model& model, std::size_t layer) {
    const Layer& l = model.layers.at(layer);
    const auto& op = std::get<SoftmaxXentOp>(l.op);
    const Shape& in = l.inputs.empty() ? model.input_shape : model.layers[l.inputs[0]].out_shape;
    LossShape s;
    s.classes = op.classes != 0 ? op.classes : in.back();
    s.positions = element_count(in) / s.classes;
    return s;
}

Tensor synthetic_input(const Model& model, std::uint64_t seed, std::uint64_t first, std::size_t n) {
    if (model.layers.empty()) throw std::invalid_argument("synthetic_input: a model with no layers");
    const std::size_t row = cpu::input_row_size(model, 0);
    std::vector<std::size_t> shape{n};
    if (model.input_shape.empty())
        shape.push_back(row);
    else
        shape.insert(shape.end(), model.input_shape.begin(), model.input_shape.end());
    Tensor x(std::move(shape));
    const std::uint64_t stream = stream_of(Stream::input);
    const auto* embedding = std::get_if<EmbeddingOp>(&model.layers[0].op);
    for (std::size_t i = 0; i < n; ++i)
        for (std::size_t j = 0; j < row; ++j) {
            const std::uint64_t index = (first + i) * row + j;
            x.data[i * row + j] = embedding != nullptr ? static_cast<float>(random_bits(seed, stream, index) % embedding->vocab)
                                                       : random_symmetric(seed, stream, index);
        }
    return x;
}

}  // namespace dpart::rt
