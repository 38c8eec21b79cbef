#pragma once
// What executes one layer: its parameters' canonical layout, their deterministic initial
// values, and forward and backward on a batch of samples. The CPU backend (fp32 through
// OpenBLAS) implements it here; the CUDA backend will implement the same interface.
//
// A layer of a tensor-parallel stage is built for one shard (rank r of a group of t): it holds
// only its part of the parameters and calls the group's collectives where Megatron's column /
// row split needs them (forward all-reduce after a row-parallel product, backward all-reduce of
// the input gradient of a column-parallel one). Layers with no split (norms, embeddings,
// element-wise ops, the loss) hold the whole parameters on every rank and compute the same
// values there.
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "dpart/graph/model.hpp"
#include "dpart/runtime/tensor.hpp"

namespace dpart::rt {

/// Where a layer sits in its stage's tensor-parallel group.
struct Shard {
    std::uint32_t rank = 0;
    std::uint32_t size = 1;
};

/// Collectives within a tensor-parallel group. Every rank calls them in the same order with
/// buffers of the same size; results are identical on every rank (sums taken in rank order).
class GroupComm {
public:
    virtual ~GroupComm() = default;
    virtual void allreduce_sum(std::span<float> data) = 0;
    /// Concatenates every rank's `mine` (all the same size) in rank order into `all`.
    virtual void allgather(std::span<const float> mine, std::span<float> all) = 0;
};

/// What a layer's forward keeps for its backward, beyond its inputs (which the caller keeps).
struct Saved {
    std::vector<Tensor> tensors;
};

class DeviceGroup;

struct StepContext {
    std::uint64_t seed = 0;
    /// Global index of the batch's first sample (iteration * global_batch + offset): labels
    /// and dropout masks are drawn from it, so they do not depend on how samples are split.
    std::uint64_t first_sample = 0;
    /// The stage's tensor-parallel group; null when the shard size is 1.
    GroupComm* tp = nullptr;
    /// The same group on the devices (a device communicator), when there is one: device stages
    /// then sum and gather there instead of through host memory.
    DeviceGroup* device_tp = nullptr;
};

class LayerKernel {
public:
    virtual ~LayerKernel() = default;
    /// Parameters of the whole layer in its canonical layout (PyTorch's: a linear's weight is
    /// [out, in] row-major, then its bias).
    [[nodiscard]] virtual std::size_t full_params() const = 0;
    /// Parameters this shard holds (full_params() when the layer is not split).
    [[nodiscard]] virtual std::size_t shard_params() const = 0;
    /// Writes the whole layer's initial values: a pure function of (seed, layer index).
    virtual void init(std::uint64_t seed, std::span<float> full) const = 0;
    /// This shard's part of `full`, and back (from_shard writes only this shard's part).
    virtual void to_shard(std::span<const float> full, std::span<float> shard) const = 0;
    virtual void from_shard(std::span<const float> shard, std::span<float> full) const = 0;
    /// Forward on a batch: inputs[i] is [n, ...] for the layer's i-th input (the model input for
    /// the first layer); returns [n, ...out_shape].
    [[nodiscard]] virtual Tensor forward(const StepContext& ctx, std::span<const Tensor* const> inputs,
                                         std::span<const float> params, Saved& saved) const = 0;
    /// Backward: adds the parameter gradients into `dparams` (shard-sized) and returns the
    /// gradient of each input, shaped like it.
    [[nodiscard]] virtual std::vector<Tensor> backward(const StepContext& ctx, const Tensor& dout,
                                                       std::span<const Tensor* const> inputs,
                                                       std::span<const float> params, const Saved& saved,
                                                       std::span<float> dparams) const = 0;
};

/// The CPU kernel of `model.layers[layer]` for one shard. Throws InputError at the layer's
/// location when the op has no CPU kernel or does not split over shard.size.
[[nodiscard]] std::unique_ptr<LayerKernel> make_cpu_kernel(const Model& model, std::size_t layer, Shard shard = {});

/// The model input for samples [first, first + n): token ids (as exact floats) when the first
/// layer is an embedding, otherwise values uniform in [-1, 1).
[[nodiscard]] Tensor synthetic_input(const Model& model, std::uint64_t seed, std::uint64_t first, std::size_t n);

/// What the labels of softmax_xent layer `layer` are drawn over: its classes (`classes`, else
/// its input's last dimension) and the positions per sample its input holds.
struct LossShape {
    std::size_t classes = 0;
    std::size_t positions = 0;
};
[[nodiscard]] LossShape loss_shape(const Model& model, std::size_t layer);

/// Readies this process for CPU workers, once before they start:
/// - OpenBLAS single-threaded: each worker owns a core, and results do not depend on how many
///   threads a product was split over;
/// - freed memory kept by the process (glibc's mallopt: no mmap below 256 MiB, no trimming, one
///   arena), so that a microbatch's tensors reuse the last one's pages. Otherwise a tensor can
///   be a fresh mapping whose first touch faults page by page: on this virtual machine that
///   costs 3 ms per MiB, more than the layer's arithmetic (docs/METHOD.md).
void prepare_cpu_workers();

}  // namespace dpart::rt
