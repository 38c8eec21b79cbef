#pragma once
// The device backend's two halves, both free of CUDA headers:
//
// - DeviceOps: everything a layer does to a device's memory (allocate, copy, matrix products,
//   the element-wise, norm, softmax, embedding and loss kernels, the optimizer), enqueued in
//   order. The CUDA implementation (runtime/cuda) runs them on one stream of one GPU or
//   green-context partition, through cuBLAS and dpart's kernels; the host implementation runs
//   the same operations on the CPU, so that every layer's composition is tested without a GPU.
// - DeviceLayer: a model layer's forward and backward written once over DeviceOps, with the
//   CPU kernels' parameter layout (ParamLayout), initial values and math: in fp32 a device
//   layer agrees with the CPU kernel (tests/runtime/test_device_layers.cpp).
//
// Activations are kept in the compute precision (fp32 or bf16); parameters have an fp32 master
// copy (what the optimizer updates, and what biases, norms and embeddings read) and a copy in
// the compute precision (what the matrix products read); gradients are fp32.
#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "dpart/graph/model.hpp"
#include "dpart/runtime/backend.hpp"
#include "dpart/runtime/optimizer.hpp"
#include "dpart/runtime/window.hpp"

namespace dpart::rt {

enum class Elem : std::uint8_t { f32, bf16, i32 };
[[nodiscard]] constexpr std::size_t elem_bytes(Elem e) noexcept { return e == Elem::bf16 ? 2 : 4; }
[[nodiscard]] const char* to_string(Elem e) noexcept;
/// The device layers' compute precision: `precision` ("fp32" or "bf16", as --precision gives
/// it), else the model's dtype (bf16 and fp16 models compute in bf16).
[[nodiscard]] Elem compute_precision(std::string_view precision, DType model_dtype) noexcept;

/// `count` elements of type `elem` at `ptr`, in the memory of the DeviceOps that made it.
struct DeviceSpan {
    void* ptr = nullptr;
    std::size_t count = 0;
    Elem elem = Elem::f32;

    [[nodiscard]] std::size_t bytes() const noexcept { return count * elem_bytes(elem); }
    /// Elements [first, first + n); throws std::out_of_range beyond the span.
    [[nodiscard]] DeviceSpan sub(std::size_t first, std::size_t n) const;
};

enum class Trans : std::uint8_t { none, trans };

/// The bytes one worker's device allocations hold: what it allocated less what it released, a
/// buffer handed to another worker's DeviceOps counted from then on where it went (the executor
/// moves it: DeviceOps::meter()->add), and the peak of that. Safe from any thread.
class MemoryMeter {
public:
    void add(std::int64_t bytes) noexcept {
        const std::int64_t now = now_.fetch_add(bytes) + bytes;
        std::int64_t peak = peak_.load();
        while (now > peak && !peak_.compare_exchange_weak(peak, now)) {
        }
    }
    [[nodiscard]] std::int64_t now() const noexcept { return now_.load(); }
    [[nodiscard]] std::int64_t peak() const noexcept { return peak_.load(); }
    /// Starts a new peak from the bytes held now (to measure one call's high-water mark).
    void reset_peak() noexcept { peak_.store(now_.load()); }

private:
    std::atomic<std::int64_t> now_{0}, peak_{0};
};
/// What an allocation of `span` takes (at least one element).
[[nodiscard]] inline std::int64_t allocation_bytes(const DeviceSpan& span) noexcept {
    return static_cast<std::int64_t>(std::max<std::size_t>(span.count, 1) * elem_bytes(span.elem));
}

class DeviceOps {
public:
    virtual ~DeviceOps() = default;
    [[nodiscard]] virtual std::string name() const = 0;

