// The CUDA backend (host code, compiled as C++20; the kernels are in device_ops.cu): DeviceOps on one stream of a GPU or of a green-context partition of it,
// through cuBLAS (gemm.cuh) and dpart's kernels (device_ops.cuh); and CudaDevices, which maps a
// cluster's devices to this machine's GPUs and cuts partitioned GPUs into green contexts
// (CUDA driver API: cuDevSmResourceSplitByCount, cuDevResourceGenerateDesc, cuGreenCtxCreate,
// cuGreenCtxStreamCreate), in the order sm_partition's split_steps gives.
//
// Memory comes from the device's stream-ordered pool (cudaMallocAsync), kept cached (release
// threshold: unlimited), so a worker's per-microbatch buffers cost no cudaMalloc after warm-up
// and freeing never synchronises the other partitions.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <vector>

#include "check.cuh"
#include "device_ops.cuh"
#include "dpart/runtime/bounded_wait.hpp"
#include "dpart/runtime/cuda_backend.hpp"
#include "dpart/runtime/sm_partition.hpp"
#include "cudnn_conv.hpp"
#include "gemm.cuh"
#include "streams.hpp"

namespace dpart::rt {
namespace {

using cuda::check_cuda;

/// The driver API functions green contexts need, looked up through the runtime
/// (cudaGetDriverEntryPointByVersion) so that dpart does not link libcuda: the binary starts,
/// and runs the CPU backend, on machines without a GPU driver.
struct Driver {
    decltype(&::cuGetErrorName) get_error_name = nullptr;
    decltype(&::cuGetErrorString) get_error_string = nullptr;
    decltype(&::cuDeviceGet) device_get = nullptr;
    decltype(&::cuDeviceGetDevResource) device_get_dev_resource = nullptr;
    decltype(&::cuDevSmResourceSplitByCount) sm_resource_split_by_count = nullptr;
    decltype(&::cuDevResourceGenerateDesc) dev_resource_generate_desc = nullptr;
    decltype(&::cuGreenCtxCreate) green_ctx_create = nullptr;
    decltype(&::cuGreenCtxDestroy) green_ctx_destroy = nullptr;
    decltype(&::cuGreenCtxStreamCreate) green_ctx_stream_create = nullptr;
    decltype(&::cuGreenCtxGetDevResource) green_ctx_get_dev_resource = nullptr;
    decltype(&::cuCtxFromGreenCtx) ctx_from_green_ctx = nullptr;
    decltype(&::cuCtxSetCurrent) ctx_set_current = nullptr;
    decltype(&::cuStreamDestroy) stream_destroy = nullptr;

    template <class F>
    static void load(F& fn, const char* symbol) {
        void* p = nullptr;
        cudaDriverEntryPointQueryResult found{};
        const cudaError_t e = cudaGetDriverEntryPointByVersion(symbol, &p, CUDA_VERSION, cudaEnableDefault, &found);
        if (e != cudaSuccess || found != cudaDriverEntryPointSuccess || p == nullptr) {
            cudaGetLastError();
            throw RuntimeError(fmt::format("the CUDA driver has no {} (green contexts need CUDA 12.4 or later): {}",
                                           symbol, cudaGetErrorString(e)));
        }
        fn = reinterpret_cast<F>(p);
    }
    static const Driver& get() {
        static const Driver d = [] {
            Driver x;
            load(x.get_error_name, "cuGetErrorName");
            load(x.get_error_string, "cuGetErrorString");
            load(x.device_get, "cuDeviceGet");
            load(x.device_get_dev_resource, "cuDeviceGetDevResource");
            load(x.sm_resource_split_by_count, "cuDevSmResourceSplitByCount");
            load(x.dev_resource_generate_desc, "cuDevResourceGenerateDesc");
            load(x.green_ctx_create, "cuGreenCtxCreate");
            load(x.green_ctx_destroy, "cuGreenCtxDestroy");
            load(x.green_ctx_stream_create, "cuGreenCtxStreamCreate");
            load(x.green_ctx_get_dev_resource, "cuGreenCtxGetDevResource");
            load(x.ctx_from_green_ctx, "cuCtxFromGreenCtx");
            load(x.ctx_set_current, "cuCtxSetCurrent");
            load(x.stream_destroy, "cuStreamDestroy");
            return x;
        }();
        return d;
    }
};

void check_cu(CUresult r, const char* what) {
    if (r == CUDA_SUCCESS) return;
    const char* name = nullptr;
    const char* text = nullptr;
    Driver::get().get_error_name(r, &name);
    Driver::get().get_error_string(r, &text);
    throw RuntimeError(fmt::format("{}: {} ({})", what, text != nullptr ? text : "unknown error",
                                   name != nullptr ? name : "?"));
}

cudaDataType data_type(Elem e) {
    switch (e) {
    case Elem::f32: return CUDA_R_32F;
    case Elem::bf16: return CUDA_R_16BF;
    case Elem::i32: break;
    }
    throw RuntimeError("cuda ops: matrix products on i32 values");
}

cuda::Op op(Trans t) { return t == Trans::trans ? cuda::Op::trans : cuda::Op::none; }

cuda::Act act(Activation a) {
    switch (a) {
    case Activation::relu: return cuda::Act::relu;
    case Activation::gelu: return cuda::Act::gelu;
    case Activation::silu: return cuda::Act::silu;
    }
    return cuda::Act::relu;
}

cuda::Window window(const Window2d& g) { return {g.h, g.w, g.kh, g.kw, g.stride, g.pad, g.oh, g.ow}; }

cuda::Norm norm(NormKind k) { return k == NormKind::layernorm ? cuda::Norm::layernorm : cuda::Norm::rmsnorm; }

void need(const DeviceSpan& s, std::size_t count, const char* what) {
    if (s.count < count)
        throw RuntimeError(fmt::format("cuda ops: {} has {} elements, {} needed", what, s.count, count));
}

/// Calls f with the span's pointer typed as its element (float or bf16).
template <class F>
void typed(const DeviceSpan& s, F&& f) {
    if (s.elem == Elem::f32) f(static_cast<float*>(s.ptr));
    else if (s.elem == Elem::bf16) f(static_cast<__nv_bfloat16*>(s.ptr));
    else throw RuntimeError("cuda ops: an operation on floats was given i32 values");
}
const std::int32_t* ints(const DeviceSpan& s, const char* what) {
    if (s.elem != Elem::i32) throw RuntimeError(fmt::format("cuda ops: {} must be i32", what));
    return static_cast<const std::int32_t*>(s.ptr);
}
float* f32(const DeviceSpan& s, const char* what) {
    if (s.elem != Elem::f32) throw RuntimeError(fmt::format("cuda ops: {} must be f32", what));
    return static_cast<float*>(s.ptr);
}

class CudaOps final : public DeviceOps {
public:
    /// On `stream` (nullptr: a stream of its own on `device`, made current here). A partition's
    /// caller has made its green context current and passes that context's stream.
    /// `resizer(factor, realised)` returns the stream of the partition shrunk for `factor` (and
    /// sets the slowdown it gives); empty for a device that cannot be resized.
    using Resizer = std::function<cudaStream_t(double factor, double& realised, std::uint32_t& sms)>;

