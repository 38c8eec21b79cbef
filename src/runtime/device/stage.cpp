// A worker's stage on a DeviceOps: parameters (an fp32 master copy and a copy in the compute
// precision), gradients and Adam's moments live on the device; a microbatch's activations stay
// there from forward to backward. Only what crosses the stage comes back to the host: the
// outputs the next stage reads, the loss, and the gradients the previous stage reads.
#include <fmt/format.h>

#include <algorithm>
#include <map>
#include <set>
#include <optional>
#include <tuple>
#include <utility>

#include "dpart/core/error.hpp"
#include "dpart/runtime/device.hpp"
#include "dpart/runtime/device_stage.hpp"

namespace dpart::rt {
namespace {

class DeviceStage final : public StageCompute {
public:
    DeviceStage(StageSetup setup, std::unique_ptr<DeviceOps> ops, Elem compute)
        : model_(*setup.model), stage_(*setup.stage), ops_(std::move(ops)), compute_(compute), seed_(setup.seed),
          recompute_(setup.recompute) {
        // Tensor parallelism: each rank holds its shard of the split layers (the CPU kernels'
        // split), their collectives going through the executor's group (StepContext::tp).
        const Shard shard{static_cast<std::uint32_t>(setup.place.tp_rank),
                          static_cast<std::uint32_t>(stage_.tp == 0 ? 1 : stage_.tp)};
        host_state_ = std::move(setup.state);
        std::size_t base = 0;
        for (std::size_t l = stage_.first_layer; l <= stage_.last_layer; ++l) {
            layers_.push_back(make_device_layer(model_, l, compute_, shard));
            const std::size_t n = layers_.back()->params();
            const ShardState& st = host_state_.at(l - stage_.first_layer);
            if (st.params.size() != n || st.m.size() != n || st.v.size() != n)
                throw RuntimeError(fmt::format("layer {}: given a state of {} values for a layer of {}", l,
                                               st.params.size(), n));
            LayerState dev;
            if (compute_ != Elem::f32) dev.compute = DeviceBuffer(*ops_, n, compute_);
            // ZeRO-1: the moments of the optimizer part only.
            const ValueRange r = setup.optimizer_part ? layer_part(*setup.optimizer_part, base, n) : ValueRange{0, n};
            if (r.count > 0) {
                dev.m = DeviceBuffer(*ops_, r.count, Elem::f32);
                dev.v = DeviceBuffer(*ops_, r.count, Elem::f32);
            }
            if (r.count != n) {
                ShardState& hs = host_state_[l - stage_.first_layer];
                const auto cut = [&](std::vector<float>& x) {
                    x = std::vector<float>(x.begin() + static_cast<std::ptrdiff_t>(r.first),
                                           x.begin() + static_cast<std::ptrdiff_t>(r.first + r.count));
                };
                cut(hs.m);
                cut(hs.v);
            }
            parts_.push_back(r);
            dev_.push_back(std::move(dev));
            base += n;
        }
        // The master weights and the gradients each in one array (each layer's a part of it), so
        // that a collective sums or gathers them in place; under ZeRO-1 padded to the replicas'
        // parts of one size (optimizer_part: NCCL's layout).
        std::size_t padded = base;
        if (setup.optimizer_part) {
            const std::size_t r = std::max<std::size_t>(1, stage_.replicas());
            padded = (base + r - 1) / r * r;
        }
        master_ = DeviceBuffer(*ops_, padded, Elem::f32);
        grads_ = DeviceBuffer(*ops_, padded, Elem::f32);
        for (std::size_t k = 0, at = 0; k < dev_.size(); ++k) {
            const std::size_t n = layers_[k]->params();
            dev_[k].master = master_.span().sub(at, n);
            dev_[k].grads = grads_.span().sub(at, n);
            at += n;
        }
        host_grads_.resize(layers_.size());
        push_state();
        if (std::holds_alternative<SoftmaxXentOp>(model_.layers[stage_.last_layer].op))
            loss_ = loss_shape(model_, stage_.last_layer);
        // What a microbatch keeps from forward to backward: the tensors a layer here reads in
        // backward. The rest (a residual add's output, the stage's last output once handed on)
        // is released when forward ends.
        for (std::size_t k = 0; k < layers_.size(); ++k)
            if (layers_[k]->backward_reads_inputs())
                for (std::size_t i : inputs_of(model_, stage_.first_layer + k)) read_in_backward_.insert(i);
    }
    DeviceStage(const DeviceStage&) = delete;
    DeviceStage& operator=(const DeviceStage&) = delete;
    ~DeviceStage() override {
        // The cache's buffers are released after this body: put them back on the meter first.
        if (MemoryMeter* meter = ops_->meter()) meter->add(cache_metered_);
    }

