#include "common.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "blas.hpp"

namespace dpart::rt::cpu {
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

Kernel::Kernel(const Model& model, std::size_t layer, Shard shard)
    : layout_(shard), index_(layer), shard_(shard), name_(model.layers.at(layer).name),
      out_shape_(model.layers.at(layer).out_shape) {}

void Kernel::init(std::uint64_t seed, std::span<float> full) const {
    layout_.init(seed, stream_of(Stream::weight, index_), full);
}

void Kernel::to_shard(std::span<const float> full, std::span<float> shard) const { layout_.to_shard(full, shard); }

void Kernel::from_shard(std::span<const float> shard, std::span<float> full) const {
    layout_.from_shard(shard, full);
}

Tensor Kernel::output(std::size_t n) const {
    std::vector<std::size_t> shape{n};
    shape.insert(shape.end(), out_shape_.begin(), out_shape_.end());
    return Tensor(std::move(shape));
}

const Tensor& Kernel::single_input(std::span<const Tensor* const> inputs, std::size_t row_size) const {
    if (inputs.size() != 1 || inputs[0] == nullptr)
        bad_call(name_, fmt::format("expects one input, got {}", inputs.size()));
    const Tensor& x = *inputs[0];
    if (row_size != 0 && x.rows() != 0 && x.row_size() != row_size)
        bad_call(name_, fmt::format("expects {} elements per sample, got {}", row_size, x.row_size()));
    return x;
}

void allreduce(const StepContext& ctx, Shard shard, std::span<float> data) {
    if (shard.size == 1) return;
    if (ctx.tp == nullptr) throw RuntimeError("a tensor-parallel shard ran without its group (StepContext::tp)");
    ctx.tp->allreduce_sum(data);
}

void allgather(const StepContext& ctx, Shard shard, std::span<const float> mine, std::span<float> all) {
    if (shard.size == 1) {
        std::copy(mine.begin(), mine.end(), all.begin());
        return;
    }
    if (ctx.tp == nullptr) throw RuntimeError("a tensor-parallel shard ran without its group (StepContext::tp)");
    ctx.tp->allgather(mine, all);
}

void add_bias(float* y, std::size_t rows, std::size_t cols, const float* b) {
    if (b == nullptr) return;
    for (std::size_t r = 0; r < rows; ++r)
        for (std::size_t j = 0; j < cols; ++j) y[r * cols + j] += b[j];
}

void add_column_sums(const float* dy, std::size_t rows, std::size_t cols, float* db) {
    if (db == nullptr) return;
    for (std::size_t r = 0; r < rows; ++r)
        for (std::size_t j = 0; j < cols; ++j) db[j] += dy[r * cols + j];
}

void add_into(std::span<float> dst, std::span<const float> src) {
    for (std::size_t i = 0; i < dst.size(); ++i) dst[i] += src[i];
}

void dense_forward(const float* x, std::size_t rows, std::size_t in, const float* w, const float* b, std::size_t out,
                   float* y) {
    gemm(Op::none, Op::trans, rows, out, in, 1.0f, x, in, w, in, 0.0f, y, out);
    add_bias(y, rows, out, b);
}

void dense_backward(const float* x, const float* dy, std::size_t rows, std::size_t in, std::size_t out,
                    const float* w, float* dw, float* db, float* dx, float dx_beta) {
    gemm(Op::trans, Op::none, out, in, rows, 1.0f, dy, out, x, in, 1.0f, dw, in);
    add_column_sums(dy, rows, out, db);
    if (dx != nullptr) gemm(Op::none, Op::none, rows, in, out, 1.0f, dy, out, w, in, dx_beta, dx, in);
}

float activate(Activation a, float x) noexcept {
    switch (a) {
    case Activation::relu: return x > 0.0f ? x : 0.0f;
    case Activation::gelu: return 0.5f * x * (1.0f + std::erf(x * 0.70710678f));
    case Activation::silu: return x / (1.0f + std::exp(-x));
    }
    return x;
}

float activate_grad(Activation a, float x) noexcept {
    switch (a) {
    case Activation::relu: return x > 0.0f ? 1.0f : 0.0f;
    case Activation::gelu: {
        const float cdf = 0.5f * (1.0f + std::erf(x * 0.70710678f));
        const float pdf = 0.39894228f * std::exp(-0.5f * x * x);
        return cdf + x * pdf;
    }
    case Activation::silu: {
        const float s = 1.0f / (1.0f + std::exp(-x));
        return s * (1.0f + x * (1.0f - s));
    }
    }
    return 1.0f;
}

void require_split(const Layer& layer, std::uint64_t value, std::string_view what, Shard shard) {
    if (value % shard.size != 0)
        throw InputError(layer.where, fmt::format("layer \"{}\": {} {} does not split over a tensor-parallel group of {} "
                                                  "(it must be a multiple of tp)",
                                                  layer.name, what, value, shard.size));
}

void unsupported(const Layer& layer, const std::string& what, const std::string& supported) {
    throw InputError(layer.where, fmt::format("layer \"{}\": {} has no CPU kernel in dpart run (supported: {})",
                                              layer.name, what, supported));
}

void bad_call(const std::string& layer, const std::string& message) {
    throw RuntimeError(fmt::format("layer \"{}\": {}", layer, message));
}

}  // namespace dpart::rt::cpu