    CudaOps(int device, cudaStream_t stream, std::string name, bool tf32, std::chrono::milliseconds wait_limit,
            std::uint32_t sms = 0, Resizer resizer = {})
        : device_(device), stream_(stream), name_(std::move(name)), resizer_(std::move(resizer)),
          wait_limit_(wait_limit) {
        if (stream_ == nullptr) {
            check_cuda(cudaSetDevice(device_), "cudaSetDevice");
            check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
            own_stream_ = true;
        }
        blas_ = std::make_unique<cuda::Blas>(stream_);
        blas_->set_tf32(tf32);
        tf32_ = tf32;
        // On a partition, cuBLAS sizes its persistent kernels' grids for the partition's SMs.
        if (sms > 0) blas_->set_sm_count_target(static_cast<int>(sms));
    }
    ~CudaOps() override {
        try {
            if (stuck_) throw RuntimeError("a wait already gave up");  // do not wait out the limit twice
            synchronize();
        } catch (const std::exception&) {
            // The stream still waits on a transfer that will not come (or failed): leave it and
            // its handles to the process's end rather than block here.
            (void)blas_.release();
            (void)conv_.release();
            return;
        }
        conv_.reset();  // its handle is set on the stream: gone before the stream
        blas_.reset();
        if (own_stream_) cudaStreamDestroy(stream_);
    }
    [[nodiscard]] std::string name() const override { return name_; }
    [[nodiscard]] cuda::OpsStream native() const noexcept { return {device_, stream_}; }

    DeviceSpan allocate(std::size_t count, Elem elem) override {
        const DeviceSpan s = allocate_uninitialized(count, elem);
        check_cuda(cudaMemsetAsync(s.ptr, 0, std::max<std::size_t>(count, 1) * elem_bytes(elem), stream_),
                   "cudaMemsetAsync");
        return s;
    }
    DeviceSpan allocate_uninitialized(std::size_t count, Elem elem) override {
        const std::size_t bytes = std::max<std::size_t>(count, 1) * elem_bytes(elem);
        void* p = nullptr;
        const cudaError_t e = cudaMallocAsync(&p, bytes, stream_);
        if (e != cudaSuccess) {
            cudaGetLastError();
            throw RuntimeError(fmt::format("{}: cannot allocate {} bytes ({})", name_, bytes, cudaGetErrorString(e)));
        }
        const DeviceSpan s{p, count, elem};
        meter_.add(allocation_bytes(s));
        return s;
    }
    void release(DeviceSpan s) noexcept override {
        if (s.ptr == nullptr) return;
        meter_.add(-allocation_bytes(s));
        cudaFreeAsync(s.ptr, stream_);
    }
    MemoryMeter* meter() noexcept override { return &meter_; }

