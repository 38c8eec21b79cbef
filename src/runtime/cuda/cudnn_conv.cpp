#include "cudnn_conv.hpp"

#include <fmt/format.h>

#include "dpart/core/error.hpp"

namespace dpart::rt::cuda {
namespace {

void check(cudnnStatus_t s, const char* what) {
    if (s != CUDNN_STATUS_SUCCESS) throw RuntimeError(fmt::format("{}: {}", what, cudnnGetErrorString(s)));
}
/// A status that means "cuDNN cannot do this one": declined, not an error.
bool declined(cudnnStatus_t s) { return s == CUDNN_STATUS_BAD_PARAM || s == CUDNN_STATUS_NOT_SUPPORTED; }

constexpr std::size_t workspace_limit = std::size_t{1} << 30;

/// Every size cuDNN's int arguments and 32-bit indexing take (tensors of at most 2^31 - 1
/// elements), and none zero.
bool fits(const DeviceOps::Conv& c) {
    constexpr std::size_t max = 0x7fffffff;
    const Window2d& g = c.g;
    for (std::size_t v : {c.samples, c.in, c.out, c.groups, g.h, g.w, g.kh, g.kw, g.stride, g.oh, g.ow})
        if (v == 0 || v > max) return false;
    if (g.pad > max || c.in % c.groups != 0 || c.out % c.groups != 0) return false;
    const auto small = [&](std::size_t a, std::size_t b, std::size_t d) { return a <= max / b && a * b <= max / d; };
    return small(c.samples * c.in, g.h, g.w) && c.samples <= max / c.in && small(c.samples * c.out, g.oh, g.ow) &&
           c.samples <= max / c.out && small(c.out * (c.in / c.groups), g.kh, g.kw);
}

}  // namespace

/// The four descriptors of one convolution (destroyed with it).
struct CudnnConv::Descriptors {
    cudnnTensorDescriptor_t x = nullptr, y = nullptr;
    cudnnFilterDescriptor_t w = nullptr;
    cudnnConvolutionDescriptor_t conv = nullptr;
    bool ok = false;  ///< cuDNN's output size is dpart's

