#include "dpart/runtime/param_layout.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include <fmt/format.h>

#include "dpart/core/error.hpp"
#include "dpart/runtime/tensor.hpp"

namespace dpart::rt {
namespace {

/// Embedding tables start uniform in [-a, a) with a = 0.02 * sqrt(3): standard deviation 0.02,
/// as GPT-2 initialises its tables (with a normal distribution).
constexpr float table_amplitude = 0.034641016f;

}  // namespace

ParamLayout::Id ParamLayout::add(std::size_t rows, std::size_t cols, Split split, Init init, std::size_t fan_in) {
    const std::size_t t = shard_.size;
    if ((split == Split::rows && rows % t != 0) || (split == Split::cols && cols % t != 0))
        throw std::logic_error("ParamLayout: a split that does not divide (checked by the kernel's factory)");
    const std::size_t full = rows * cols;
    const std::size_t mine = split == Split::none ? full : full / t;
    entries_.push_back(Entry{rows, cols, split, init, std::max<std::size_t>(fan_in, 1), full_size_, shard_size_});
    full_size_ += full;
    shard_size_ += mine;
    return entries_.size() - 1;
}

ParamLayout::Id ParamLayout::add_if(bool present, std::size_t rows, std::size_t cols, Split split, Init init) {
    return present ? add(rows, cols, split, init) : absent;
}

template <class F>
void ParamLayout::for_each_run(const Entry& e, F&& f) const {
    const std::size_t t = shard_.size;
    const std::size_t r = shard_.rank;
    switch (e.split) {
    case Split::none:
        f(e.full_offset, e.shard_offset, e.rows * e.cols);
        break;
    case Split::rows: {
        const std::size_t own = e.rows / t;
        f(e.full_offset + r * own * e.cols, e.shard_offset, own * e.cols);
        break;
    }
    case Split::cols: {
        const std::size_t own = e.cols / t;
        for (std::size_t i = 0; i < e.rows; ++i) f(e.full_offset + i * e.cols + r * own, e.shard_offset + i * own, own);
        break;
    }
    }
}

void ParamLayout::init(std::uint64_t seed, std::uint64_t stream, std::span<float> full) const {
    if (full.size() != full_size_) throw std::invalid_argument("ParamLayout::init: wrong size");
    for (const Entry& e : entries_) {
        const float scale = 1.0f / std::sqrt(static_cast<float>(e.fan_in));
        for (std::size_t j = e.full_offset; j < e.full_offset + e.rows * e.cols; ++j) {
            switch (e.init) {
            case Init::weight: full[j] = random_symmetric(seed, stream, j) * scale; break;
            case Init::table: full[j] = random_symmetric(seed, stream, j) * table_amplitude; break;
            case Init::zero: full[j] = 0.0f; break;
            case Init::one: full[j] = 1.0f; break;
            }
        }
    }
}

void ParamLayout::to_shard(std::span<const float> full, std::span<float> shard) const {
    if (full.size() != full_size_ || shard.size() != shard_size_)
        throw std::invalid_argument("ParamLayout::to_shard: wrong size");
    for (const Entry& e : entries_)
        for_each_run(e, [&](std::size_t f, std::size_t s, std::size_t n) {
            std::copy_n(full.begin() + static_cast<std::ptrdiff_t>(f), n, shard.begin() + static_cast<std::ptrdiff_t>(s));
        });
}

void ParamLayout::from_shard(std::span<const float> shard, std::span<float> full) const {
    if (full.size() != full_size_ || shard.size() != shard_size_)
        throw std::invalid_argument("ParamLayout::from_shard: wrong size");
    for (const Entry& e : entries_)
        for_each_run(e, [&](std::size_t f, std::size_t s, std::size_t n) {
            std::copy_n(shard.begin() + static_cast<std::ptrdiff_t>(s), n, full.begin() + static_cast<std::ptrdiff_t>(f));
        });
}

const float* ParamLayout::at(std::span<const float> params, Id id) const {
    if (id == absent) return nullptr;
    if (params.size() != shard_size_) throw std::invalid_argument("ParamLayout::at: parameters of the wrong size");
    return params.data() + entries_[id].shard_offset;
}

float* ParamLayout::at(std::span<float> params, Id id) const {
    if (id == absent) return nullptr;
    if (params.size() != shard_size_) throw std::invalid_argument("ParamLayout::at: gradients of the wrong size");
    return params.data() + entries_[id].shard_offset;
}

std::size_t ParamLayout::shard_count(Id id) const {
    const Entry& e = entries_.at(id);
    const std::size_t full = e.rows * e.cols;
    return e.split == Split::none ? full : full / shard_.size;
}

LinearParams add_linear_params(ParamLayout& layout, std::size_t in, std::size_t out, bool bias, bool split) {
    const Split rows = split ? Split::rows : Split::none;
    LinearParams p;
    p.w = layout.add(out, in, rows, Init::weight, in);
    p.b = layout.add_if(bias, out, 1, rows, Init::zero);
    return p;
}

EmbeddingParams add_embedding_params(ParamLayout& layout, const EmbeddingOp& op) {
    EmbeddingParams p;
    p.tok = layout.add(op.vocab, op.hidden, Split::none, Init::table);
    p.pos = layout.add_if(op.positions != 0, op.positions, op.hidden, Split::none, Init::table);
    p.type = layout.add_if(op.token_types != 0, op.token_types, op.hidden, Split::none, Init::table);
    return p;
}

Conv2dParams add_conv2d_params(ParamLayout& layout, const Conv2dOp& op) {
    Conv2dParams p;
    p.fan_in = op.in_channels / op.groups * op.kernel_h * op.kernel_w;
    p.w = layout.add(op.out_channels, p.fan_in, Split::none, Init::weight, p.fan_in);
    p.b = layout.add_if(op.bias, op.out_channels, 1, Split::none, Init::zero);
    return p;
}

NormParams add_batchnorm_params(ParamLayout& layout, std::size_t channels) {
    NormParams p;
    p.gamma = layout.add(channels, 1, Split::none, Init::one);
    p.beta = layout.add(channels, 1, Split::none, Init::zero);
    return p;
}

NormParams add_norm_params(ParamLayout& layout, NormKind kind, std::size_t features, bool bias) {
    NormParams p;
    p.gamma = layout.add(features, 1, Split::none, Init::one);
    p.beta = layout.add_if(kind == NormKind::layernorm && bias, features, 1, Split::none, Init::zero);
    return p;
}

AttentionParams add_attention_params(ParamLayout& layout, const AttentionOp& op) {
    const std::size_t h = op.hidden;
    const std::size_t q = op.heads * op.head_dim;
    const std::size_t kv = op.kv_heads * op.head_dim;
    AttentionParams p{};
    // Q, K and V are column-parallel (a rank's rows are its heads), the output row-parallel.
    p.wq = layout.add(q, h, Split::rows, Init::weight, h);
    p.wk = layout.add(kv, h, Split::rows, Init::weight, h);
    p.wv = layout.add(kv, h, Split::rows, Init::weight, h);
    p.bq = layout.add_if(op.qkv_bias, q, 1, Split::rows, Init::zero);
    p.bk = layout.add_if(op.qkv_bias, kv, 1, Split::rows, Init::zero);
    p.bv = layout.add_if(op.qkv_bias, kv, 1, Split::rows, Init::zero);
    p.wo = layout.add(h, q, Split::cols, Init::weight, q);
    p.bo = layout.add_if(op.bias, h, 1, Split::none, Init::zero);
    return p;
}

MlpParams add_mlp_params(ParamLayout& layout, const MlpOp& op) {
    const std::size_t f = op.ffn_hidden, h = op.hidden;
    MlpParams p;
    if (op.kind == MlpKind::gated) {
        p.gate = layout.add(f, h, Split::rows, Init::weight, h);
        p.up = layout.add(f, h, Split::rows, Init::weight, h);
        p.down = layout.add(h, f, Split::cols, Init::weight, f);
        p.bgate = layout.add_if(op.bias, f, 1, Split::rows, Init::zero);
        p.bup = layout.add_if(op.bias, f, 1, Split::rows, Init::zero);
        p.bdown = layout.add_if(op.bias, h, 1, Split::none, Init::zero);
    } else {
        p.up = layout.add(f, h, Split::rows, Init::weight, h);
        p.bup = layout.add_if(op.bias, f, 1, Split::rows, Init::zero);
        p.down = layout.add(h, f, Split::cols, Init::weight, f);
        p.bdown = layout.add_if(op.bias, h, 1, Split::none, Init::zero);
    }
    return p;
}

void require_split(const Layer& layer, std::uint64_t value, std::string_view what, Shard shard) {
    if (value % shard.size != 0)
        throw InputError(layer.where, fmt::format("layer \"{}\": {} {} does not split over a tensor-parallel group of {} "
                                                  "(it must be a multiple of tp)",
                                                  layer.name, what, value, shard.size));
}

CustomGeometry custom_geometry(const Model& model, std::size_t layer) {
    const Layer& l = model.layers.at(layer);
    const auto& op = std::get<CustomOp>(l.op);
    CustomGeometry g;
    g.out = !op.out_shape.empty() ? element_count(op.out_shape)
                                  : std::max<std::size_t>(1, op.out_bytes / dtype_bytes(model.dtype));
    const double out = static_cast<double>(g.out);
    g.k = std::max<std::size_t>(1, static_cast<std::size_t>(std::llround(static_cast<double>(op.fwd_flops) / (2.0 * out))));
    if (l.inputs.empty()) {
        g.row = !model.input_shape.empty() ? element_count(model.input_shape) : g.k;
    } else {
        const Layer& src = model.layers.at(l.inputs.front());
        g.row = !src.out_shape.empty()                  ? element_count(src.out_shape)
                : std::holds_alternative<CustomOp>(src.op) ? custom_geometry(model, l.inputs.front()).out
                                                           : 0;
    }
    return g;
}

ParamLayout::Id add_custom_params(ParamLayout& layout, const CustomGeometry& g) {
    return layout.add(g.out, g.k, Split::none, Init::weight, g.k);
}

}  // namespace dpart::rt