    void upload(std::span<const float> from, DeviceSpan to) override {
        need(to, from.size(), "upload's destination");
        if (from.empty()) return;
        settle_before_host_copy();
        if (to.elem == Elem::f32) {
            check_cuda(cudaMemcpyAsync(to.ptr, from.data(), from.size_bytes(), cudaMemcpyHostToDevice, stream_),
                       "cudaMemcpyAsync (upload)");
        } else if (to.elem == Elem::i32) {
            std::vector<std::int32_t> v(from.size());
            for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<std::int32_t>(from[i]);
            check_cuda(cudaMemcpyAsync(to.ptr, v.data(), v.size() * 4, cudaMemcpyHostToDevice, stream_),
                       "cudaMemcpyAsync (upload)");
            synchronize();  // v is about to go
        } else {
            const DeviceSpan tmp = allocate(from.size(), Elem::f32);
            check_cuda(cudaMemcpyAsync(tmp.ptr, from.data(), from.size_bytes(), cudaMemcpyHostToDevice, stream_),
                       "cudaMemcpyAsync (upload)");
            cuda::cast(static_cast<const float*>(tmp.ptr), static_cast<__nv_bfloat16*>(to.ptr), from.size(), stream_);
            release(tmp);
        }
        synchronize();  // the caller may reuse `from` at once
    }
    void download(DeviceSpan from, std::span<float> to) override {
        need(from, to.size(), "download's source");
        if (to.empty()) return;
        settle_before_host_copy();
        if (from.elem == Elem::f32) {
            check_cuda(cudaMemcpyAsync(to.data(), from.ptr, to.size_bytes(), cudaMemcpyDeviceToHost, stream_),
                       "cudaMemcpyAsync (download)");
            synchronize();
        } else if (from.elem == Elem::i32) {
            std::vector<std::int32_t> v(to.size());
            check_cuda(cudaMemcpyAsync(v.data(), from.ptr, v.size() * 4, cudaMemcpyDeviceToHost, stream_),
                       "cudaMemcpyAsync (download)");
            synchronize();
            for (std::size_t i = 0; i < v.size(); ++i) to[i] = static_cast<float>(v[i]);
        } else {
            const DeviceSpan tmp = allocate(to.size(), Elem::f32);
            cuda::cast(static_cast<const __nv_bfloat16*>(from.ptr), static_cast<float*>(tmp.ptr), to.size(), stream_);
            check_cuda(cudaMemcpyAsync(to.data(), tmp.ptr, to.size_bytes(), cudaMemcpyDeviceToHost, stream_),
                       "cudaMemcpyAsync (download)");
            release(tmp);
            synchronize();
        }
    }
    void copy(DeviceSpan from, DeviceSpan to) override {
        need(to, from.count, "copy's destination");
        if (from.count == 0) return;
        if (from.elem == to.elem) {
            check_cuda(cudaMemcpyAsync(to.ptr, from.ptr, from.bytes(), cudaMemcpyDeviceToDevice, stream_),
                       "cudaMemcpyAsync (copy)");
        } else if (from.elem == Elem::f32 && to.elem == Elem::bf16) {
            cuda::cast(static_cast<const float*>(from.ptr), static_cast<__nv_bfloat16*>(to.ptr), from.count, stream_);
        } else if (from.elem == Elem::bf16 && to.elem == Elem::f32) {
            cuda::cast(static_cast<const __nv_bfloat16*>(from.ptr), static_cast<float*>(to.ptr), from.count, stream_);
        } else {
            throw RuntimeError("cuda ops: copy between i32 and floats");
        }
    }
    void copy_2d(DeviceSpan from, std::size_t from_ld, DeviceSpan to, std::size_t to_ld, std::size_t rows,
                 std::size_t cols) override {
        if (rows == 0 || cols == 0) return;
        if (from.elem != to.elem) throw RuntimeError("cuda ops: a 2-d copy between element types");
        need(from, (rows - 1) * from_ld + cols, "copy_2d's source");
        need(to, (rows - 1) * to_ld + cols, "copy_2d's destination");
        const std::size_t e = elem_bytes(from.elem);
        check_cuda(cudaMemcpy2DAsync(to.ptr, to_ld * e, from.ptr, from_ld * e, cols * e, rows, cudaMemcpyDeviceToDevice,
                                     stream_),
                   "cudaMemcpy2DAsync");
    }
    void fill(DeviceSpan s, float value) override {
        if (s.count == 0) return;
        if (s.elem == Elem::f32) {
            cuda::fill(static_cast<float*>(s.ptr), value, s.count, stream_);
            return;
        }
        if (s.elem == Elem::i32) throw RuntimeError("cuda ops: fill of i32 values");
        const DeviceSpan tmp = allocate(s.count, Elem::f32);
        cuda::fill(static_cast<float*>(tmp.ptr), value, s.count, stream_);
        copy(tmp, s);
        release(tmp);
    }
    void add(DeviceSpan from, DeviceSpan to) override {
        need(to, from.count, "add's destination");
        if (from.elem != to.elem) throw RuntimeError("cuda ops: add of different element types");
        if (from.count == 0) return;
        typed(to, [&](auto* t) {
            using T = std::remove_pointer_t<decltype(t)>;
            cuda::add(static_cast<const T*>(from.ptr), t, from.count, stream_);
        });
    }
    void mul(DeviceSpan a, DeviceSpan b, DeviceSpan out) override {
        need(b, a.count, "mul's b");
        need(out, a.count, "mul's output");
        if (a.elem != b.elem || a.elem != out.elem) throw RuntimeError("cuda ops: mul of different element types");
        if (a.count == 0) return;
        typed(out, [&](auto* o) {
            using T = std::remove_pointer_t<decltype(o)>;
            cuda::mul(static_cast<const T*>(a.ptr), static_cast<const T*>(b.ptr), o, a.count, stream_);
        });
    }
    /// Waits for the stream, at most wait_limit_ when set: with device communicators the stream
    /// may wait on a receive whose sender failed in another process; the run then stops with an
    /// error instead of hanging (an abort in this process ends such a wait sooner).
    void synchronize() override {
        if (wait_limit_.count() == 0) {
            check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
            return;
        }
        stuck_ = true;  // until the wait below ends
        wait_bounded(
            [&] {
                const cudaError_t e = cudaStreamQuery(stream_);
                if (e == cudaErrorNotReady) return Poll::pending;
                check_cuda(e, "cudaStreamQuery");
                return Poll::done;
            },
            wait_limit_,
            [&] {
                return fmt::format("{}: the work queued on the GPU did not finish within {:g} s (a transfer "
                                   "waits on a peer that does not send; --timeout)",
                                   name_, static_cast<double>(wait_limit_.count()) / 1e3);
            });
        stuck_ = false;
    }
    /// A copy between the device and pageable host memory waits for the stream inside the CUDA
    /// call, where no limit reaches it: with a limit, the bounded wait goes first, so that the
    /// copy then waits only for itself.
    void settle_before_host_copy() {
        if (wait_limit_.count() > 0) synchronize();
    }

    double resize(double factor) override {
        if (!resizer_) return 1.0;
        synchronize();  // everything queued on the old partition is done; buffers stay valid
        double realised = 1.0;
        std::uint32_t sms = 0;
        const cudaStream_t next = resizer_(factor, realised, sms);
        if (next != stream_) {
            stream_ = next;
            blas_->set_stream(stream_);
            blas_->set_sm_count_target(static_cast<int>(sms));
        }
        return realised;
    }

    void gemm(Trans ta, Trans tb, std::size_t m, std::size_t n, std::size_t k, float alpha, DeviceSpan a,
              std::size_t lda, DeviceSpan b, std::size_t ldb, float beta, DeviceSpan c, std::size_t ldc) override {
        gemm_batched(ta, tb, m, n, k, alpha, a, lda, 0, b, ldb, 0, beta, c, ldc, 0, 1);
    }
    void gemm_batched(Trans ta, Trans tb, std::size_t m, std::size_t n, std::size_t k, float alpha, DeviceSpan a,
                      std::size_t lda, std::size_t stride_a, DeviceSpan b, std::size_t ldb, std::size_t stride_b,
                      float beta, DeviceSpan c, std::size_t ldc, std::size_t stride_c, std::size_t batch) override {
        if (a.elem != b.elem) throw RuntimeError("cuda ops: gemm of A and B of different types");
        blas_->gemm_ex(op(ta), op(tb), m, n, k, alpha, a.ptr, data_type(a.elem), lda,
                       static_cast<long long>(stride_a), b.ptr, ldb, static_cast<long long>(stride_b), beta, c.ptr,
                       data_type(c.elem), ldc, static_cast<long long>(stride_c), batch);
    }