    [[nodiscard]] bool makes_model_input() const override { return true; }

    const TensorMap& forward(std::uint32_t mb, const StepContext& ctx, std::size_t rows, TensorMap inputs,
                             std::span<const std::size_t> keep, DeviceHandoff* device) override {
        InFlight& f = in_flight_[mb];
        f = InFlight{};
        f.rows = rows;
        f.step.loss_scale = 1.0f / static_cast<float>(model_.global_batch);
        f.step.seed = seed_;
        f.step.first_sample = ctx.first_sample;
        f.step.tp = group(ctx);
        f.acts = bring_in(inputs, device, rows, [&](std::size_t) { return compute_; });
        if (device != nullptr)  // a host tensor partly filled by parcels is not the whole input
            for (std::size_t l : device->in_layers) inputs.erase(l);
        if (stage_.first_layer == 0) {
            const auto* embedding = std::get_if<EmbeddingOp>(&model_.layers.front().op);
            std::vector<float> ids;  // the tokens, when this microbatch's input is made now
            f.input = cached(Cached::input, ctx.first_sample, rows, embedding ? Elem::i32 : compute_, f, f.owned_input, [&] {
                std::vector<float> x = synthetic_input(model_, seed_, ctx.first_sample, rows).data;
                if (embedding) ids = x;
                return x;
            });
            if (embedding) {
                // The tokens grouped by id once per batch, for the embedding's backward.
                f.step.token_groups = cached(Cached::token_groups, ctx.first_sample, rows, Elem::i32, f, f.owned_groups, [&] {
                    if (ids.empty()) ids = synthetic_input(model_, seed_, ctx.first_sample, rows).data;
                    for (float id : ids)
                        if (id < 0.0f || id >= static_cast<float>(embedding->vocab))
                            throw RuntimeError(fmt::format("token id {} outside the vocabulary of {}", id, embedding->vocab));
                    return group_tokens(ids).packed;
                });
                // The number of groups, from the packed size: 2 groups + 1 + tokens.
                f.step.token_group_count = (f.step.token_groups.count - 1 - f.input.count) / 2;
            }
        }
        if (loss_.classes != 0)
            f.step.labels = cached(Cached::labels, ctx.first_sample, rows, Elem::i32, f, f.owned_labels, [&] {
                return loss_labels(seed_, ctx.first_sample, rows, loss_.positions, loss_.classes);
            });
        run_forward(f);
        // Hand back what leaves the stage: computed here (downloaded) or passing through.
        for (std::size_t l : keep) {
            if (auto it = inputs.find(l); it != inputs.end()) {
                f.out.emplace(l, std::move(it->second));
                continue;
            }
            const auto a = f.acts.find(l);
            if (a == f.acts.end()) continue;
            Tensor t(shape_of(l, f.rows));
            ops_->download(a->second.span(), t.data);
            f.out.emplace(l, std::move(t));
        }
        if (device != nullptr) hand_out(*device, f.acts, rows);
        if (!recompute_)
            for (auto it = f.acts.begin(); it != f.acts.end();) {
                if (read_in_backward_.contains(it->first)) {
                    ++it;
                    continue;
                }
                const DeviceSpan s = it->second.span();
                f.released.emplace(it->first, DeviceSpan{nullptr, s.count, s.elem});
                it = f.acts.erase(it);
            }
        if (recompute_) {
            // Checkpointing: only the stage's inputs stay on the device (what leaves it has gone,
            // to the host or in parcels); backward runs the forward again.
            f.saved.clear();
            std::erase_if(f.acts, [&](const auto& a) { return a.first >= stage_.first_layer && a.first <= stage_.last_layer; });
        }
        ops_->synchronize();
        return f.out;
    }

