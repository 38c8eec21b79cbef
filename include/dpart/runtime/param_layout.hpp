#pragma once
// A layer's parameters in their canonical order (PyTorch's), their tensor-parallel slices and
// their initial values: the one description both backends (the CPU kernels, the device layers
// of the CUDA backend) build their layers' parameters from, so that both start from the same
// values and a weights digest compares them.
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <vector>

#include "dpart/graph/model.hpp"
#include "dpart/graph/op.hpp"
#include "dpart/runtime/backend.hpp"

namespace dpart::rt {

/// How a parameter matrix is divided over a tensor-parallel group: not at all, in blocks of
/// rows (column-parallel weights, their biases) or in blocks of columns (row-parallel weights).
enum class Split { none, rows, cols };
/// Its initial values (docs/METHOD.md, "CPU kernels").
enum class Init { weight, zero, one, table };

/// A layer's parameters: matrices [rows, cols] one after another in the canonical order. A
/// shard holds its own block of each, in the same order.
class ParamLayout {
public:
    using Id = std::size_t;
    static constexpr Id absent = std::numeric_limits<Id>::max();

    explicit ParamLayout(Shard shard = {}) : shard_(shard) {}

    /// Appends a matrix; fan_in scales Init::weight.
    Id add(std::size_t rows, std::size_t cols, Split split, Init init, std::size_t fan_in = 1);
    /// add() when `present`, else `absent`.
    Id add_if(bool present, std::size_t rows, std::size_t cols, Split split, Init init);

    [[nodiscard]] Shard shard() const noexcept { return shard_; }
    [[nodiscard]] std::size_t full_size() const noexcept { return full_size_; }
    [[nodiscard]] std::size_t shard_size() const noexcept { return shard_size_; }

    void init(std::uint64_t seed, std::uint64_t stream, std::span<float> full) const;
    void to_shard(std::span<const float> full, std::span<float> shard) const;
    void from_shard(std::span<const float> shard, std::span<float> full) const;

    /// Where matrix `id`'s block starts in a shard-sized buffer, and how many values it has.
    [[nodiscard]] std::size_t shard_offset(Id id) const { return entries_.at(id).shard_offset; }
    [[nodiscard]] std::size_t shard_count(Id id) const;

    /// The shard's block of matrix `id` within shard-sized `params`; null for `absent`.
    [[nodiscard]] const float* at(std::span<const float> params, Id id) const;
    [[nodiscard]] float* at(std::span<float> params, Id id) const;

private:
    struct Entry {
        std::size_t rows, cols;
        Split split;
        Init init;
        std::size_t fan_in;
        std::size_t full_offset, shard_offset;
    };
    /// Calls f(full_index, shard_index, count) for each contiguous run of the shard's block.
    template <class F>
    void for_each_run(const Entry& e, F&& f) const;

    Shard shard_;
    std::vector<Entry> entries_;
    std::size_t full_size_ = 0;
    std::size_t shard_size_ = 0;
};

// --- Each op's parameters, in canonical order: the one definition both backends use --------

/// A linear layer: weight [out, in] (fan-in in), then its bias [out]; both split by rows
/// (column-parallel) when `split`.
struct LinearParams {
    ParamLayout::Id w = ParamLayout::absent, b = ParamLayout::absent;
};
LinearParams add_linear_params(ParamLayout& layout, std::size_t in, std::size_t out, bool bias, bool split);

/// An embedding: the token table, then learned positions and token types when present.
struct EmbeddingParams {
    ParamLayout::Id tok = ParamLayout::absent, pos = ParamLayout::absent, type = ParamLayout::absent;
};
EmbeddingParams add_embedding_params(ParamLayout& layout, const EmbeddingOp& op);

/// A convolution: weight [out, in / groups, kh, kw] (fan-in in / groups x kh x kw), then its
/// bias [out] (zeros).
struct Conv2dParams {
    ParamLayout::Id w = ParamLayout::absent, b = ParamLayout::absent;
    std::size_t fan_in = 0;
};
Conv2dParams add_conv2d_params(ParamLayout& layout, const Conv2dOp& op);

/// A norm: gamma (ones), then beta (zeros; layernorm with a bias only).
struct NormParams {
    ParamLayout::Id gamma = ParamLayout::absent, beta = ParamLayout::absent;
};
NormParams add_norm_params(ParamLayout& layout, NormKind kind, std::size_t features, bool bias);
/// Batch normalisation: gamma (ones), then beta (zeros), one per channel.
NormParams add_batchnorm_params(ParamLayout& layout, std::size_t channels);

/// Self-attention: Wq, Wk, Wv (column-parallel), their biases, Wo (row-parallel), bo.
struct AttentionParams {
    ParamLayout::Id wq, wk, wv, bq, bk, bv, wo, bo;
};
AttentionParams add_attention_params(ParamLayout& layout, const AttentionOp& op);

/// An MLP. Plain: up, b_up, down, b_down. Gated: gate, up, down, b_gate, b_up, b_down.
struct MlpParams {
    ParamLayout::Id gate = ParamLayout::absent, up = ParamLayout::absent, down = ParamLayout::absent;
    ParamLayout::Id bgate = ParamLayout::absent, bup = ParamLayout::absent, bdown = ParamLayout::absent;
};
MlpParams add_mlp_params(ParamLayout& layout, const MlpOp& op);

/// Throws InputError at the layer when `value` (its `what`) does not split over `shard`'s group.
void require_split(const Layer& layer, std::uint64_t value, std::string_view what, Shard shard);

/// A custom layer (an opaque profiled layer) runs y = x' W^T, W [out, k], x' each sample's input
/// (`row` values) repeated or cut to k: a real product of its declared forward FLOPs (2 out k).
/// out: its output shape's elements, else out_bytes / the dtype's bytes (at least 1); k: the
/// forward FLOPs / (2 out), at least 1; row: what its input has per sample (the model input's,
/// or k for a first layer without one).
struct CustomGeometry {
    std::size_t out = 0, k = 0, row = 0;
};
[[nodiscard]] CustomGeometry custom_geometry(const Model& model, std::size_t layer);
/// Its weight: [out, k] (fan-in k).
ParamLayout::Id add_custom_params(ParamLayout& layout, const CustomGeometry& g);

}  // namespace dpart::rt