    /// ok: cuDNN takes the shape and its output size is dpart's; a shape it refuses leaves ok
    /// false (declined); only a failure to create descriptors throws (after freeing what was made).
    Descriptors(const DeviceOps::Conv& c, Elem e, bool tf32) {
        if (!fits(c)) return;
        const cudnnDataType_t type = e == Elem::bf16 ? CUDNN_DATA_BFLOAT16 : CUDNN_DATA_FLOAT;
        const auto i = [](std::size_t v) { return static_cast<int>(v); };
        try {
            check(cudnnCreateTensorDescriptor(&x), "cudnnCreateTensorDescriptor");
            check(cudnnCreateTensorDescriptor(&y), "cudnnCreateTensorDescriptor");
            check(cudnnCreateFilterDescriptor(&w), "cudnnCreateFilterDescriptor");
            check(cudnnCreateConvolutionDescriptor(&conv), "cudnnCreateConvolutionDescriptor");
        } catch (...) {
            free();
            throw;
        }
        const Window2d& g = c.g;
        // fp32 without --tf32: no tensor cores (FMA), as cuBLAS's products; otherwise tensor ops.
        const cudnnMathType_t math = e == Elem::f32 && !tf32 ? CUDNN_FMA_MATH : CUDNN_DEFAULT_MATH;
        int n = 0, k = 0, oh = 0, ow = 0;
        for (const cudnnStatus_t s :
             {cudnnSetTensor4dDescriptor(x, CUDNN_TENSOR_NCHW, type, i(c.samples), i(c.in), i(g.h), i(g.w)),
              cudnnSetFilter4dDescriptor(w, type, CUDNN_TENSOR_NCHW, i(c.out), i(c.in / c.groups), i(g.kh), i(g.kw)),
              cudnnSetConvolution2dDescriptor(conv, i(g.pad), i(g.pad), i(g.stride), i(g.stride), 1, 1,
                                              CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT),
              cudnnSetConvolutionGroupCount(conv, i(c.groups)), cudnnSetConvolutionMathType(conv, math),
              cudnnGetConvolution2dForwardOutputDim(conv, x, w, &n, &k, &oh, &ow)}) {
            if (declined(s)) return;
            check(s, "cuDNN convolution descriptors");
        }
        if (n != i(c.samples) || k != i(c.out) || oh != i(g.oh) || ow != i(g.ow)) return;
        const cudnnStatus_t s = cudnnSetTensor4dDescriptor(y, CUDNN_TENSOR_NCHW, type, n, k, oh, ow);
        if (declined(s)) return;
        check(s, "cudnnSetTensor4dDescriptor (y)");
        ok = true;
    }
    ~Descriptors() { free(); }
    void free() noexcept {
        if (conv != nullptr) cudnnDestroyConvolutionDescriptor(conv);
        if (w != nullptr) cudnnDestroyFilterDescriptor(w);
        if (y != nullptr) cudnnDestroyTensorDescriptor(y);
        if (x != nullptr) cudnnDestroyTensorDescriptor(x);
        conv = nullptr, w = nullptr, y = nullptr, x = nullptr;
    }
    Descriptors(const Descriptors&) = delete;
    Descriptors& operator=(const Descriptors&) = delete;
};

CudnnConv::~CudnnConv() {
    if (handle_ != nullptr) cudnnDestroy(handle_);
}

cudnnHandle_t CudnnConv::handle(cudaStream_t stream) {
    if (handle_ == nullptr) check(cudnnCreate(&handle_), "cudnnCreate");
    check(cudnnSetStream(handle_, stream), "cudnnSetStream");
    return handle_;
}

CudnnConv::Choice CudnnConv::choose(Kind kind, const DeviceOps::Conv& c, Elem e, bool tf32, const Descriptors& d) {
    const Key key{static_cast<int>(kind), static_cast<int>(e), tf32 ? 1 : 0, c.samples, c.in, c.out, c.groups, c.g.h,
                  c.g.w, c.g.kh, c.g.kw, c.g.stride, c.g.pad};
    if (const auto it = choices_.find(key); it != choices_.end()) return it->second;
    Choice out;
    // cuDNN's heuristic order, the first deterministic algorithm that fits the workspace (and, for
    // fp32 without --tf32, that keeps to FMA math: no TF32 behind the user's back).
    const bool fma = e == Elem::f32 && !tf32;
    const auto pick = [&](const auto* perf, int n) {
        for (int k = 0; k < n; ++k)
            if (perf[k].status == CUDNN_STATUS_SUCCESS && perf[k].determinism == CUDNN_DETERMINISTIC &&
                perf[k].memory <= workspace_limit && (!fma || perf[k].mathType == CUDNN_FMA_MATH)) {
                out = {true, static_cast<int>(perf[k].algo), perf[k].memory, perf[k].mathType};
                return;
            }
    };
    int n = 0;
    if (kind == Kind::forward) {
        cudnnConvolutionFwdAlgoPerf_t perf[CUDNN_CONVOLUTION_FWD_ALGO_COUNT] = {};
        const cudnnStatus_t s =
            cudnnGetConvolutionForwardAlgorithm_v7(handle_, d.x, d.w, d.conv, d.y, CUDNN_CONVOLUTION_FWD_ALGO_COUNT, &n, perf);
        if (!declined(s)) check(s, "cudnnGetConvolutionForwardAlgorithm_v7"), pick(perf, n);
    } else if (kind == Kind::data) {
        cudnnConvolutionBwdDataAlgoPerf_t perf[CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT] = {};
        const cudnnStatus_t s = cudnnGetConvolutionBackwardDataAlgorithm_v7(
            handle_, d.w, d.y, d.conv, d.x, CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT, &n, perf);
        if (!declined(s)) check(s, "cudnnGetConvolutionBackwardDataAlgorithm_v7"), pick(perf, n);
    } else {
        cudnnConvolutionBwdFilterAlgoPerf_t perf[CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT] = {};
        const cudnnStatus_t s = cudnnGetConvolutionBackwardFilterAlgorithm_v7(
            handle_, d.x, d.y, d.conv, d.w, CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT, &n, perf);
        if (!declined(s)) check(s, "cudnnGetConvolutionBackwardFilterAlgorithm_v7"), pick(perf, n);
    }
    choices_.emplace(key, out);
    return out;
}

template <class Call>
bool CudnnConv::run(Kind kind, cudaStream_t stream, const DeviceOps::Conv& c, Elem e, bool tf32,
                    const Workspace& workspace, Call&& call) {
    if (e == Elem::i32 || (kind == Kind::filter && e != Elem::f32)) return false;
    const Descriptors d(c, e, tf32);
    if (!d.ok) return false;
    handle(stream);
    const Choice ch = choose(kind, c, e, tf32, d);
    if (!ch.ok) return false;
    check(cudnnSetConvolutionMathType(d.conv, ch.math), "cudnnSetConvolutionMathType");
    call(d, ch.algo, ch.workspace > 0 ? workspace(ch.workspace) : nullptr, ch.workspace);
    return true;
}

bool CudnnConv::forward(cudaStream_t stream, const DeviceOps::Conv& c, Elem e, bool tf32, const void* x, const void* w,
                        void* y, const Workspace& workspace) {
    return run(Kind::forward, stream, c, e, tf32, workspace, [&](const Descriptors& d, int algo, void* ws, std::size_t n) {
        const float alpha = 1.0f, beta = 0.0f;
        check(cudnnConvolutionForward(handle_, &alpha, d.x, x, d.w, w, d.conv,
                                      static_cast<cudnnConvolutionFwdAlgo_t>(algo), ws, n, &beta, d.y, y),
              "cudnnConvolutionForward");
    });
}

bool CudnnConv::backward_data(cudaStream_t stream, const DeviceOps::Conv& c, Elem e, bool tf32, const void* dy,
                              const void* w, void* dx, const Workspace& workspace) {
    return run(Kind::data, stream, c, e, tf32, workspace, [&](const Descriptors& d, int algo, void* ws, std::size_t n) {
        const float alpha = 1.0f, beta = 0.0f;
        check(cudnnConvolutionBackwardData(handle_, &alpha, d.w, w, d.y, dy, d.conv,
                                           static_cast<cudnnConvolutionBwdDataAlgo_t>(algo), ws, n, &beta, d.x, dx),
              "cudnnConvolutionBackwardData");
    });
}

bool CudnnConv::backward_filter(cudaStream_t stream, const DeviceOps::Conv& c, Elem e, bool tf32, const void* x,
                                const void* dy, void* dw, const Workspace& workspace) {
    return run(Kind::filter, stream, c, e, tf32, workspace, [&](const Descriptors& d, int algo, void* ws, std::size_t n) {
        const float alpha = 1.0f, beta = 1.0f;  // dw +=
        check(cudnnConvolutionBackwardFilter(handle_, &alpha, d.x, x, d.y, dy, d.conv,
                                             static_cast<cudnnConvolutionBwdFilterAlgo_t>(algo), ws, n, &beta, d.w, dw),
              "cudnnConvolutionBackwardFilter");
    });
}

}  // namespace dpart::rt::cuda
