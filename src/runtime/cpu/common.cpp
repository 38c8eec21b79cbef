#include "common.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "blas.hpp"

namespace dpart::rt::cpu {
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


void unsupported(const Layer& layer, const std::string& what, const std::string& supported) {
    throw InputError(layer.where, fmt::format("layer \"{}\": {} has no CPU kernel in dpart run (supported: {})",
                                              layer.name, what, supported));
}

void bad_call(const std::string& layer, const std::string& message) {
    throw RuntimeError(fmt::format("layer \"{}\": {}", layer, message));
}

}  // namespace dpart::rt::cpu