    // --- memory --------------------------------------------------------------------------
    /// `count` elements, zero-filled. Throws RuntimeError when the device is out of memory.
    [[nodiscard]] virtual DeviceSpan allocate(std::size_t count, Elem elem) = 0;
    /// `count` elements with any values: for a buffer the next operation overwrites entirely
    /// (a product with beta = 0, a kernel's output). Saves the zero-fill of allocate().
    [[nodiscard]] virtual DeviceSpan allocate_uninitialized(std::size_t count, Elem elem) { return allocate(count, elem); }
    virtual void release(DeviceSpan span) noexcept = 0;
    /// Its allocations' meter (null where they are not measured).
    [[nodiscard]] virtual MemoryMeter* meter() noexcept { return nullptr; }
    /// Host values into the span (rounded to bf16, or integers for i32); sizes must match.
    virtual void upload(std::span<const float> from, DeviceSpan to) = 0;
    /// The span's values as floats; waits for the work queued before it.
    virtual void download(DeviceSpan from, std::span<float> to) = 0;
    /// to = from, converting between f32 and bf16.
    virtual void copy(DeviceSpan from, DeviceSpan to) = 0;
    /// Rows of a matrix into rows of another: to[r * to_ld + c] = from[r * from_ld + c] for
    /// r < rows, c < cols (one element type). The default copies row by row; a GPU does one
    /// strided copy (cudaMemcpy2DAsync).
    virtual void copy_2d(DeviceSpan from, std::size_t from_ld, DeviceSpan to, std::size_t to_ld, std::size_t rows,
                         std::size_t cols);
    virtual void fill(DeviceSpan span, float value) = 0;
    /// to += from, element-wise.
    virtual void add(DeviceSpan from, DeviceSpan to) = 0;
    /// out = a * b, element-wise.
    virtual void mul(DeviceSpan a, DeviceSpan b, DeviceSpan out) = 0;
    /// Waits for everything queued.
    virtual void synchronize() = 0;
    /// Makes the device `factor` times slower for real, if it can (a green-context partition
    /// moves to fewer SMs: sm_partition's shrunk_sms; a factor <= 1 restores it) and returns the
    /// slowdown it now has; a device that cannot be resized returns 1 and is left as it is.
    virtual double resize(double /*factor*/) { return 1.0; }

    // --- matrix products (row-major, as cpu::gemm) -----------------------------------------
    /// C = alpha op(A) op(B) + beta C: op(A) [m, k], op(B) [k, n], C [m, n]; lda, ldb, ldc are the
    /// row strides as stored. A and B have one type; C has theirs or f32 (fp32 accumulation).
    virtual void gemm(Trans ta, Trans tb, std::size_t m, std::size_t n, std::size_t k, float alpha, DeviceSpan a,
                      std::size_t lda, DeviceSpan b, std::size_t ldb, float beta, DeviceSpan c, std::size_t ldc) = 0;
    /// `batch` products, the i-th on A + i stride_a, B + i stride_b, C + i stride_c (elements).
    virtual void gemm_batched(Trans ta, Trans tb, std::size_t m, std::size_t n, std::size_t k, float alpha,
                              DeviceSpan a, std::size_t lda, std::size_t stride_a, DeviceSpan b, std::size_t ldb,
                              std::size_t stride_b, float beta, DeviceSpan c, std::size_t ldc, std::size_t stride_c,
                              std::size_t batch) = 0;