    void bias_add(DeviceSpan y, DeviceSpan bias, std::size_t rows, std::size_t cols) override {
        need(y, rows * cols, "bias_add's y");
        need(bias, cols, "bias_add's bias");
        typed(y, [&](auto* p) { cuda::bias_add(p, f32(bias, "bias"), rows, cols, stream_); });
    }
    void column_sums(DeviceSpan dy, DeviceSpan dbias, std::size_t rows, std::size_t cols) override {
        need(dy, rows * cols, "column_sums' dy");
        need(dbias, cols, "column_sums' dbias");
        typed(dy, [&](auto* p) {
            using T = std::remove_pointer_t<decltype(p)>;
            cuda::column_sums(static_cast<const T*>(p), f32(dbias, "dbias"), rows, cols, stream_);
        });
    }
    void activation_forward(Activation a, DeviceSpan x, DeviceSpan y) override {
        need(y, x.count, "activation's y");
        typed(x, [&](auto* p) {
            using T = std::remove_pointer_t<decltype(p)>;
            cuda::activation_forward(act(a), static_cast<const T*>(p), static_cast<T*>(y.ptr), x.count, stream_);
        });
    }
    void activation_backward(Activation a, DeviceSpan x, DeviceSpan dy, DeviceSpan dx) override {
        need(dy, x.count, "activation's dy");
        need(dx, x.count, "activation's dx");
        typed(x, [&](auto* p) {
            using T = std::remove_pointer_t<decltype(p)>;
            cuda::activation_backward(act(a), static_cast<const T*>(p), static_cast<const T*>(dy.ptr),
                                      static_cast<T*>(dx.ptr), x.count, stream_);
        });
    }
    void norm_forward(NormKind kind, DeviceSpan x, DeviceSpan gamma, std::optional<DeviceSpan> beta, DeviceSpan y,
                      DeviceSpan stats, std::size_t rows, std::size_t f) override {
        need(x, rows * f, "norm's x");
        need(y, rows * f, "norm's y");
        need(stats, rows * 2, "norm's stats");
        typed(x, [&](auto* p) {
            using T = std::remove_pointer_t<decltype(p)>;
            cuda::norm_forward(norm(kind), static_cast<const T*>(p), f32(gamma, "gamma"),
                               beta ? f32(*beta, "beta") : nullptr, static_cast<T*>(y.ptr), f32(stats, "stats"), rows,
                               f, 1e-5f, stream_);
        });
    }
    void norm_backward(NormKind kind, DeviceSpan x, DeviceSpan gamma, DeviceSpan stats, DeviceSpan dy, DeviceSpan dx,
                       DeviceSpan dgamma, std::optional<DeviceSpan> dbeta, std::size_t rows, std::size_t f) override {
        need(dx, rows * f, "norm's dx");
        typed(x, [&](auto* p) {
            using T = std::remove_pointer_t<decltype(p)>;
            cuda::norm_backward(norm(kind), static_cast<const T*>(p), f32(gamma, "gamma"), f32(stats, "stats"),
                                static_cast<const T*>(dy.ptr), static_cast<T*>(dx.ptr), f32(dgamma, "dgamma"),
                                dbeta ? f32(*dbeta, "dbeta") : nullptr, rows, f, stream_);
        });
    }
    void softmax_xent_forward(DeviceSpan logits, DeviceSpan labels, DeviceSpan loss, std::size_t rows,
                              std::size_t classes) override {
        need(logits, rows * classes, "softmax_xent's logits");
        need(loss, rows, "softmax_xent's loss");
        typed(logits, [&](auto* p) {
            using T = std::remove_pointer_t<decltype(p)>;
            cuda::softmax_xent_forward(static_cast<const T*>(p), ints(labels, "labels"), f32(loss, "loss"), rows,
                                       classes, stream_);
        });
    }
    void softmax_xent_backward(DeviceSpan logits, DeviceSpan labels, float scale, DeviceSpan dlogits, std::size_t rows,
                               std::size_t classes) override {
        need(dlogits, rows * classes, "softmax_xent's dlogits");
        typed(logits, [&](auto* p) {
            using T = std::remove_pointer_t<decltype(p)>;
            cuda::softmax_xent_backward(static_cast<const T*>(p), ints(labels, "labels"), scale,
                                        static_cast<T*>(dlogits.ptr), rows, classes, stream_);
        });
    }
    void embedding_forward(DeviceSpan ids, DeviceSpan table, DeviceSpan out, std::size_t n, std::size_t dim) override {
        need(out, n * dim, "embedding's output");
        typed(out, [&](auto* p) {
            cuda::embedding_forward(ints(ids, "token ids"), f32(table, "embedding table"), p, n, dim, stream_);
        });
    }
    void embedding_backward(DeviceSpan ids, DeviceSpan dout, DeviceSpan dtable, std::size_t n,
                            std::size_t dim) override {
        // Group the tokens by id on the host (n ids: a small copy) so that every row of the
        // table is summed by a block of its own, in token order as the CPU sums it. A stage
        // that knows its tokens groups them once (DeviceStep::token_groups) and skips this.
        if (n >= (std::size_t{1} << 24))
            throw RuntimeError(fmt::format("{}: {} tokens in one embedding backward, more than 2^24", name_, n));
        std::vector<float> host(n);
        download(ids, host);
        for (float id : host)
            if (id < 0.0f || (static_cast<std::size_t>(id) + 1) * dim > dtable.count)
                throw RuntimeError(fmt::format("{}: token id {} is outside the embedding table", name_, id));
        const TokenGroups g = group_tokens(host);
        const DeviceSpan packed = allocate(g.packed.size(), Elem::i32);
        upload(g.packed, packed);
        embedding_backward_grouped(packed, g.groups, dout, dtable, n, dim);
        release(packed);
    }
    void embedding_backward_grouped(DeviceSpan grouping, std::size_t groups, DeviceSpan dout, DeviceSpan dtable,
                                    std::size_t n, std::size_t dim) override {
        need(grouping, 2 * groups + 1 + n, "the token grouping");
        need(dout, n * dim, "embedding's output gradient");
        const std::int32_t* packed = ints(grouping, "the token grouping");
        typed(dout, [&](auto* p) {
            using T = std::remove_pointer_t<decltype(p)>;
            cuda::embedding_backward_grouped(packed, packed + groups, packed + 2 * groups + 1, groups,
                                             static_cast<const T*>(p), f32(dtable, "table gradient"), dim, stream_);
        });
    }
    void gather_rows(DeviceSpan src, DeviceSpan index, DeviceSpan dst, std::size_t n, std::size_t cols) override {
        need(index, n, "gather's index");
        need(dst, n * cols, "gather's destination");
        if (src.elem != dst.elem) throw RuntimeError("cuda ops: gather_rows between element types");
        typed(src, [&](auto* p) {
            using T = std::remove_pointer_t<decltype(p)>;
            cuda::gather_rows(static_cast<const T*>(p), ints(index, "gather's index"), static_cast<T*>(dst.ptr), n, cols,
                              stream_);
        });
    }
    void gather_sum_rows(DeviceSpan src, DeviceSpan index, std::optional<DeviceSpan> weight, DeviceSpan dst,
                         std::size_t rows, std::size_t k, std::size_t cols, bool accumulate) override {
        need(index, rows * k, "gather_sum's index");
        if (weight) need(*weight, rows * k, "gather_sum's weights");
        need(dst, rows * cols, "gather_sum's destination");
        if (src.elem != dst.elem) throw RuntimeError("cuda ops: gather_sum_rows between element types");
        const float* w = weight ? f32(*weight, "gather_sum's weights") : nullptr;
        typed(src, [&](auto* p) {
            using T = std::remove_pointer_t<decltype(p)>;
            cuda::gather_sum_rows(static_cast<const T*>(p), ints(index, "gather_sum's index"), w,
                                  static_cast<T*>(dst.ptr), rows, k, cols, accumulate, stream_);
        });
    }
    void row_dots(DeviceSpan a, DeviceSpan b, DeviceSpan out, std::size_t rows, std::size_t cols) override {
        need(a, rows * cols, "row_dots' a");
        need(b, rows * cols, "row_dots' b");
        need(out, rows, "row_dots' output");
        if (a.elem != b.elem) throw RuntimeError("cuda ops: row_dots between element types");
        typed(a, [&](auto* p) {
            using T = std::remove_pointer_t<decltype(p)>;
            cuda::row_dots(static_cast<const T*>(p), static_cast<const T*>(b.ptr), f32(out, "row_dots' output"), rows,
                           cols, stream_);
        });
    }
    void scale_rows(DeviceSpan x, DeviceSpan scale, std::size_t rows, std::size_t cols) override {
        need(x, rows * cols, "scale_rows' rows");
        need(scale, rows, "scale_rows' scales");
        typed(x, [&](auto* p) {
            using T = std::remove_pointer_t<decltype(p)>;
            cuda::scale_rows(static_cast<T*>(p), f32(scale, "scale_rows' scales"), rows, cols, stream_);
        });
    }
    void batchnorm_forward(DeviceSpan x, DeviceSpan gamma, DeviceSpan beta, DeviceSpan y, DeviceSpan stats,
                           std::size_t samples, std::size_t channels, std::size_t plane) override {
        need(x, samples * channels * plane, "batchnorm's x");
        need(y, samples * channels * plane, "batchnorm's y");
        need(gamma, channels, "batchnorm's gamma");
        need(beta, channels, "batchnorm's beta");
        need(stats, channels * 2, "batchnorm's statistics");
        if (x.elem != y.elem) throw RuntimeError("cuda ops: batchnorm between element types");
        typed(x, [&](auto* p) {
            using T = std::remove_pointer_t<decltype(p)>;
            cuda::batchnorm_forward(static_cast<const T*>(p), f32(gamma, "gamma"), f32(beta, "beta"),
                                    static_cast<T*>(y.ptr), f32(stats, "statistics"), samples, channels, plane, stream_);
        });
    }
    void batchnorm_backward(DeviceSpan x, DeviceSpan gamma, DeviceSpan stats, DeviceSpan dy, DeviceSpan dx,
                            DeviceSpan dgamma, DeviceSpan dbeta, std::size_t samples, std::size_t channels,
                            std::size_t plane) override {
        need(x, samples * channels * plane, "batchnorm's x");
        need(dy, samples * channels * plane, "batchnorm's dy");
        need(dx, samples * channels * plane, "batchnorm's dx");
        need(dgamma, channels, "batchnorm's dgamma");
        need(dbeta, channels, "batchnorm's dbeta");
        if (x.elem != dy.elem || x.elem != dx.elem) throw RuntimeError("cuda ops: batchnorm between element types");
        typed(x, [&](auto* p) {
            using T = std::remove_pointer_t<decltype(p)>;
            cuda::batchnorm_backward(static_cast<const T*>(p), f32(gamma, "gamma"), f32(stats, "statistics"),
                                     static_cast<const T*>(dy.ptr), static_cast<T*>(dx.ptr), f32(dgamma, "dgamma"),
                                     f32(dbeta, "dbeta"), samples, channels, plane, stream_);
        });
    }
    void im2col(DeviceSpan x, std::size_t samples, std::size_t total, std::size_t first, std::size_t channels,
                const Window2d& g, DeviceSpan cols) override {
        need(x, samples * total * g.h * g.w, "im2col's x");
        need(cols, samples * channels * g.kh * g.kw * g.oh * g.ow, "im2col's columns");
        if (x.elem != cols.elem) throw RuntimeError("cuda ops: im2col between element types");
        typed(x, [&](auto* p) {
            using T = std::remove_pointer_t<decltype(p)>;
            cuda::im2col(static_cast<const T*>(p), samples, total, first, channels, window(g), static_cast<T*>(cols.ptr),
                         stream_);
        });
    }
    void col2im(DeviceSpan cols, std::size_t samples, std::size_t total, std::size_t first, std::size_t channels,
                const Window2d& g, DeviceSpan dx) override {
        need(dx, samples * total * g.h * g.w, "col2im's dx");
        need(cols, samples * channels * g.kh * g.kw * g.oh * g.ow, "col2im's columns");
        if (dx.elem != cols.elem) throw RuntimeError("cuda ops: col2im between element types");
        typed(dx, [&](auto* p) {
            using T = std::remove_pointer_t<decltype(p)>;
            cuda::col2im(static_cast<const T*>(cols.ptr), samples, total, first, channels, window(g), p, stream_);
        });
    }
    // Convolutions through cuDNN (deterministic algorithms; a shape it declines goes through
    // im2col and cuBLAS in the layer).
    bool conv2d_forward(const Conv& c, DeviceSpan x, DeviceSpan w, DeviceSpan y) override {
        if (x.elem != w.elem || x.elem != y.elem) return false;
        conv_sizes(c, x, w, y);
        Scratch ws(*this);
        return conv_->forward(stream_, c, x.elem, tf32_, x.ptr, w.ptr, y.ptr, ws.get());
    }
    bool conv2d_backward_data(const Conv& c, DeviceSpan dy, DeviceSpan w, DeviceSpan dx) override {
        if (dy.elem != w.elem || dy.elem != dx.elem) return false;
        conv_sizes(c, dx, w, dy);
        Scratch ws(*this);
        return conv_->backward_data(stream_, c, dy.elem, tf32_, dy.ptr, w.ptr, dx.ptr, ws.get());
    }
    bool conv2d_backward_filter(const Conv& c, DeviceSpan x, DeviceSpan dy, DeviceSpan dw) override {
        if (x.elem != dy.elem || dw.elem != Elem::f32) return false;
        conv_sizes(c, x, dw, dy);
        Scratch ws(*this);
        return conv_->backward_filter(stream_, c, x.elem, tf32_, x.ptr, dy.ptr, dw.ptr, ws.get());
    }

