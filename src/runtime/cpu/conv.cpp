// Image ops on [n, C, H, W]: conv2d (im2col + gemm per sample and group), batchnorm with the
// batch's statistics, max and average pooling. None is split over a tensor-parallel group.
#include <algorithm>
#include <cmath>
#include <limits>

#include "blas.hpp"
#include "dpart/runtime/window.hpp"
#include "parts.hpp"

namespace dpart::rt::cpu {
namespace {

using Window = Window2d;

/// cols [c * kh * kw, oh * ow] of `channels` planes of x: each column one receptive field.
void im2col(const float* x, std::size_t channels, const Window& g, float* cols) {
    const std::size_t plane = g.oh * g.ow;
    for (std::size_t c = 0; c < channels; ++c)
        for (std::size_t ki = 0; ki < g.kh; ++ki)
            for (std::size_t kj = 0; kj < g.kw; ++kj) {
                float* row = cols + ((c * g.kh + ki) * g.kw + kj) * plane;
                for (std::size_t oy = 0; oy < g.oh; ++oy) {
                    const std::size_t iy = Window::at(oy, ki, g.stride, g.pad, g.h);
                    for (std::size_t ox = 0; ox < g.ow; ++ox) {
                        const std::size_t ix = Window::at(ox, kj, g.stride, g.pad, g.w);
                        row[oy * g.ow + ox] =
                            iy == Window::npos || ix == Window::npos ? 0.0f : x[(c * g.h + iy) * g.w + ix];
                    }
                }
            }
}

/// The adjoint of im2col: adds each column entry back into its input element.
void col2im(const float* cols, std::size_t channels, const Window& g, float* dx) {
    const std::size_t plane = g.oh * g.ow;
    for (std::size_t c = 0; c < channels; ++c)
        for (std::size_t ki = 0; ki < g.kh; ++ki)
            for (std::size_t kj = 0; kj < g.kw; ++kj) {
                const float* row = cols + ((c * g.kh + ki) * g.kw + kj) * plane;
                for (std::size_t oy = 0; oy < g.oh; ++oy) {
                    const std::size_t iy = Window::at(oy, ki, g.stride, g.pad, g.h);
                    if (iy == Window::npos) continue;
                    for (std::size_t ox = 0; ox < g.ow; ++ox) {
                        const std::size_t ix = Window::at(ox, kj, g.stride, g.pad, g.w);
                        if (ix != Window::npos) dx[(c * g.h + iy) * g.w + ix] += row[oy * g.ow + ox];
                    }
                }
            }
}

/// y = W * x per group: W [out, in / groups, kh, kw], then bias [out].
class Conv2dKernel final : public Kernel {
public:
    Conv2dKernel(const Model& model, std::size_t layer, Shard shard) : Kernel(model, layer, shard) {
        const Layer& l = model.layers[layer];
        const auto& op = std::get<Conv2dOp>(l.op);
        const Shape& in = l.inputs.empty() ? model.input_shape : model.layers[l.inputs[0]].out_shape;
        in_ = op.in_channels;
        out_ = op.out_channels;
        groups_ = op.groups;
        g_ = Window{in[1], in[2], op.kernel_h, op.kernel_w, op.stride, op.padding, l.out_shape[1], l.out_shape[2]};
        const Conv2dParams p = add_conv2d_params(layout_, op);
        fan_in_ = p.fan_in;
        w_ = p.w;
        b_ = p.b;
    }

    [[nodiscard]] Tensor forward(const StepContext&, std::span<const Tensor* const> inputs,
                                 std::span<const float> params, Saved& saved) const override {
        saved.tensors.clear();
        const Tensor& x = single_input(inputs, in_ * g_.h * g_.w);
        const float* w = layout_.at(params, w_);
        const float* b = layout_.at(params, b_);
        const std::size_t plane = g_.oh * g_.ow;
        const std::size_t cin = in_ / groups_, cout = out_ / groups_;
        Tensor y = output(x.rows());
        std::vector<float> cols(fan_in_ * plane);
        for (std::size_t s = 0; s < x.rows(); ++s)
            for (std::size_t grp = 0; grp < groups_; ++grp) {
                im2col(x.data.data() + (s * in_ + grp * cin) * g_.h * g_.w, cin, g_, cols.data());
                gemm(Op::none, Op::none, cout, plane, fan_in_, 1.0f, w + grp * cout * fan_in_, fan_in_, cols.data(),
                     plane, 0.0f, y.data.data() + (s * out_ + grp * cout) * plane, plane);
            }
        if (b != nullptr)
            for (std::size_t s = 0; s < x.rows(); ++s)
                for (std::size_t c = 0; c < out_; ++c)
                    for (std::size_t i = 0; i < plane; ++i) y.data[(s * out_ + c) * plane + i] += b[c];
        return y;
    }