    // --- layers' kernels -------------------------------------------------------------------
    /// y[r, :] += bias (f32) for `rows` rows of `cols`.
    virtual void bias_add(DeviceSpan y, DeviceSpan bias, std::size_t rows, std::size_t cols) = 0;
    /// dbias[c] += sum over rows of dy[r, c], rows in order.
    virtual void column_sums(DeviceSpan dy, DeviceSpan dbias, std::size_t rows, std::size_t cols) = 0;
    virtual void activation_forward(Activation a, DeviceSpan x, DeviceSpan y) = 0;
    /// dx = dy * activation'(x).
    virtual void activation_backward(Activation a, DeviceSpan x, DeviceSpan dy, DeviceSpan dx) = 0;
    /// y = norm(x) * gamma (+ beta) per row of f; stats [rows, 2] = (mean or 0, 1 / std).
    virtual void norm_forward(NormKind kind, DeviceSpan x, DeviceSpan gamma, std::optional<DeviceSpan> beta,
                              DeviceSpan y, DeviceSpan stats, std::size_t rows, std::size_t f) = 0;
    /// dx = the input gradient; dgamma (and dbeta) += the parameter gradients.
    virtual void norm_backward(NormKind kind, DeviceSpan x, DeviceSpan gamma, DeviceSpan stats, DeviceSpan dy,
                               DeviceSpan dx, DeviceSpan dgamma, std::optional<DeviceSpan> dbeta, std::size_t rows,
                               std::size_t f) = 0;
    /// Batch normalisation of x [samples, channels, plane]: per channel, the mean and variance
    /// over its samples x plane values (eps 1e-5); y = (x - mean) / std * gamma + beta (f32
    /// parameters); stats [channels, 2] = (mean, 1 / std).
    virtual void batchnorm_forward(DeviceSpan x, DeviceSpan gamma, DeviceSpan beta, DeviceSpan y, DeviceSpan stats,
                                   std::size_t samples, std::size_t channels, std::size_t plane) = 0;
    /// dx = the input gradient; dgamma and dbeta (f32) += the parameter gradients.
    virtual void batchnorm_backward(DeviceSpan x, DeviceSpan gamma, DeviceSpan stats, DeviceSpan dy, DeviceSpan dx,
                                    DeviceSpan dgamma, DeviceSpan dbeta, std::size_t samples, std::size_t channels,
                                    std::size_t plane) = 0;
    /// loss[r] (f32) = log-sum-exp(logits[r]) - logits[r, labels[r]] (labels i32).
    virtual void softmax_xent_forward(DeviceSpan logits, DeviceSpan labels, DeviceSpan loss, std::size_t rows,
                                      std::size_t classes) = 0;
    /// dlogits = scale (softmax(logits) - onehot(labels)).
    virtual void softmax_xent_backward(DeviceSpan logits, DeviceSpan labels, float scale, DeviceSpan dlogits,
                                       std::size_t rows, std::size_t classes) = 0;
    /// out[t] = table[ids[t]] (table f32, ids i32) for n tokens of dim.
    virtual void embedding_forward(DeviceSpan ids, DeviceSpan table, DeviceSpan out, std::size_t n,
                                   std::size_t dim) = 0;
    /// dtable[ids[t]] += dout[t], tokens in order.
    virtual void embedding_backward(DeviceSpan ids, DeviceSpan dout, DeviceSpan dtable, std::size_t n,
                                    std::size_t dim) = 0;
    /// embedding_backward with the tokens already grouped by id (group_tokens' packed layout, i32:
    /// `groups` unique ids, groups + 1 offsets, then the token positions): the same sums in the
    /// same order, without looking at the ids (on a GPU, no copy to the host and no wait). The
    /// caller has checked that every id is within the table.
    virtual void embedding_backward_grouped(DeviceSpan grouping, std::size_t groups, DeviceSpan dout,
                                            DeviceSpan dtable, std::size_t n, std::size_t dim) = 0;
    /// Mixtures of experts move rows between tokens and their experts' slots (runtime/moe.hpp).
    /// dst[i, :] = src[index[i], :] for n rows of `cols` (index i32; src and dst one type).
    virtual void gather_rows(DeviceSpan src, DeviceSpan index, DeviceSpan dst, std::size_t n, std::size_t cols) = 0;
    /// dst[r, :] = (accumulate ? dst[r, :] : 0) + the sum over j < k, in order, of
    /// weight[r k + j] x src[index[r k + j], :] (weight f32, or none: 1), in fp32; index i32.
    virtual void gather_sum_rows(DeviceSpan src, DeviceSpan index, std::optional<DeviceSpan> weight, DeviceSpan dst,
                                 std::size_t rows, std::size_t k, std::size_t cols, bool accumulate) = 0;
    /// out[r] (f32) = the sum over c of a[r, c] x b[r, c] (fp32, in a fixed order: in index
    /// order on the host, a fixed tree on a GPU). a and b have one element type.
    virtual void row_dots(DeviceSpan a, DeviceSpan b, DeviceSpan out, std::size_t rows, std::size_t cols) = 0;
    /// x[r, :] *= scale[r] (f32).
    virtual void scale_rows(DeviceSpan x, DeviceSpan scale, std::size_t rows, std::size_t cols) = 0;
    /// Row i of each [s, s] block of scores (batch_heads blocks): scale, then softmax over the
    /// columns <= i (all columns when not causal); the others become 0. In place.
    virtual void attention_softmax_forward(DeviceSpan scores, std::size_t batch_heads, std::size_t s, float scale,
                                           bool causal) = 0;
    /// In: the probabilities and dprobs; out: dscores (the gradient of the scores before the
    /// scale, times the scale), in place of dprobs.
    virtual void attention_softmax_backward(DeviceSpan probs, DeviceSpan dprobs, std::size_t batch_heads,
                                            std::size_t s, float scale) = 0;
    /// cols [samples, channels x kh x kw, oh x ow]: for each sample of x [samples, total, h, w], the
    /// receptive fields of its channels [first, first + channels), one column per output position
    /// (zeros in the padding). x and cols have one element type.
    virtual void im2col(DeviceSpan x, std::size_t samples, std::size_t total, std::size_t first,
                        std::size_t channels, const Window2d& g, DeviceSpan cols) = 0;
    /// The adjoint of im2col: each column entry added into its element of dx (same layout as x).
    virtual void col2im(DeviceSpan cols, std::size_t samples, std::size_t total, std::size_t first,
                        std::size_t channels, const Window2d& g, DeviceSpan dx) = 0;
    /// A convolution by the device's own library (cuDNN on a GPU), over every sample at once:
    /// x [samples, in, h, w], w [out, in / groups, kh, kw], y [samples, out, oh, ow], all of one
    /// element type. Forward: y = the convolution (no bias). Backward data: dx = its adjoint of dy.
    /// Backward filter: dw (f32) += the weight gradient. Each returns false, doing nothing, when
    /// the device has no such convolution for these types (the host's never has): the layer then
    /// uses im2col and products.
    struct Conv {
        std::size_t samples = 0, in = 0, out = 0, groups = 1;
        Window2d g;
    };
    virtual bool conv2d_forward(const Conv& /*c*/, DeviceSpan /*x*/, DeviceSpan /*w*/, DeviceSpan /*y*/) {
        return false;
    }
    virtual bool conv2d_backward_data(const Conv& /*c*/, DeviceSpan /*dy*/, DeviceSpan /*w*/, DeviceSpan /*dx*/) {
        return false;
    }
    virtual bool conv2d_backward_filter(const Conv& /*c*/, DeviceSpan /*x*/, DeviceSpan /*dy*/, DeviceSpan /*dw*/) {
        return false;
    }
    /// y [planes, oh, ow] from x [planes, h, w]: each window's first largest element (padding
    /// ignored; an empty window gives 0), or its sum divided by kh x kw (padding counted).
    virtual void pool_forward(bool max, DeviceSpan x, DeviceSpan y, std::size_t planes, const Window2d& g) = 0;
    /// dx += the gradient: to each window's first largest input (max), or dy / (kh x kw) to
    /// every input of the window (average), windows in row-major order.
    virtual void pool_backward(bool max, DeviceSpan x, DeviceSpan dy, DeviceSpan dx, std::size_t planes,
                               const Window2d& g) = 0;
    /// One optimizer step on f32 params with f32 gradients; m and v are Adam's moments (unused
    /// by SGD). `step` counts from 1.
    virtual void optimizer_step(const OptimizerOptions& opt, std::uint64_t step, DeviceSpan params, DeviceSpan grads,
                                DeviceSpan m, DeviceSpan v) = 0;
};

/// A tensor-parallel group's collectives on a device's buffers, in the group's order (what the
/// CPU kernels do through StepContext::tp, on the device layers' tensors).
class DeviceGroup {
public:
    virtual ~DeviceGroup() = default;
    /// data becomes the sum over the group (every member the same values).
    virtual void allreduce_sum(DeviceOps& ops, DeviceSpan data) = 0;
    /// all = every member's `mine` (all the same size) in rank order.
    virtual void allgather(DeviceOps& ops, DeviceSpan mine, DeviceSpan all) = 0;
};
/// Through the host: download, the GroupComm's collective on floats (group_allreduce_sum's
/// bitwise sum), upload.
class HostStagedGroup final : public DeviceGroup {
public:
    explicit HostStagedGroup(GroupComm& group) : group_(&group) {}
    void allreduce_sum(DeviceOps& ops, DeviceSpan data) override;
    void allgather(DeviceOps& ops, DeviceSpan mine, DeviceSpan all) override;

private:
    GroupComm* group_;
};

/// A DeviceSpan that releases itself.
class DeviceBuffer {
public:
    /// Tag: the buffer's first values do not matter (DeviceOps::allocate_uninitialized).
    struct Uninitialized {};
    static constexpr Uninitialized uninitialized{};

