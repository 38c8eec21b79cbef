#pragma once
// cuDNN's convolutions for the CUDA DeviceOps (DeviceOps::conv2d_*): NCHW tensors, the filter
// [out, in / groups, kh, kw], groups, stride and padding as dpart's Window2d; fp32 (FMA math, or
// TF32 when allowed) or bf16 data (tensor-op math), fp32 accumulation. For each shape the
// algorithm is cuDNN's first heuristic choice among its deterministic ones within 1 GiB of
// workspace, cached; a shape or type cuDNN cannot do that way is declined (the layer then uses
// im2col and cuBLAS), never guessed.
#include <cuda_runtime.h>
#include <cudnn.h>

#include <cstddef>
#include <functional>
#include <map>
#include <tuple>

#include "dpart/runtime/device.hpp"

namespace dpart::rt::cuda {

class CudnnConv {
public:
    /// `workspace(bytes)` returns device memory for one call, valid in stream order until the
    /// next call of it (the caller releases it after the convolution, on the same stream).
    using Workspace = std::function<void*(std::size_t bytes)>;

    CudnnConv() = default;
    ~CudnnConv();
    CudnnConv(const CudnnConv&) = delete;
    CudnnConv& operator=(const CudnnConv&) = delete;

    /// y = conv(x, w); false when declined.
    bool forward(cudaStream_t stream, const DeviceOps::Conv& c, Elem e, bool tf32, const void* x, const void* w,
                 void* y, const Workspace& workspace);
    /// dx = conv^T(dy, w); false when declined.
    bool backward_data(cudaStream_t stream, const DeviceOps::Conv& c, Elem e, bool tf32, const void* dy, const void* w,
                       void* dx, const Workspace& workspace);
    /// dw (f32) += the filter gradient of f32 x and dy; false when declined (bf16 data: its
    /// gradient would be rounded to bf16 before it is added).
    bool backward_filter(cudaStream_t stream, const DeviceOps::Conv& c, Elem e, bool tf32, const void* x,
                         const void* dy, void* dw, const Workspace& workspace);

private:
    enum class Kind : int { forward, data, filter };
    using Key = std::tuple<int, int, int, std::size_t, std::size_t, std::size_t, std::size_t, std::size_t, std::size_t,
                           std::size_t, std::size_t, std::size_t, std::size_t>;
    struct Choice {
        bool ok = false;
        int algo = 0;
        std::size_t workspace = 0;
        cudnnMathType_t math = CUDNN_DEFAULT_MATH;
    };
    struct Descriptors;
    cudnnHandle_t handle(cudaStream_t stream);
    Choice choose(Kind kind, const DeviceOps::Conv& c, Elem e, bool tf32, const Descriptors& d);
    /// The steps every convolution shares (descriptors, handle, algorithm, math type), then
    /// call(descriptors, algorithm, workspace, its bytes); false when declined.
    template <class Call>
    bool run(Kind kind, cudaStream_t stream, const DeviceOps::Conv& c, Elem e, bool tf32, const Workspace& workspace,
             Call&& call);

    cudnnHandle_t handle_ = nullptr;
    std::map<Key, Choice> choices_;
};

}  // namespace dpart::rt::cuda