    TensorMap backward(std::uint32_t mb, const StepContext& ctx, TensorMap grads, std::span<const std::size_t> want,
                       DeviceHandoff* device) override {
        InFlight& f = in_flight_.at(mb);
        f.step.tp = group(ctx);
        if (recompute_) run_forward(f);  // the same values: deterministic layers, the same step
        std::map<std::size_t, DeviceBuffer> dgrads = bring_in(grads, device, f.rows, [&](std::size_t l) {
            if (const auto a = f.acts.find(l); a != f.acts.end()) return a->second.span().elem;
            if (const auto r = f.released.find(l); r != f.released.end()) return r->second.elem;
            return compute_;
        });
        for (std::size_t k = layers_.size(); k-- > 0;) {
            const std::size_t l = stage_.first_layer + k;
            const auto g = dgrads.find(l);
            if (g == dgrads.end()) continue;  // nothing reads it
            const auto inputs = inputs_of(model_, l);
            std::vector<DeviceSpan> in;
            for (std::size_t i : inputs) in.push_back(span_of(f, i));
            std::vector<DeviceBuffer> din =
                layers_[k]->backward(*ops_, f.step, g->second.span(), in, f.rows, params(k), f.saved[k],
                                     dev_[k].grads);
            dgrads.erase(g);
            f.saved[k].clear();
            for (std::size_t j = 0; j < inputs.size(); ++j) {
                if (inputs[j] == model_input || din[j].span().ptr == nullptr) continue;
                auto it = dgrads.find(inputs[j]);
                if (it == dgrads.end()) dgrads.emplace(inputs[j], std::move(din[j]));
                else ops_->add(din[j].span(), it->second.span());
            }
        }
        TensorMap out;
        for (std::size_t l : want) {
            const auto g = dgrads.find(l);
            if (g == dgrads.end()) continue;
            Tensor t(shape_of(l, f.rows));
            ops_->download(g->second.span(), t.data);
            out.emplace(l, std::move(t));
        }
        if (device != nullptr) hand_out(*device, dgrads, f.rows);
        ops_->synchronize();
        in_flight_.erase(mb);
        return out;
    }

    std::vector<std::vector<float>>& pull_grads() override {
        for (std::size_t k = 0; k < dev_.size(); ++k) {
            host_grads_[k].resize(dev_[k].grads.count);
            ops_->download(dev_[k].grads, host_grads_[k]);
        }
        return host_grads_;
    }
    void push_grads() override {
        for (std::size_t k = 0; k < dev_.size(); ++k) ops_->upload(host_grads_[k], dev_[k].grads);
    }

    std::vector<float> gradient(std::size_t layer, std::size_t n) override {
        std::vector<float> g(n);
        ops_->download(dev_.at(layer).grads.sub(0, n), g);
        return g;
    }
    void set_gradient(std::size_t layer, std::span<const float> values) override {
        ops_->upload(values, dev_.at(layer).grads.sub(0, values.size()));
    }

    DeviceSpan export_gradients(std::size_t first, std::size_t n) override {
        DeviceBuffer b(*ops_, n, Elem::f32, DeviceBuffer::uninitialized);
        over_gradients(first, n, [&](DeviceSpan grads, std::size_t at) { ops_->copy(grads, b.span().sub(at, grads.count)); });
        ops_->synchronize();
        return b.release_ownership();
    }
    DeviceMemory device_memory() override { return {ops_.get(), compute_, cached_bytes_}; }
    DeviceSpan gradients_in_place() override { return grads_.span(); }
    DeviceSpan parameters_in_place() override { return master_.span(); }
    void refresh_compute_copy() override {
        if (compute_ == Elem::f32) return;
        for (LayerState& d : dev_) ops_->copy(d.master, d.compute.span());
    }