    DeviceBuffer() = default;
    /// Zero-filled.
    DeviceBuffer(DeviceOps& ops, std::size_t count, Elem elem) : ops_(&ops), span_(ops.allocate(count, elem)) {}
    DeviceBuffer(DeviceOps& ops, std::size_t count, Elem elem, Uninitialized)
        : ops_(&ops), span_(ops.allocate_uninitialized(count, elem)) {}
    /// Takes over `span`, which `ops` may release: its own allocation, or one of another
    /// DeviceOps sharing its memory (a device buffer handed over between stages).
    [[nodiscard]] static DeviceBuffer adopt(DeviceOps& ops, DeviceSpan span) {
        DeviceBuffer b;
        b.ops_ = &ops;
        b.span_ = span;
        return b;
    }
    /// Gives up the span without releasing it (whoever takes it releases it).
    [[nodiscard]] DeviceSpan release_ownership() noexcept {
        const DeviceSpan s = span_;
        span_ = {};
        return s;
    }
    DeviceBuffer(DeviceBuffer&& o) noexcept : ops_(o.ops_), span_(o.span_) { o.span_ = {}; }
    DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
        if (this != &o) {
            reset();
            ops_ = o.ops_;
            span_ = o.span_;
            o.span_ = {};
        }
        return *this;
    }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    ~DeviceBuffer() { reset(); }