    void pool_forward(bool max, DeviceSpan x, DeviceSpan y, std::size_t planes, const Window2d& g) override {
        need(x, planes * g.h * g.w, "pool's x");
        need(y, planes * g.oh * g.ow, "pool's y");
        if (x.elem != y.elem) throw RuntimeError("cuda ops: pool between element types");
        typed(x, [&](auto* p) {
            using T = std::remove_pointer_t<decltype(p)>;
            cuda::pool_forward(max, static_cast<const T*>(p), static_cast<T*>(y.ptr), planes, window(g), stream_);
        });
    }
    void pool_backward(bool max, DeviceSpan x, DeviceSpan dy, DeviceSpan dx, std::size_t planes,
                       const Window2d& g) override {
        need(x, planes * g.h * g.w, "pool's x");
        need(dx, planes * g.h * g.w, "pool's dx");
        need(dy, planes * g.oh * g.ow, "pool's dy");
        if (x.elem != dy.elem || x.elem != dx.elem) throw RuntimeError("cuda ops: pool between element types");
        typed(x, [&](auto* p) {
            using T = std::remove_pointer_t<decltype(p)>;
            cuda::pool_backward(max, static_cast<const T*>(p), static_cast<const T*>(dy.ptr), static_cast<T*>(dx.ptr),
                                planes, window(g), stream_);
        });
    }
    void attention_softmax_forward(DeviceSpan scores, std::size_t batch_heads, std::size_t s, float scale,
                                   bool causal) override {
        need(scores, batch_heads * s * s, "attention's scores");
        typed(scores, [&](auto* p) { cuda::causal_softmax_forward(p, batch_heads, s, scale, causal, stream_); });
    }
    void attention_softmax_backward(DeviceSpan probs, DeviceSpan dprobs, std::size_t batch_heads, std::size_t s,
                                    float scale) override {
        need(probs, batch_heads * s * s, "attention's probabilities");
        need(dprobs, batch_heads * s * s, "attention's dprobs");
        // Masked probabilities are 0, so every column may be treated as visible.
        typed(dprobs, [&](auto* p) {
            using T = std::remove_pointer_t<decltype(p)>;
            cuda::causal_softmax_backward(static_cast<const T*>(probs.ptr), p, batch_heads, s, scale, false, stream_);
        });
    }
    void optimizer_step(const OptimizerOptions& o, std::uint64_t step, DeviceSpan params, DeviceSpan grads,
                        DeviceSpan m, DeviceSpan v) override {
        float* p = f32(params, "parameters");
        const float* g = f32(grads, "gradients");
        if (o.kind == OptimizerKind::sgd) {
            cuda::sgd_step(p, g, params.count, o.lr, stream_);
            return;
        }
        cuda::adam_step(p, g, f32(m, "Adam's m"), f32(v, "Adam's v"), params.count, o.lr, o.beta1, o.beta2, o.eps,
                        0.0f, step, stream_);
    }

private:
    int device_;
    cudaStream_t stream_ = nullptr;
    bool own_stream_ = false;
    std::string name_;
    MemoryMeter meter_;
    Resizer resizer_;
    std::chrono::milliseconds wait_limit_{0};  ///< 0: synchronize() waits for as long as it takes
    bool stuck_ = false;                        ///< a bounded wait gave up (or threw) on this stream
    std::unique_ptr<cuda::Blas> blas_;
    bool tf32_ = false;
    std::unique_ptr<cuda::CudnnConv> conv_ = std::make_unique<cuda::CudnnConv>();