    [[nodiscard]] std::vector<Tensor> backward(const StepContext&, const Tensor& dout,
                                               std::span<const Tensor* const> inputs, std::span<const float> params,
                                               const Saved&, std::span<float> dparams) const override {
        const Tensor& x = single_input(inputs, in_ * g_.h * g_.w);
        const float* w = layout_.at(params, w_);
        float* dw = layout_.at(dparams, w_);
        float* db = layout_.at(dparams, b_);
        const std::size_t plane = g_.oh * g_.ow;
        const std::size_t cin = in_ / groups_, cout = out_ / groups_;
        std::vector<Tensor> dx;
        dx.emplace_back(x.shape);
        std::vector<float> cols(fan_in_ * plane), dcols(fan_in_ * plane);
        for (std::size_t s = 0; s < x.rows(); ++s)
            for (std::size_t grp = 0; grp < groups_; ++grp) {
                const float* dy = dout.data.data() + (s * out_ + grp * cout) * plane;
                im2col(x.data.data() + (s * in_ + grp * cin) * g_.h * g_.w, cin, g_, cols.data());
                gemm(Op::none, Op::trans, cout, fan_in_, plane, 1.0f, dy, plane, cols.data(), plane, 1.0f,
                     dw + grp * cout * fan_in_, fan_in_);
                gemm(Op::trans, Op::none, fan_in_, plane, cout, 1.0f, w + grp * cout * fan_in_, fan_in_, dy, plane,
                     0.0f, dcols.data(), plane);
                col2im(dcols.data(), cin, g_, dx[0].data.data() + (s * in_ + grp * cin) * g_.h * g_.w);
            }
        if (db != nullptr)
            for (std::size_t s = 0; s < x.rows(); ++s)
                for (std::size_t c = 0; c < out_; ++c)
                    for (std::size_t i = 0; i < plane; ++i) db[c] += dout.data[(s * out_ + c) * plane + i];
        return dx;
    }

private:
    std::size_t in_ = 0, out_ = 0, groups_ = 1, fan_in_ = 0;
    Window g_;
    ParamLayout::Id w_ = ParamLayout::absent, b_ = ParamLayout::absent;
};

/// Normalises each channel over the batch and its spatial positions (the statistics of the
/// samples passed in: those of one microbatch, as PyTorch's BatchNorm without SyncBatchNorm).
class BatchNormKernel final : public Kernel {
public:
    BatchNormKernel(const Model& model, std::size_t layer, Shard shard) : Kernel(model, layer, shard) {
        channels_ = out_shape_.front();
        const NormParams p = add_batchnorm_params(layout_, channels_);
        gamma_ = p.gamma;
        beta_ = p.beta;
    }

    [[nodiscard]] Tensor forward(const StepContext&, std::span<const Tensor* const> inputs,
                                 std::span<const float> params, Saved& saved) const override {
        const Tensor& x = single_input(inputs);
        const std::size_t plane = x.row_size() / channels_;
        const double count = static_cast<double>(x.rows() * plane);
        const float* gamma = layout_.at(params, gamma_);
        const float* beta = layout_.at(params, beta_);
        Tensor stats({channels_, 2});  // mean, 1 / std
        Tensor y(x.shape);
        for (std::size_t c = 0; c < channels_; ++c) {
            double mean = 0.0, var = 0.0;
            for_channel(x, c, plane, [&](std::size_t i) { mean += x.data[i]; });
            mean /= count;
            for_channel(x, c, plane, [&](std::size_t i) { var += (x.data[i] - mean) * (x.data[i] - mean); });
            const auto m = static_cast<float>(mean);
            const auto rstd = static_cast<float>(1.0 / std::sqrt(var / count + 1e-5));
            for_channel(x, c, plane, [&](std::size_t i) { y.data[i] = (x.data[i] - m) * rstd * gamma[c] + beta[c]; });
            stats.data[2 * c] = m;
            stats.data[2 * c + 1] = rstd;
        }
        saved.tensors.clear();
        saved.tensors.push_back(std::move(stats));
        return y;
    }