    [[nodiscard]] const DeviceSpan& span() const noexcept { return span_; }
    [[nodiscard]] std::size_t count() const noexcept { return span_.count; }
    void reset() noexcept {
        if (ops_ != nullptr && span_.ptr != nullptr) ops_->release(span_);
        span_ = {};
    }

private:
    DeviceOps* ops_ = nullptr;
    DeviceSpan span_;
};

/// The DeviceOps of the host: the same operations on the CPU (products through OpenBLAS), bf16
/// kept as bf16 (rounded to nearest even on every store), so that device layers run and are
/// tested on any machine.
[[nodiscard]] std::unique_ptr<DeviceOps> make_host_ops();

/// A layer's parameters as a device layer reads them: the fp32 master copy and the copy in the
/// compute precision (the same span in fp32).
struct DeviceParams {
    DeviceSpan master;
    DeviceSpan compute;
};

/// Token ids grouped by id, for embedding_backward_grouped: the unique ids in increasing order,
/// then each group's first position in `positions` (and the end), then the positions of each
/// group's tokens in token order, all in one array (i32 values, as floats for upload). `groups`
/// is the number of unique ids. Throws InputError on a negative id or 2^24 tokens or more.
struct TokenGroups {
    std::vector<float> packed;
    std::size_t groups = 0;
};
[[nodiscard]] TokenGroups group_tokens(std::span<const float> ids);

