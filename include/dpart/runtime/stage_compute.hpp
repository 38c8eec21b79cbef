#pragma once
// What computes a worker's stage: its layers' training state, and forward and backward of one
// microbatch. The executor (schedule, transfers, collectives, timing) is the same whatever
// computes: the CPU kernels in host memory (make_cpu_stage), or the device layers on a
// DeviceOps (make_device_stage_factory: a GPU or a green-context partition through CUDA; the
// host DeviceOps in tests). Tensors cross stages, and gradients cross replicas, in host memory,
// unless the executor hands them over on the device (DeviceHandoff, DeviceComm).
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "dpart/graph/model.hpp"
#include "dpart/plan/plan.hpp"
#include "dpart/runtime/backend.hpp"
#include "dpart/runtime/device.hpp"
#include "dpart/runtime/optimizer.hpp"
#include "dpart/runtime/tensor.hpp"

namespace dpart::rt {

/// A layer's training state on one worker: its shard of the parameters and Adam's two moments
/// (the same layout as the parameters; under ZeRO-1, StageSetup::optimizer_part, only the
/// moments of the layer's values inside the part, in order: layer_part).
struct ShardState {
    std::vector<float> params, m, v;
};

/// Values [first, first + count) of a stage's parameters seen as one array (its layers' in stage
/// order, as its gradients: StageCompute::export_gradients).
struct ValueRange {
    std::size_t first = 0, count = 0;
    friend bool operator==(const ValueRange&, const ValueRange&) = default;
};
/// ZeRO-1: the part of a stage's `total` values whose optimizer state replica k of n keeps and
/// steps (group_part: the part group_reduce_scatter_sum sums on member k).
[[nodiscard]] ValueRange optimizer_part(std::size_t total, std::size_t replica, std::size_t replicas);
/// The values of `part` inside a layer holding values [base, base + size), relative to the layer.
[[nodiscard]] ValueRange layer_part(ValueRange part, std::size_t base, std::size_t size);

/// Where a worker sits. Ranks are numbered stage by stage, then replica, then tensor-parallel
/// rank: rank r runs plan.stages[stage].devices[replica * tp + tp_rank].
struct WorkerPlace {
    std::size_t stage = 0;
    std::size_t replica = 0;
    std::size_t tp_rank = 0;
    std::size_t device = 0;
};

/// Tensors of one microbatch by layer index (model_input: the model's input).
using TensorMap = std::map<std::size_t, Tensor>;
inline constexpr std::size_t model_input = static_cast<std::size_t>(-1);

/// The inputs a layer reads: its listed inputs, or the model input (layer 0) or the previous
/// layer's output.
[[nodiscard]] std::vector<std::size_t> inputs_of(const Model& model, std::size_t layer);
/// The shape of one sample of a layer's output as the kernels make it: its out_shape, or for an
/// opaque custom layer [out] (custom_geometry).
[[nodiscard]] std::vector<std::size_t> sample_shape(const Model& model, std::size_t layer);

/// Rows [from, to) of this worker's rows of some layers' tensors, packed layer after layer (in
/// the order of the step's layer list) in one device buffer: what device stages sharing memory
/// (RunOptions::memory_domain) hand each other instead of host tensors.
struct Parcel {
    DeviceSpan span;
    std::size_t from = 0, to = 0;
};
/// One step's exchange on the device. In: the parcels the neighbours handed over (the stage owns
/// them from then on), rows of `in_layers`; rows not in a parcel come as host tensors. Out: for
/// each row range of `out_rows`, a parcel of `out_layers` (zeros for a tensor the step did not
/// produce), made before the step returns and owned by whoever receives it.
struct DeviceHandoff {
    std::span<const std::size_t> in_layers;
    std::vector<Parcel> in;
    std::span<const std::size_t> out_layers;
    std::vector<std::pair<std::size_t, std::size_t>> out_rows;
    std::vector<Parcel> out;
};

class StageCompute {
public:
    virtual ~StageCompute() = default;
    /// Forward of the stage's layers for microbatch `mb` on `inputs` (the model input, or the
    /// layers received from the previous stage). Returns host tensors holding at least the
    /// outputs listed in `keep` that the stage has (computed or received), valid until
    /// backward(mb); keeps what backward needs.
    /// `rows` is the microbatch's samples on this worker. On the first stage, `inputs` holds the
    /// model input unless makes_model_input(). `device`: null, or (a device stage only) what
    /// came and goes on the device (DeviceHandoff).
    [[nodiscard]] virtual const TensorMap& forward(std::uint32_t mb, const StepContext& ctx, std::size_t rows,
                                                   TensorMap inputs, std::span<const std::size_t> keep,
                                                   DeviceHandoff* device) = 0;
    /// Whether the stage makes the model input itself (synthetic_input of ctx.first_sample and
    /// rows): a device stage keeps it on the device for the batches it sees again.
    [[nodiscard]] virtual bool makes_model_input() const { return false; }
    /// Backward for `mb` from the gradients of the stage's outputs: adds the parameter
    /// gradients, and returns (at least) the gradients of `want` (layers received from the
    /// previous stage) that reached them. Ends the microbatch. `device` as for forward.
    [[nodiscard]] virtual TensorMap backward(std::uint32_t mb, const StepContext& ctx, TensorMap grads,
                                             std::span<const std::size_t> want, DeviceHandoff* device) = 0;
    /// Every layer's gradients (stage order) in host memory, from pull_grads() until
    /// push_grads() writes them back (the CPU stage: its own storage, no copy).
    [[nodiscard]] virtual std::vector<std::vector<float>>& pull_grads() = 0;
    virtual void push_grads() = 0;
    /// The first n gradient values of one layer (stage-relative index), and back: what a tie
    /// across stages exchanges, without copying the other layers' gradients.
    [[nodiscard]] virtual std::vector<float> gradient(std::size_t layer, std::size_t n) = 0;
    virtual void set_gradient(std::size_t layer, std::span<const float> values) = 0;
    /// Device stages sharing memory (RunOptions::memory_domain) sum an embedding's and its tied
    /// head's gradients on the device (each holder adds a copy of the other's rows), seeing the
    /// stage's gradients as one array (its layers' in stage order). export_gradients: a copy of
    /// values [first, first + n) in a new buffer of the stage's memory, complete when it returns,
    /// owned by whoever receives it. import_gradients: values [first, first + from.count) become
    /// `from`'s (add: += `from`'s, element by element), then `from` is released. The CPU stage has
    /// no device memory: both throw RuntimeError.
    [[nodiscard]] virtual DeviceSpan export_gradients(std::size_t first, std::size_t n);
    /// A device stage's DeviceOps and compute precision (what its parcels are made of), for
    /// buffers the executor receives for it; the CPU stage has none (null ops).
    struct DeviceMemory {
        DeviceOps* ops = nullptr;
        Elem compute = Elem::f32;
        /// Bytes of its cache of the synthetic inputs and labels of the batches a run cycles
        /// through (a data loader's stand-in, not part of a plan's memory).
        std::uint64_t cached_bytes = 0;
    };
    [[nodiscard]] virtual DeviceMemory device_memory() { return {}; }
    virtual void import_gradients(DeviceSpan from, std::size_t first, bool add);
    /// Every gradient of the stage as one f32 array where it is kept on the device (the stage's
    /// own buffer, until the stage goes): a collective sums it in place, without a copy. Under
    /// ZeRO-1 the array is padded (with zeros) to replicas x the largest optimizer part, NCCL's
    /// layout for a reduce-scatter in place. Empty where the gradients are not one device array
    /// (the CPU stage).
    [[nodiscard]] virtual DeviceSpan gradients_in_place() { return {}; }
    /// The same for the fp32 master parameters (ZeRO-1's all-gather in place); after writing
    /// them there, refresh_compute_copy() brings the compute precision's copy up to date.
    [[nodiscard]] virtual DeviceSpan parameters_in_place() { return {}; }
    virtual void refresh_compute_copy() {}
    /// An embedding and the linear layer tied to it, both on this stage (stage-relative layer
    /// indices): each ends with the sum of both gradients of the first n values (embedding's +
    /// linear's), where they are kept (no copy to the host on a device).
    virtual void tie_gradients(std::size_t embedding, std::size_t linear, std::size_t n) = 0;
    /// A scenario slows the stage's device by `factor` from this iteration on (1: not slowed).
    /// Returns true when the stage realises the slowdown itself (a GPU partition shrunk to
    /// fewer SMs), so that the executor does not also wait it out; false (the default) when the
    /// executor should emulate it by waiting.
    virtual bool apply_slowdown(double /*factor*/) { return false; }
    /// One optimizer step (step counts from 1) of the values of its optimizer part (every value
    /// without ZeRO-1, StageSetup::optimizer_part); zeroes every gradient.
    virtual void step(const OptimizerOptions& o, std::uint64_t step) = 0;
    /// Values [first, first + n) of the stage's parameters (the fp32 master values), and back
    /// (the compute copy follows): what replicas exchange after a ZeRO-1 step.
    [[nodiscard]] virtual std::vector<float> parameters(std::size_t first, std::size_t n) = 0;
    virtual void set_parameters(std::size_t first, std::span<const float> values) = 0;
    /// The same on the device: values [first, first + from.count) become `from`'s, an f32 array
    /// of the same memory (another replica's master weights; the caller keeps `from`, which must
    /// stay unchanged until this stage's device has finished the work queued on it). The CPU
    /// stage has no device memory: it throws.
    virtual void import_parameters(DeviceSpan from, std::size_t first);
    /// Every layer's state in host memory, from pull_state() until push_state().
    [[nodiscard]] virtual std::vector<ShardState>& pull_state() = 0;
    virtual void push_state() = 0;
};

/// What a stage's compute is built from.
struct StageSetup {
    const Model* model = nullptr;
    const Stage* stage = nullptr;
    WorkerPlace place;
    std::uint64_t seed = 0;
    /// The initial state of the stage's layers, in order.
    std::vector<ShardState> state;
    /// Activation checkpointing (RunOptions::recompute).
    bool recompute = false;
    /// ZeRO-1 (RunOptions::shard_optimizer): the values whose optimizer state this worker keeps
    /// and steps; nullopt: all. `state` comes with whole moments; the stage keeps their part.
    std::optional<ValueRange> optimizer_part;
};
using StageFactory = std::function<std::unique_ptr<StageCompute>(StageSetup)>;

/// The CPU kernels' stage (fp32, host memory, tensor-parallel shards through ctx.tp).
[[nodiscard]] std::unique_ptr<StageCompute> make_cpu_stage(StageSetup setup);

}  // namespace dpart::rt