    [[nodiscard]] std::vector<Tensor> backward(const StepContext&, const Tensor& dout,
                                               std::span<const Tensor* const> inputs, std::span<const float> params,
                                               const Saved& saved, std::span<float> dparams) const override {
        const Tensor& x = single_input(inputs);
        const std::size_t plane = x.row_size() / channels_;
        const double count = static_cast<double>(x.rows() * plane);
        const float* gamma = layout_.at(params, gamma_);
        float* dgamma = layout_.at(dparams, gamma_);
        float* dbeta = layout_.at(dparams, beta_);
        const Tensor& stats = saved.tensors.at(0);
        std::vector<Tensor> dx;
        dx.emplace_back(x.shape);
        for (std::size_t c = 0; c < channels_; ++c) {
            const float m = stats.data[2 * c];
            const float rstd = stats.data[2 * c + 1];
            double sum_dy = 0.0, sum_dy_xhat = 0.0;
            for_channel(x, c, plane, [&](std::size_t i) {
                sum_dy += dout.data[i];
                sum_dy_xhat += dout.data[i] * (x.data[i] - m) * rstd;
            });
            dgamma[c] += static_cast<float>(sum_dy_xhat);
            dbeta[c] += static_cast<float>(sum_dy);
            const auto a = static_cast<float>(sum_dy / count);
            const auto b = static_cast<float>(sum_dy_xhat / count);
            for_channel(x, c, plane, [&](std::size_t i) {
                const float xhat = (x.data[i] - m) * rstd;
                dx[0].data[i] = gamma[c] * rstd * (dout.data[i] - a - xhat * b);
            });
        }
        return dx;
    }

private:
    /// f(element index) over channel c of every sample, in sample order.
    template <class F>
    void for_channel(const Tensor& x, std::size_t c, std::size_t plane, F&& f) const {
        for (std::size_t s = 0; s < x.rows(); ++s)
            for (std::size_t i = 0; i < plane; ++i) f((s * channels_ + c) * plane + i);
    }

    std::size_t channels_ = 0;
    ParamLayout::Id gamma_ = ParamLayout::absent, beta_ = ParamLayout::absent;
};

/// Max pooling ignores the padding (as if -inf); average pooling divides by the whole kernel
/// area, padding included (PyTorch's count_include_pad = True).
class PoolKernel final : public Kernel {
public:
    PoolKernel(const Model& model, std::size_t layer, Shard shard) : Kernel(model, layer, shard) {
        const Layer& l = model.layers[layer];
        const auto& op = std::get<PoolOp>(l.op);
        const Shape& in = l.inputs.empty() ? model.input_shape : model.layers[l.inputs[0]].out_shape;
        max_ = op.kind == PoolKind::max;
        channels_ = in[0];
        if (op.global)
            g_ = Window{in[1], in[2], in[1], in[2], 1, 0, 1, 1};
        else
            g_ = Window{in[1], in[2], op.kernel, op.kernel, op.stride, op.padding, l.out_shape[1], l.out_shape[2]};
    }

    [[nodiscard]] Tensor forward(const StepContext&, std::span<const Tensor* const> inputs, std::span<const float>,
                                 Saved& saved) const override {
        saved.tensors.clear();
        const Tensor& x = single_input(inputs, channels_ * g_.h * g_.w);
        Tensor y = output(x.rows());
        for_each_window(x.rows() * channels_, g_, [&](std::size_t out, const std::vector<std::size_t>& in) {
            if (max_) {
                y.data[out] = in.empty() ? 0.0f : x.data[argmax(x, in)];
            } else {
                float sum = 0.0f;
                for (std::size_t i : in) sum += x.data[i];
                y.data[out] = sum / static_cast<float>(g_.kh * g_.kw);
            }
        });
        return y;
    }

    [[nodiscard]] std::vector<Tensor> backward(const StepContext&, const Tensor& dout,
                                               std::span<const Tensor* const> inputs, std::span<const float>,
                                               const Saved&, std::span<float>) const override {
        const Tensor& x = single_input(inputs, channels_ * g_.h * g_.w);
        std::vector<Tensor> dx;
        dx.emplace_back(x.shape);
        float* g = dx[0].data.data();
        for_each_window(x.rows() * channels_, g_, [&](std::size_t out, const std::vector<std::size_t>& in) {
            if (in.empty()) return;
            if (max_) {
                g[argmax(x, in)] += dout.data[out];
            } else {
                for (std::size_t i : in) g[i] += dout.data[out] / static_cast<float>(g_.kh * g_.kw);
            }
        });
        return dx;
    }

private:
    /// The first largest element of a window (ties go to the earliest, in row-major order).
    static std::size_t argmax(const Tensor& x, const std::vector<std::size_t>& in) {
        std::size_t best = in.front();
        for (std::size_t i : in)
            if (x.data[i] > x.data[best]) best = i;
        return best;
    }

    bool max_ = true;
    std::size_t channels_ = 0;
    Window g_;
};

}  // namespace

KernelPtr make_conv2d(const Model& model, std::size_t layer, Shard shard) {
    return std::make_unique<Conv2dKernel>(model, layer, shard);
}
KernelPtr make_batchnorm(const Model& model, std::size_t layer, Shard shard) {
    return std::make_unique<BatchNormKernel>(model, layer, shard);
}
KernelPtr make_pool(const Model& model, std::size_t layer, Shard shard) {
    return std::make_unique<PoolKernel>(model, layer, shard);
}

}  // namespace dpart::rt::cpu