    /// A convolution's workspace: allocated when cuDNN asks, released (in stream order) after it.
    class Scratch {
    public:
        explicit Scratch(CudaOps& ops) : ops_(ops) {}
        ~Scratch() { ops_.release(span_); }
        Scratch(const Scratch&) = delete;
        Scratch& operator=(const Scratch&) = delete;
        [[nodiscard]] cuda::CudnnConv::Workspace get() {
            return [this](std::size_t bytes) {
                ops_.release(span_);
                span_ = {};
                span_ = ops_.allocate_uninitialized((bytes + 3) / 4, Elem::f32);
                return span_.ptr;
            };
        }

    private:
        CudaOps& ops_;
        DeviceSpan span_;
    };
    void conv_sizes(const Conv& c, DeviceSpan x, DeviceSpan w, DeviceSpan y) const {
        need(x, c.samples * c.in * c.g.h * c.g.w, "a convolution's input");
        need(w, c.out * (c.in / c.groups) * c.g.kh * c.g.kw, "a convolution's filter");
        need(y, c.samples * c.out * c.g.oh * c.g.ow, "a convolution's output");
    }
};

}  // namespace

cuda::OpsStream cuda::stream_of(DeviceOps& ops) {
    auto* c = dynamic_cast<CudaOps*>(&ops);
    if (c == nullptr) throw RuntimeError(fmt::format("{} is not a CUDA device: NCCL needs the cuda backend", ops.name()));
    return c->native();
}

// --- CudaDevices --------------------------------------------------------------------------

struct CudaDevices::Impl {
    struct Target {
        int gpu = 0;
        std::string name;
        // A partition: the green context and a stream on it.
        CUgreenCtx green = nullptr;
        CUstream stream = nullptr;
        std::uint32_t sms = 0;
        std::uint32_t step = 8;  // the GPU's partition step
        // The partition shrunk by a slowdown, while it is.
        CUgreenCtx shrunk = nullptr;
        CUstream shrunk_stream = nullptr;
    };