    void import_gradients(DeviceSpan from, std::size_t first, bool add) override {
        const DeviceBuffer owned = DeviceBuffer::adopt(*ops_, from);  // released once read (stream order)
        if (from.elem != Elem::f32) throw RuntimeError("gradients to import must be f32");
        over_gradients(first, from.count, [&](DeviceSpan grads, std::size_t at) {
            if (add) ops_->add(from.sub(at, grads.count), grads);
            else ops_->copy(from.sub(at, grads.count), grads);
        });
    }

    void tie_gradients(std::size_t embedding, std::size_t linear, std::size_t n) override {
        const DeviceSpan e = dev_.at(embedding).grads.sub(0, n);
        const DeviceSpan h = dev_.at(linear).grads.sub(0, n);
        ops_->add(h, e);  // e + h, element by element, as the CPU stage sums them
        ops_->copy(e, h);
    }

    bool apply_slowdown(double factor) override {
        if (factor != applied_factor_) {
            realised_ = ops_->resize(factor);
            applied_factor_ = factor;
        }
        // A device that resized itself shows the slowdown for real; one that could not (1.0)
        // leaves it to the executor's emulation.
        return factor > 1.0 && realised_ > 1.0;
    }

    void step(const OptimizerOptions& o, std::uint64_t step) override {
        for (std::size_t k = 0; k < dev_.size(); ++k) {
            LayerState& d = dev_[k];
            if (const ValueRange r = parts_[k]; r.count > 0) {
                const DeviceSpan master = d.master.sub(r.first, r.count);
                ops_->optimizer_step(o, step, master, d.grads.sub(r.first, r.count), d.m.span(), d.v.span());
                if (compute_ != Elem::f32) ops_->copy(master, d.compute.span().sub(r.first, r.count));
            }
        }
        ops_->fill(grads_.span(), 0.0f);
        ops_->synchronize();
    }

    std::vector<float> parameters(std::size_t first, std::size_t n) override {
        std::vector<float> out(n);
        over_values(master_of, first, n, [&](std::size_t k, DeviceSpan part, std::size_t at) {
            (void)k;
            ops_->download(part, std::span<float>(out).subspan(at, part.count));
        });
        return out;
    }
    void set_parameters(std::size_t first, std::span<const float> values) override {
        over_values(master_of, first, values.size(), [&](std::size_t k, DeviceSpan part, std::size_t at) {
            ops_->upload(values.subspan(at, part.count), part);
            follow_master(k, part);
        });
        ops_->synchronize();
    }
    void import_parameters(DeviceSpan from, std::size_t first) override {
        if (from.elem != Elem::f32) throw RuntimeError("parameters to import must be f32");
        over_values(master_of, first, from.count, [&](std::size_t k, DeviceSpan part, std::size_t at) {
            ops_->copy(from.sub(at, part.count), part);
            follow_master(k, part);
        });
    }

