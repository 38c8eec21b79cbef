#include "cudnn_conv.hpp"

#include <fmt/format.h>

#include "dpart/core/error.hpp"

namespace dpart::rt::cuda {
namespace {

void check(cudnnStatus_t s, const char* what) {
    if (s != CUDNN_STATUS_SUCCESS) throw RuntimeError(fmt::format("{}: {}", what, cudnnGetErrorString(s)));
}

constexpr std::size_t workspace_limit = std::size_t{1} << 30;

}  // namespace

/// The four descriptors of one convolution (destroyed with it).
struct CudnnConv::Descriptors {
    cudnnTensorDescriptor_t x = nullptr, y = nullptr;
    cudnnFilterDescriptor_t w = nullptr;
    cudnnConvolutionDescriptor_t conv = nullptr;
    bool ok = false;  ///< cuDNN's output size is dpart's

    Descriptors(const DeviceOps::Conv& c, Elem e, bool tf32) {
        const cudnnDataType_t type = e == Elem::bf16 ? CUDNN_DATA_BFLOAT16 : CUDNN_DATA_FLOAT;
        const auto i = [](std::size_t v) { return static_cast<int>(v); };
        check(cudnnCreateTensorDescriptor(&x), "cudnnCreateTensorDescriptor");
        check(cudnnCreateTensorDescriptor(&y), "cudnnCreateTensorDescriptor");
        check(cudnnCreateFilterDescriptor(&w), "cudnnCreateFilterDescriptor");
        check(cudnnCreateConvolutionDescriptor(&conv), "cudnnCreateConvolutionDescriptor");
        const Window2d& g = c.g;
        check(cudnnSetTensor4dDescriptor(x, CUDNN_TENSOR_NCHW, type, i(c.samples), i(c.in), i(g.h), i(g.w)),
              "cudnnSetTensor4dDescriptor (x)");
        check(cudnnSetFilter4dDescriptor(w, type, CUDNN_TENSOR_NCHW, i(c.out), i(c.in / c.groups), i(g.kh), i(g.kw)),
              "cudnnSetFilter4dDescriptor");
        check(cudnnSetConvolution2dDescriptor(conv, i(g.pad), i(g.pad), i(g.stride), i(g.stride), 1, 1,
                                              CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT),
              "cudnnSetConvolution2dDescriptor");
        check(cudnnSetConvolutionGroupCount(conv, i(c.groups)), "cudnnSetConvolutionGroupCount");
        // fp32 without --tf32: no tensor cores (FMA), as cuBLAS's products; otherwise tensor ops.
        check(cudnnSetConvolutionMathType(conv, e == Elem::f32 && !tf32 ? CUDNN_FMA_MATH : CUDNN_DEFAULT_MATH),
              "cudnnSetConvolutionMathType");
        int n = 0, k = 0, oh = 0, ow = 0;
        check(cudnnGetConvolution2dForwardOutputDim(conv, x, w, &n, &k, &oh, &ow), "cudnnGetConvolution2dForwardOutputDim");
        ok = n == i(c.samples) && k == i(c.out) && oh == i(g.oh) && ow == i(g.ow);
        if (ok)
            check(cudnnSetTensor4dDescriptor(y, CUDNN_TENSOR_NCHW, type, n, k, oh, ow), "cudnnSetTensor4dDescriptor (y)");
    }
    ~Descriptors() {
        cudnnDestroyConvolutionDescriptor(conv);
        cudnnDestroyFilterDescriptor(w);
        cudnnDestroyTensorDescriptor(y);
        cudnnDestroyTensorDescriptor(x);
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
    // cuDNN's heuristic order, the first deterministic algorithm that fits the workspace.
    const auto pick = [&](const auto* perf, int n) {
        for (int k = 0; k < n; ++k)
            if (perf[k].status == CUDNN_STATUS_SUCCESS && perf[k].determinism == CUDNN_DETERMINISTIC &&
                perf[k].memory <= workspace_limit) {
                out = {true, static_cast<int>(perf[k].algo), perf[k].memory, perf[k].mathType};
                return;
            }
    };
    int n = 0;
    if (kind == Kind::forward) {
        cudnnConvolutionFwdAlgoPerf_t perf[CUDNN_CONVOLUTION_FWD_ALGO_COUNT] = {};
        check(cudnnGetConvolutionForwardAlgorithm_v7(handle_, d.x, d.w, d.conv, d.y, CUDNN_CONVOLUTION_FWD_ALGO_COUNT, &n,
                                                     perf),
              "cudnnGetConvolutionForwardAlgorithm_v7");
        pick(perf, n);
    } else if (kind == Kind::data) {
        cudnnConvolutionBwdDataAlgoPerf_t perf[CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT] = {};
        check(cudnnGetConvolutionBackwardDataAlgorithm_v7(handle_, d.w, d.y, d.conv, d.x,
                                                          CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT, &n, perf),
              "cudnnGetConvolutionBackwardDataAlgorithm_v7");
        pick(perf, n);
    } else {
        cudnnConvolutionBwdFilterAlgoPerf_t perf[CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT] = {};
        check(cudnnGetConvolutionBackwardFilterAlgorithm_v7(handle_, d.x, d.y, d.conv, d.w,
                                                            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT, &n, perf),
              "cudnnGetConvolutionBackwardFilterAlgorithm_v7");
        pick(perf, n);
    }
    choices_.emplace(key, out);
    return out;
}

bool CudnnConv::forward(cudaStream_t stream, const DeviceOps::Conv& c, Elem e, bool tf32, const void* x, const void* w,
                        void* y, const Workspace& workspace) {
    if (e == Elem::i32) return false;
    const Descriptors d(c, e, tf32);
    if (!d.ok) return false;
    handle(stream);
    const Choice ch = choose(Kind::forward, c, e, tf32, d);
    if (!ch.ok) return false;
    check(cudnnSetConvolutionMathType(d.conv, ch.math), "cudnnSetConvolutionMathType");
    const float alpha = 1.0f, beta = 0.0f;
    check(cudnnConvolutionForward(handle_, &alpha, d.x, x, d.w, w, d.conv,
                                  static_cast<cudnnConvolutionFwdAlgo_t>(ch.algo),
                                  ch.workspace > 0 ? workspace(ch.workspace) : nullptr, ch.workspace, &beta, d.y, y),
          "cudnnConvolutionForward");
    return true;
}

bool CudnnConv::backward_data(cudaStream_t stream, const DeviceOps::Conv& c, Elem e, bool tf32, const void* dy,
                              const void* w, void* dx, const Workspace& workspace) {
    if (e == Elem::i32) return false;
    const Descriptors d(c, e, tf32);
    if (!d.ok) return false;
    handle(stream);
    const Choice ch = choose(Kind::data, c, e, tf32, d);
    if (!ch.ok) return false;
    check(cudnnSetConvolutionMathType(d.conv, ch.math), "cudnnSetConvolutionMathType");
    const float alpha = 1.0f, beta = 0.0f;
    check(cudnnConvolutionBackwardData(handle_, &alpha, d.w, w, d.y, dy, d.conv,
                                       static_cast<cudnnConvolutionBwdDataAlgo_t>(ch.algo),
                                       ch.workspace > 0 ? workspace(ch.workspace) : nullptr, ch.workspace, &beta, d.x, dx),
          "cudnnConvolutionBackwardData");
    return true;
}

bool CudnnConv::backward_filter(cudaStream_t stream, const DeviceOps::Conv& c, Elem e, bool tf32, const void* x,
                                const void* dy, void* dw, const Workspace& workspace) {
    if (e != Elem::f32) return false;
    const Descriptors d(c, e, tf32);
    if (!d.ok) return false;
    handle(stream);
    const Choice ch = choose(Kind::filter, c, e, tf32, d);
    if (!ch.ok) return false;
    check(cudnnSetConvolutionMathType(d.conv, ch.math), "cudnnSetConvolutionMathType");
    const float alpha = 1.0f, beta = 1.0f;  // dw +=
    check(cudnnConvolutionBackwardFilter(handle_, &alpha, d.x, x, d.y, dy, d.conv,
                                         static_cast<cudnnConvolutionBwdFilterAlgo_t>(ch.algo),
                                         ch.workspace > 0 ? workspace(ch.workspace) : nullptr, ch.workspace, &beta, d.w,
                                         dw),
          "cudnnConvolutionBackwardFilter");
    return true;
}

}  // namespace dpart::rt::cuda