    /// The stream of `device`'s partition shrunk for `factor` (its own when factor <= 1 or the
    /// shrink leaves every SM), made current on the calling thread; `realised` = the slowdown.
    cudaStream_t resize(std::size_t device, double factor, double& realised, std::uint32_t& sms_out) {
        std::lock_guard lock(mutex);
        Target& t = targets.at(device);
        const Driver& cu = Driver::get();
        // The previous shrunk context goes once the new one exists (the caller has synchronised
        // its stream): a failure below leaves the caller on a stream that still exists.
        CUgreenCtx old_ctx = t.shrunk;
        CUstream old_stream = t.shrunk_stream;
        t.shrunk = nullptr;
        t.shrunk_stream = nullptr;
        const auto drop_old = [&] {
            if (old_stream != nullptr) cu.stream_destroy(old_stream);
            if (old_ctx != nullptr) cu.green_ctx_destroy(old_ctx);
        };
        const std::uint32_t want = shrunk_sms(t.sms, factor, t.step);
        realised = 1.0;
        CUgreenCtx current = t.green;
        CUstream stream = t.stream;
        std::uint32_t sms = t.sms;
        if (want < t.sms) {
            // A green context's resources can be split again once it exists (CUDA's rule).
            CUdevResource mine{};
            check_cu(cu.green_ctx_get_dev_resource(t.green, &mine, CU_DEV_RESOURCE_TYPE_SM),
                     "cuGreenCtxGetDevResource");
            CUdevResource part{};
            CUdevResource rest{};
            unsigned n = 1;
            check_cu(cu.sm_resource_split_by_count(&part, &n, &mine, &rest, 0, want), "cuDevSmResourceSplitByCount");
            if (n != 1) throw RuntimeError(fmt::format("{}: could not cut {} SMs for a slowdown of {}", t.name, want, factor));
            CUdevResourceDesc desc = nullptr;
            check_cu(cu.dev_resource_generate_desc(&desc, &part, 1), "cuDevResourceGenerateDesc");
            CUdevice dev = 0;
            check_cu(cu.device_get(&dev, t.gpu), "cuDeviceGet");
            check_cu(cu.green_ctx_create(&t.shrunk, desc, dev, CU_GREEN_CTX_DEFAULT_STREAM), "cuGreenCtxCreate");
            check_cu(cu.green_ctx_stream_create(&t.shrunk_stream, t.shrunk, CU_STREAM_NON_BLOCKING, 0),
                     "cuGreenCtxStreamCreate");
            realised = partition_slowdown(t.sms, part.sm.smCount);
            current = t.shrunk;
            stream = t.shrunk_stream;
            sms = part.sm.smCount;
        }
        CUcontext ctx = nullptr;
        check_cu(cu.ctx_from_green_ctx(&ctx, current), "cuCtxFromGreenCtx");
        check_cu(cu.ctx_set_current(ctx), "cuCtxSetCurrent");
        drop_old();
        sms_out = sms;
        return reinterpret_cast<cudaStream_t>(stream);
    }
    std::map<std::size_t, Target> targets;  // by cluster device
    std::mutex mutex;

    ~Impl() {
        for (auto& [d, t] : targets) {
            if (t.shrunk_stream != nullptr) Driver::get().stream_destroy(t.shrunk_stream);
            if (t.shrunk != nullptr) Driver::get().green_ctx_destroy(t.shrunk);
            if (t.stream != nullptr) Driver::get().stream_destroy(t.stream);
            if (t.green != nullptr) Driver::get().green_ctx_destroy(t.green);
        }
    }
};

namespace {

/// Makes `gpu`'s primary context (green contexts want it active) and keeps its stream-ordered
/// pool's memory cached: by default the pool returns memory to the OS at every synchronisation,
/// and a worker synchronises after every upload and task. Partitions share the pool; a
/// partition's allocation must not wait on another's pending frees (internal dependencies off).
void prepare_gpu(int gpu) {
    check_cuda(cudaSetDevice(gpu), "cudaSetDevice");
    check_cuda(cudaFree(nullptr), "cudaFree(0) (primary context)");
    cudaMemPool_t pool = nullptr;
    check_cuda(cudaDeviceGetDefaultMemPool(&pool, gpu), "cudaDeviceGetDefaultMemPool");
    std::uint64_t keep = UINT64_MAX;
    check_cuda(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep),
               "cudaMemPoolSetAttribute(release threshold)");
    int no = 0;
    check_cuda(cudaMemPoolSetAttribute(pool, cudaMemPoolReuseAllowInternalDependencies, &no),
               "cudaMemPoolSetAttribute(internal dependencies)");
}

}  // namespace