    std::vector<ShardState>& pull_state() override {
        for (std::size_t k = 0; k < dev_.size(); ++k) {
            ShardState& st = host_state_[k];
            ops_->download(dev_[k].master, st.params);
            if (parts_[k].count > 0) {
                ops_->download(dev_[k].m.span(), st.m);
                ops_->download(dev_[k].v.span(), st.v);
            }
        }
        return host_state_;
    }
    void push_state() override {
        for (std::size_t k = 0; k < dev_.size(); ++k) {
            const ShardState& st = host_state_[k];
            LayerState& d = dev_[k];
            ops_->upload(st.params, d.master);
            if (compute_ != Elem::f32) ops_->copy(d.master, d.compute.span());
            if (parts_[k].count > 0) {
                ops_->upload(st.m, d.m.span());
                ops_->upload(st.v, d.v.span());
            }
        }
        ops_->synchronize();
    }

private:
    struct LayerState {
        DeviceBuffer compute, m, v;
        DeviceSpan master, grads;  // its parts of master_ and grads_
    };
    /// Bytes put on the meter while a microbatch uses cache entries, taken off when it ends.
    class CacheUse {
    public:
        CacheUse() = default;
        CacheUse(CacheUse&& o) noexcept : meter_(std::exchange(o.meter_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
        CacheUse& operator=(CacheUse&& o) noexcept {
            if (this != &o) {
                drop();
                meter_ = std::exchange(o.meter_, nullptr);
                bytes_ = std::exchange(o.bytes_, 0);
            }
            return *this;
        }
        ~CacheUse() { drop(); }
        void add(MemoryMeter* meter, std::int64_t bytes) noexcept {
            if (meter == nullptr) return;
            meter_ = meter;
            bytes_ += bytes;
            meter->add(bytes);
        }

    private:
        void drop() noexcept {
            if (meter_ != nullptr) meter_->add(-bytes_);
            meter_ = nullptr;
            bytes_ = 0;
        }
        MemoryMeter* meter_ = nullptr;
        std::int64_t bytes_ = 0;
    };
    struct InFlight;
    /// Every layer's forward on the microbatch's inputs, keeping what backward needs.
    void run_forward(InFlight& f) {
        f.saved.clear();
        f.saved.resize(layers_.size());
        for (std::size_t k = 0; k < layers_.size(); ++k) {
            const std::size_t l = stage_.first_layer + k;
            std::vector<DeviceSpan> in;
            for (std::size_t i : inputs_of(model_, l)) in.push_back(span_of(f, i));
            f.acts[l] = layers_[k]->forward(*ops_, f.step, in, f.rows, params(k), f.saved[k]);
        }
    }

    struct InFlight {
        std::size_t rows = 0;
        DeviceSpan input;          // the model input (first stage): in cache_, or owned_input
        DeviceBuffer owned_input;
        DeviceBuffer owned_labels;  // the loss's labels when not in cache_
        DeviceBuffer owned_groups;  // the input's tokens grouped by id when not in cache_
        CacheUse cache_use;         // what of cache_ it uses, on the meter while it is in flight
        std::map<std::size_t, DeviceBuffer> acts;
        /// Outputs no backward here reads, released after forward: their sizes alone (null data).
        std::map<std::size_t, DeviceSpan> released;
        std::vector<std::vector<DeviceBuffer>> saved;
        DeviceStep step;
        TensorMap out;
    };

    /// What a step receives, on the device: the host tensors uploaded (as `elem_of` their layer),
    /// then the rows of the parcels copied in. A lone parcel holding every row of a lone layer
    /// becomes that layer's buffer (no copy).
    template <class ElemOf>
    std::map<std::size_t, DeviceBuffer> bring_in(const TensorMap& host, DeviceHandoff* device, std::size_t rows,
                                                 ElemOf&& elem_of) {
        std::map<std::size_t, DeviceBuffer> out;
        for (const auto& [l, t] : host) {
            DeviceBuffer b(*ops_, t.size(), elem_of(l), DeviceBuffer::uninitialized);
            ops_->upload(t.data, b.span());
            out.emplace(l, std::move(b));
        }
        if (device == nullptr || device->in.empty()) return out;
        std::vector<DeviceBuffer> parcels;  // ours now: released once their rows are copied
        for (const Parcel& p : device->in) parcels.push_back(DeviceBuffer::adopt(*ops_, p.span));
        const std::vector<Parcel> in = std::move(device->in);
        device->in.clear();
        const auto& layers = device->in_layers;
        if (in.size() == 1 && layers.size() == 1 && in[0].from == 0 && in[0].to == rows && !out.contains(layers[0]) &&
            in[0].span.elem == elem_of(layers[0])) {
            out.emplace(layers[0], std::move(parcels[0]));
            return out;
        }
        for (const Parcel& p : in) {
            std::size_t at = 0;
            for (std::size_t l : layers) {
                const std::size_t row = row_size(l), n = (p.to - p.from) * row;
                auto it = out.find(l);
                if (it == out.end()) it = out.emplace(l, DeviceBuffer(*ops_, rows * row, elem_of(l))).first;
                ops_->copy(p.span.sub(at, n), it->second.span().sub(p.from * row, n));
                at += n;
            }
            if (at != p.span.count)
                throw RuntimeError(fmt::format("a device parcel of rows {}-{} holds {} values, {} expected", p.from,
                                               p.to, p.span.count, at));
        }
        return out;
    }

    /// The parcels a step hands on: rows of `device.out_layers` of `tensors` (zeros where a
    /// tensor is missing), in the compute precision.
    void hand_out(DeviceHandoff& device, const std::map<std::size_t, DeviceBuffer>& tensors, std::size_t rows) {
        for (const auto& [from, to] : device.out_rows) {
            if (from > to || to > rows)
                throw RuntimeError(fmt::format("rows {}-{} asked of a microbatch of {} rows", from, to, rows));
            std::size_t total = 0;
            bool complete = true;
            for (std::size_t l : device.out_layers) {
                total += (to - from) * row_size(l);
                complete = complete && tensors.contains(l);
            }
            DeviceBuffer b = complete ? DeviceBuffer(*ops_, total, compute_, DeviceBuffer::uninitialized)
                                      : DeviceBuffer(*ops_, total, compute_);
            std::size_t at = 0;
            for (std::size_t l : device.out_layers) {
                const std::size_t row = row_size(l), n = (to - from) * row;
                if (const auto it = tensors.find(l); it != tensors.end())
                    ops_->copy(it->second.span().sub(from * row, n), b.span().sub(at, n));
                at += n;
            }
            device.out.push_back({b.release_ownership(), from, to});
        }
    }

    /// Calls f(part, at) for each layer's part of values [first, first + n) of the stage's
    /// gradients seen as one array; `at` is the part's offset within the range.
    template <class F>
    void over_gradients(std::size_t first, std::size_t n, F&& f) {
        over_values([](const LayerState& d) { return d.grads; }, first, n,
                    [&](std::size_t, DeviceSpan part, std::size_t at) { f(part, at); });
    }
    /// The same over any per-layer span of the parameters' size, span_of(layer state) (f gets
    /// the layer's index too).
    template <class Get, class F>
    void over_values(Get&& span_of, std::size_t first, std::size_t n, F&& f) {
        std::size_t base = 0;
        for (std::size_t k = 0; k < dev_.size(); ++k) {
            const DeviceSpan b = span_of(dev_[k]);
            const std::size_t size = b.count;
            const ValueRange r = layer_part({first, n}, base, size);
            if (r.count > 0) f(k, b.sub(r.first, r.count), base + r.first - first);
            base += size;
        }
        if (first + n > base)
            throw RuntimeError(fmt::format("values {}-{} asked of a stage of {}", first, first + n, base));
    }
    static DeviceSpan master_of(const LayerState& d) { return d.master; }
    /// The compute copy of master values `part` (of layer k), when the compute precision is not f32.
    void follow_master(std::size_t k, DeviceSpan part) {
        if (compute_ == Elem::f32) return;
        const DeviceSpan master = dev_[k].master;
        const auto offset = static_cast<std::size_t>(static_cast<const float*>(part.ptr) - static_cast<const float*>(master.ptr));
        ops_->copy(part, dev_[k].compute.span().sub(offset, part.count));
    }

    /// The tensor-parallel group's collectives on this stage's buffers: the device
    /// communicator's, else through the host.
    DeviceGroup* group(const StepContext& ctx) {
        if (ctx.device_tp != nullptr) return ctx.device_tp;
        if (ctx.tp == nullptr) return nullptr;
        tp_.emplace(*ctx.tp);
        return &*tp_;
    }

    [[nodiscard]] std::size_t row_size(std::size_t layer) const { return Tensor::count(shape_of(layer, 1)); }

    [[nodiscard]] DeviceSpan span_of(const InFlight& f, std::size_t layer) const {
        if (layer == model_input) return f.input;
        if (const auto r = f.released.find(layer); r != f.released.end()) return r->second;
        return f.acts.at(layer).span();
    }

    /// What depends only on the samples [first, first + rows): the model input (first stage) and
    /// the loss's labels (last stage). Made and uploaded once, then kept on the device while the
    /// run sees few distinct batches (a run trains on dataset_batches x microbatches of them), so
    /// that neither is regenerated nor copied again; beyond the cache's bounds, `owned` holds it
    /// for this microbatch alone.
    /// The cache is not on the memory meter (a data loader's stand-in, which the plan does not
    /// hold; cached_bytes_ reports it): only the entries a microbatch in flight uses are, as the
    /// plan counts its input and labels (InFlight::cache_use).
    enum class Cached : std::uint8_t { input, labels, token_groups };
    template <class Make>
    DeviceSpan cached(Cached what, std::uint64_t first, std::size_t rows, Elem elem, InFlight& f, DeviceBuffer& owned,
                      Make&& make) {
        const auto key = std::make_tuple(what, first, rows);
        if (auto it = cache_.find(key); it != cache_.end()) {
            f.cache_use.add(ops_->meter(), allocation_bytes(it->second.span()));
            return it->second.span();
        }
        const std::vector<float> values = make();
        DeviceBuffer b(*ops_, values.size(), elem, DeviceBuffer::uninitialized);
        ops_->upload(values, b.span());
        constexpr std::size_t max_entries = 128;
        constexpr std::size_t max_bytes = std::size_t{2} << 30;
        if (cache_.size() >= max_entries || cached_bytes_ + b.span().bytes() > max_bytes) {
            owned = std::move(b);
            return owned.span();
        }
        const std::int64_t bytes = allocation_bytes(b.span());
        const DeviceSpan span = cache_.emplace(key, std::move(b)).first->second.span();
        cached_bytes_ += span.bytes();
        cache_metered_ += bytes;
        if (MemoryMeter* meter = ops_->meter()) meter->add(-bytes);
        f.cache_use.add(ops_->meter(), bytes);
        return span;
    }

    [[nodiscard]] DeviceParams params(std::size_t k) const {
        const LayerState& d = dev_[k];
        return {d.master, compute_ == Elem::f32 ? d.master : d.compute.span()};
    }
    [[nodiscard]] std::vector<std::size_t> shape_of(std::size_t l, std::size_t rows) const {
        std::vector<std::size_t> shape{rows};
        const std::vector<std::size_t> s = sample_shape(model_, l);
        shape.insert(shape.end(), s.begin(), s.end());
        return shape;
    }

    const Model& model_;
    const Stage& stage_;
    // Declared before everything it allocates, so that it is destroyed after them.
    std::unique_ptr<DeviceOps> ops_;
    Elem compute_;
    std::uint64_t seed_;
    bool recompute_;
    std::vector<std::unique_ptr<DeviceLayer>> layers_;
    std::vector<LayerState> dev_;
    DeviceBuffer master_, grads_;  // every layer's master weights and gradients, in stage order
    std::vector<ValueRange> parts_;  // per layer: the values it steps (ZeRO-1), relative to the layer
    std::vector<ShardState> host_state_;
    std::vector<std::vector<float>> host_grads_;
    LossShape loss_;  // classes 0: the stage ends with no loss layer
    double applied_factor_ = 1.0;  // the slowdown last passed to resize()
    double realised_ = 1.0;        // what the device made of it
    std::map<std::tuple<Cached, std::uint64_t, std::size_t>, DeviceBuffer> cache_;
    std::size_t cached_bytes_ = 0;
    std::int64_t cache_metered_ = 0;  // the cache's allocations, taken off the meter
    std::map<std::uint32_t, InFlight> in_flight_;
    std::set<std::size_t> read_in_backward_;  // layers (or model_input) whose output a backward here reads
    std::optional<HostStagedGroup> tp_;
};

}  // namespace

StageFactory make_device_stage_factory(std::function<std::unique_ptr<DeviceOps>(const WorkerPlace&)> make_ops,
                                       Elem compute) {
    return [make_ops = std::move(make_ops), compute](StageSetup setup) -> std::unique_ptr<StageCompute> {
        std::unique_ptr<DeviceOps> ops = make_ops(setup.place);
        return std::make_unique<DeviceStage>(std::move(setup), std::move(ops), compute);
    };
}

}  // namespace dpart::rt
