// dpart_gpu_tests' convolution checks (C++, linked with test_device_ops.cu): the conv2d device
// layer on a GPU, whose convolutions go through cuDNN (DeviceOps::conv2d_*), against the same
// layer on the host DeviceOps (im2col and products, tested against the CPU kernels): forward,
// input gradient and weight gradient, fp32 (FMA math: 1e-4) and bf16 forward and input gradient
// (2e-2; bf16 weight gradients use im2col on the GPU too).
#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "dpart/io/model_toml.hpp"
#include "dpart/runtime/cuda_backend.hpp"
#include "dpart/runtime/device.hpp"
#include "one_gpu.hpp"

namespace dpart::rt {
namespace {

std::vector<float> values(std::size_t n, std::uint64_t seed) {
    std::vector<float> v(n);
    for (std::size_t i = 0; i < n; ++i) v[i] = std::sin(static_cast<float>(seed * 7919 + i) * 0.37f);
    return v;
}

double relative(const std::vector<float>& got, const std::vector<float>& ref) {
    double diff = 0, scale = 1e-12;
    for (std::size_t i = 0; i < ref.size(); ++i) {
        diff = std::max(diff, std::fabs(static_cast<double>(got[i]) - ref[i]));
        scale = std::max(scale, std::fabs(static_cast<double>(ref[i])));
    }
    return diff / scale;
}

struct Result {
    std::vector<float> y, dx, dw;
};

Result run_layer(DeviceOps& ops, const Model& m, std::size_t layer, Elem e, std::size_t n) {
    const auto dev = make_device_layer(m, layer, e);
    const std::size_t in_row = element_count(m.layers[layer].inputs.empty() ? m.input_shape
                                                                            : m.layers[m.layers[layer].inputs[0]].out_shape);
    const std::size_t out_row = element_count(m.layers[layer].out_shape);
    const auto upload = [&](const std::vector<float>& v, Elem t) {
        DeviceBuffer b(ops, v.size(), t);
        ops.upload(v, b.span());
        return b;
    };
    const DeviceBuffer master = upload(values(dev->params(), 1), Elem::f32), copy = upload(values(dev->params(), 1), e);
    const DeviceBuffer x = upload(values(n * in_row, 2), e), dy = upload(values(n * out_row, 3), e);
    const DeviceParams p{master.span(), copy.span()};
    std::vector<DeviceBuffer> saved;
    const std::vector<DeviceSpan> in{x.span()};
    const DeviceBuffer y = dev->forward(ops, DeviceStep{}, in, n, p, saved);
    DeviceBuffer grads(ops, dev->params(), Elem::f32);
    const auto dx = dev->backward(ops, DeviceStep{}, dy.span(), in, n, p, saved, grads.span());
    Result r;
    r.y.resize(y.count());
    r.dx.resize(dx[0].count());
    r.dw.resize(grads.count());
    ops.download(y.span(), r.y);
    ops.download(dx[0].span(), r.dx);
    ops.download(grads.span(), r.dw);
    return r;
}

}  // namespace

void conv_checks(const std::function<void(bool, const std::string&, const std::string&)>& record) {
    const Model m = parse_model(R"([model]
name = "convs"
dtype = "fp32"
global_batch = 8
input_shape = [6, 17, 17]
[[layer]]
name = "strided"
op = "conv2d"
in_channels = 6
out_channels = 8
kernel = 3
stride = 2
padding = 1
[[layer]]
name = "grouped"
op = "conv2d"
in_channels = 8
out_channels = 4
kernel = 2
groups = 2
bias = false
)",
                                "conv check");
    const Cluster cluster = one_gpu_cluster();
    CudaDevices gpus(cluster);
    const std::unique_ptr<DeviceOps> gpu = gpus.ops(0);
    const std::unique_ptr<DeviceOps> host = make_host_ops();
    for (const Elem e : {Elem::f32, Elem::bf16})
        for (std::size_t l = 0; l < m.layers.size(); ++l) {
            const Result a = run_layer(*gpu, m, l, e, 8), b = run_layer(*host, m, l, e, 8);
            const double tol = e == Elem::f32 ? 1e-4 : 2e-2;
            const double ey = relative(a.y, b.y), edx = relative(a.dx, b.dx), edw = relative(a.dw, b.dw);
            const bool ok = ey <= tol && edx <= tol && edw <= tol;
            record(ok, "cudnn conv2d " + m.layers[l].name + (e == Elem::f32 ? " fp32" : " bf16") + " vs host im2col",
                   "forward " + std::to_string(ey) + ", input grad " + std::to_string(edx) + ", weight grad " +
                       std::to_string(edw) + " (tolerance " + std::to_string(tol) + ")");
        }
}

}  // namespace dpart::rt