CudaDevices::CudaDevices(const Cluster& cluster) : impl_(std::make_unique<Impl>()) {
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
        cudaGetLastError();
        throw RuntimeError(fmt::format("--backend cuda: no CUDA device is visible ({})",
                                       e != cudaSuccess ? cudaGetErrorString(e) : "0 devices"));
    }
    // Whole devices: the k-th of its node is CUDA device k.
    std::map<std::size_t, int> next_whole;
    for (std::size_t i = 0; i < cluster.devices.size(); ++i) {
        const Device& d = cluster.devices[i];
        if (d.partition) continue;
        const int gpu = next_whole[d.node]++;
        if (gpu >= count)
            throw InputError(d.where, fmt::format("device \"{}\" is whole GPU #{} of its node, but this machine has {}",
                                                  d.name, gpu, count));
        cudaDeviceProp prop{};
        check_cuda(cudaGetDeviceProperties(&prop, gpu), "cudaGetDeviceProperties");
        prepare_gpu(gpu);
        Impl::Target t;
        t.gpu = gpu;
        t.name = fmt::format("CUDA device {} ({})", gpu, prop.name);
        impl_->targets[i] = std::move(t);
    }
    // Partitions: each GPU's layout cut at once.
    for (const GpuLayout& layout : gpu_layouts(cluster)) {
        const int gpu = static_cast<int>(layout.gpu);
        if (gpu >= count)
            throw InputError(cluster.devices.at(layout.devices.front()).where,
                             fmt::format("partitions of GPU {}, but this machine has {} GPU(s)", gpu, count));
        cudaDeviceProp prop{};
        check_cuda(cudaGetDeviceProperties(&prop, gpu), "cudaGetDeviceProperties");
        check_layout_fits(layout, {prop.multiProcessorCount, prop.major, prop.minor, prop.name}, cluster);
        prepare_gpu(gpu);
        const Driver& cu = Driver::get();
        CUdevice dev = 0;
        check_cu(cu.device_get(&dev, gpu), "cuDeviceGet");
        CUdevResource input{};
        check_cu(cu.device_get_dev_resource(dev, &input, CU_DEV_RESOURCE_TYPE_SM), "cuDeviceGetDevResource");
        std::size_t next = 0;
        // A split's outputs cannot be split again until a green context is made of them (CUDA's
        // rule): the rest of each step becomes a temporary green context, whose resource the
        // next step splits.
        std::vector<CUgreenCtx> temporaries;
        const auto drop_temporaries = [&] {
            for (CUgreenCtx g : temporaries) cu.green_ctx_destroy(g);
            temporaries.clear();
        };
        const std::vector<SplitStep> steps = split_steps(layout.sms);
        try {
        for (std::size_t si = 0; si < steps.size(); ++si) {
            const SplitStep& step = steps[si];
            std::vector<CUdevResource> groups(step.groups);
            unsigned n = step.groups;
            CUdevResource rest{};
            check_cu(cu.sm_resource_split_by_count(groups.data(), &n, &input, &rest, 0, step.sm),
                     "cuDevSmResourceSplitByCount");
            if (n < step.groups)
                throw RuntimeError(fmt::format("GPU {}: could cut only {} of {} partitions of {} SMs", gpu, n,
                                               step.groups, step.sm));
            for (unsigned g = 0; g < n; ++g, ++next) {
                const std::size_t device = layout.devices.at(next);
                Impl::Target t;
                t.gpu = gpu;
                t.sms = groups[g].sm.smCount;
                t.step = sm_granularity(prop.major);
                CUdevResourceDesc desc = nullptr;
                check_cu(cu.dev_resource_generate_desc(&desc, &groups[g], 1), "cuDevResourceGenerateDesc");
                check_cu(cu.green_ctx_create(&t.green, desc, dev, CU_GREEN_CTX_DEFAULT_STREAM), "cuGreenCtxCreate");
                check_cu(cu.green_ctx_stream_create(&t.stream, t.green, CU_STREAM_NON_BLOCKING, 0), "cuGreenCtxStreamCreate");
                t.name = fmt::format("CUDA device {} ({}), green context of {} SMs", gpu, prop.name, t.sms);
                impl_->targets[device] = std::move(t);
            }
            if (si + 1 < steps.size()) {
                CUdevResourceDesc desc = nullptr;
                check_cu(cu.dev_resource_generate_desc(&desc, &rest, 1), "cuDevResourceGenerateDesc (rest)");
                CUgreenCtx tmp = nullptr;
                check_cu(cu.green_ctx_create(&tmp, desc, dev, CU_GREEN_CTX_DEFAULT_STREAM), "cuGreenCtxCreate (rest)");
                temporaries.push_back(tmp);
                check_cu(cu.green_ctx_get_dev_resource(tmp, &input, CU_DEV_RESOURCE_TYPE_SM),
                         "cuGreenCtxGetDevResource (rest)");
            }
        }
        } catch (...) {
            drop_temporaries();
            throw;
        }
        drop_temporaries();
    }
}

CudaDevices::~CudaDevices() = default;

std::unique_ptr<DeviceOps> CudaDevices::ops(std::size_t device, bool tf32, std::chrono::milliseconds wait_limit) {
    std::lock_guard lock(impl_->mutex);
    const auto it = impl_->targets.find(device);
    if (it == impl_->targets.end()) throw RuntimeError(fmt::format("cluster device {} has no CUDA target", device));
    const Impl::Target& t = it->second;
    check_cuda(cudaSetDevice(t.gpu), "cudaSetDevice");
    if (t.green != nullptr) {
        // Work this thread enqueues runs on the partition's SMs: its green context is current.
        CUcontext ctx = nullptr;
        check_cu(Driver::get().ctx_from_green_ctx(&ctx, t.green), "cuCtxFromGreenCtx");
        check_cu(Driver::get().ctx_set_current(ctx), "cuCtxSetCurrent");
    }
    if (t.green == nullptr) return std::make_unique<CudaOps>(t.gpu, nullptr, t.name, tf32, wait_limit);  // a stream of its own
    Impl* impl = impl_.get();
    return std::make_unique<CudaOps>(t.gpu, reinterpret_cast<cudaStream_t>(t.stream), t.name, tf32, wait_limit, t.sms,
                                     [impl, device](double factor, double& realised, std::uint32_t& sms) {
                                         return impl->resize(device, factor, realised, sms);
                                     });
}

std::unique_ptr<DeviceOps> make_gpu_ops(int gpu, bool tf32) {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || gpu < 0 || gpu >= count) {
        cudaGetLastError();
        throw RuntimeError(fmt::format("no CUDA device {} (this machine shows {})", gpu, count));
    }
    prepare_gpu(gpu);  // the pool a run uses: freed memory kept for the next allocation
    cudaDeviceProp prop{};
    check_cuda(cudaGetDeviceProperties(&prop, gpu), "cudaGetDeviceProperties");
    return std::make_unique<CudaOps>(gpu, nullptr, fmt::format("CUDA device {} ({})", gpu, prop.name), tf32,
                                     std::chrono::milliseconds(0));
}

std::string CudaDevices::describe(std::size_t device) const {
    const auto it = impl_->targets.find(device);
    return it == impl_->targets.end() ? std::string("none") : it->second.name;
}

std::optional<std::uint64_t> CudaDevices::memory_domain(std::size_t device) const {
    const auto it = impl_->targets.find(device);
    if (it == impl_->targets.end()) return std::nullopt;
    return static_cast<std::uint64_t>(it->second.gpu);
}

bool built_with_cuda_backend() noexcept { return true; }

}  // namespace dpart::rt