/// What a step gives the layers: the labels of the loss (i32, one per position of each sample),
/// the scale of the loss gradient (1 / global batch), and what dropout masks are drawn from
/// (the run's seed and the global index of the step's first sample, as StepContext).
struct DeviceStep {
    DeviceSpan labels;
    float loss_scale = 1.0f;
    std::uint64_t seed = 0;
    std::uint64_t first_sample = 0;
    /// The model input's tokens grouped by id (group_tokens, uploaded), when the stage has them:
    /// the embedding's backward then needs no look at the ids.
    DeviceSpan token_groups;
    std::size_t token_group_count = 0;
    /// The stage's tensor-parallel group (null with tp = 1): split layers' collectives.
    DeviceGroup* tp = nullptr;
};

class DeviceLayer {
public:
    virtual ~DeviceLayer() = default;
    /// Parameters in the CPU kernel's canonical layout (initial values: make_cpu_kernel's init);
    /// a shard's own (the CPU kernel's shard layout) when the layer is split.
    [[nodiscard]] virtual std::size_t params() const noexcept = 0;
    /// Elements per sample of the output.
    [[nodiscard]] virtual std::size_t out_row() const noexcept = 0;
    /// Forward on n samples: inputs[i] is [n, ...] in the compute precision (i32 token ids for
    /// an embedding); returns [n, ...out]; appends what backward needs to `saved`.
    [[nodiscard]] virtual DeviceBuffer forward(DeviceOps& ops, const DeviceStep& step,
                                               std::span<const DeviceSpan> inputs, std::size_t n,
                                               const DeviceParams& params, std::vector<DeviceBuffer>& saved) const = 0;
    /// Backward: adds the parameter gradients into `grads` (f32, the layout's size) and returns
    /// one gradient per input, shaped like it (an empty buffer for token ids).
    [[nodiscard]] virtual std::vector<DeviceBuffer> backward(DeviceOps& ops, const DeviceStep& step, DeviceSpan dout,
                                                             std::span<const DeviceSpan> inputs, std::size_t n,
                                                             const DeviceParams& params,
                                                             const std::vector<DeviceBuffer>& saved,
                                                             DeviceSpan grads) const = 0;
    /// False when backward reads only its inputs' sizes (their count and element type), never
    /// their values: a stage then need not keep them from forward to backward for this layer.
    [[nodiscard]] virtual bool backward_reads_inputs() const noexcept { return true; }
};

/// The labels of the loss for samples [first_sample, first_sample + n), `positions` per sample,
/// as exact floats: the CPU loss kernel's, drawn from (seed, sample, position).
[[nodiscard]] std::vector<float> loss_labels(std::uint64_t seed, std::uint64_t first_sample, std::size_t n,
                                             std::size_t positions, std::size_t classes);

/// The device layer of `model.layers[layer]` computing in `compute` (f32 or bf16). Throws
/// InputError at the layer's location for an op the device backend does not run (it names the
/// ops it runs).
/// With `shard` (tp > 1) the layer is this rank's shard, split as the CPU kernel splits it
/// (Megatron's column- and row-parallel products: linear layers by output rows, gathered;
/// attention by heads and MLPs by inner units, their output projections summed over the group);
/// the other layers are whole on every rank. Throws InputError when the layer does not split.
[[nodiscard]] std::unique_ptr<DeviceLayer> make_device_layer(const Model& model, std::size_t layer, Elem compute,
                                                             Shard shard = {});

}  // namespace dpart::rt
