// The GPU measurements: cuBLAS GEMMs, a cuDNN convolution, copies and NCCL collectives, timed
// as nvbandwidth and nccl-tests time them. Returns raw seconds; dpart/profile/gpu.hpp does the
// arithmetic. Compiled by nvcc as C++17.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cudnn.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "dpart/profile/gpu_measure.hpp"

namespace dpart::profile::gpu {
namespace {

// --- Errors ----------------------------------------------------------------------------------
void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}
void check(cublasStatus_t s, const char* what) {
    if (s != CUBLAS_STATUS_SUCCESS) throw std::runtime_error(std::string(what) + ": " + cublasGetStatusString(s));
}
void check(cudnnStatus_t s, const char* what) {
    if (s != CUDNN_STATUS_SUCCESS) throw std::runtime_error(std::string(what) + ": " + cudnnGetErrorString(s));
}
void check(ncclResult_t r, const char* what) {
    if (r != ncclSuccess) throw std::runtime_error(std::string(what) + ": " + ncclGetErrorString(r));
}
#define DPART_CHECK(call) check((call), #call)

/// Runs `f` at the end of the scope (releasing a CUDA, cuBLAS, cuDNN or NCCL object).
class Defer {
public:
    explicit Defer(std::function<void()> f) : f_(std::move(f)) {}
    ~Defer() { f_(); }
    Defer(const Defer&) = delete;
    Defer& operator=(const Defer&) = delete;

private:
    std::function<void()> f_;
};

// --- Memory, streams, events -------------------------------------------------------------------
class DeviceBuffer {
public:
    explicit DeviceBuffer(std::size_t bytes) {
        DPART_CHECK(cudaMalloc(&p_, std::max<std::size_t>(bytes, 1)));
        DPART_CHECK(cudaMemset(p_, 0, std::max<std::size_t>(bytes, 1)));
    }
    ~DeviceBuffer() { cudaFree(p_); }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    [[nodiscard]] void* get() const { return p_; }

private:
    void* p_ = nullptr;
};

class PinnedBuffer {
public:
    explicit PinnedBuffer(std::size_t bytes) {
        DPART_CHECK(cudaHostAlloc(&p_, std::max<std::size_t>(bytes, 1), cudaHostAllocPortable));
        std::memset(p_, 1, bytes);
    }
    ~PinnedBuffer() { cudaFreeHost(p_); }
    PinnedBuffer(const PinnedBuffer&) = delete;
    PinnedBuffer& operator=(const PinnedBuffer&) = delete;
    [[nodiscard]] void* get() const { return p_; }

private:
    void* p_ = nullptr;
};

class Stream {
public:
    Stream() { DPART_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
    ~Stream() { cudaStreamDestroy(s_); }
    Stream(const Stream&) = delete;
    Stream& operator=(const Stream&) = delete;
    [[nodiscard]] cudaStream_t get() const { return s_; }

private:
    cudaStream_t s_ = nullptr;
};

class Event {
public:
    Event() { DPART_CHECK(cudaEventCreate(&e_)); }
    ~Event() { cudaEventDestroy(e_); }
    Event(const Event&) = delete;
    Event& operator=(const Event&) = delete;
    [[nodiscard]] cudaEvent_t get() const { return e_; }

private:
    cudaEvent_t e_ = nullptr;
};

// --- Kernels ---------------------------------------------------------------------------------
/// Holds its stream until the host sets *flag (or about 10 s of SM clock cycles pass, so that
/// a failure on the host side never hangs the GPU).
__global__ void spin_until(volatile int* flag, long long max_cycles) {
    const long long start = clock64();
    while (*flag == 0 && clock64() - start < max_cycles) {
    }
}

__device__ float random_unit(std::size_t i, unsigned seed) {
    std::uint64_t x = (static_cast<std::uint64_t>(seed) << 32) ^ (i * 0x9e3779b97f4a7c15ull);
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return static_cast<float>(x >> 40) / static_cast<float>(1ull << 24) * 2.0f - 1.0f;  // [-1, 1)
}

__global__ void fill_f32(float* p, std::size_t n, unsigned seed) {
    for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
         i += static_cast<std::size_t>(gridDim.x) * blockDim.x)
        p[i] = random_unit(i, seed);
}
__global__ void fill_bf16(__nv_bfloat16* p, std::size_t n, unsigned seed) {
    for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
         i += static_cast<std::size_t>(gridDim.x) * blockDim.x)
        p[i] = __float2bfloat16(random_unit(i, seed));
}
__global__ void fill_f16(__half* p, std::size_t n, unsigned seed) {
    for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
         i += static_cast<std::size_t>(gridDim.x) * blockDim.x)
        p[i] = __float2half(random_unit(i, seed));
}

enum class Element { f32, bf16, f16 };
std::size_t element_bytes(Element e) { return e == Element::f32 ? 4 : 2; }

void fill_random(void* p, std::size_t n, Element e, unsigned seed) {
    const unsigned blocks = 1024, threads = 256;
    switch (e) {
        case Element::f32: fill_f32<<<blocks, threads>>>(static_cast<float*>(p), n, seed); break;
        case Element::bf16: fill_bf16<<<blocks, threads>>>(static_cast<__nv_bfloat16*>(p), n, seed); break;
        case Element::f16: fill_f16<<<blocks, threads>>>(static_cast<__half*>(p), n, seed); break;
    }
    DPART_CHECK(cudaGetLastError());
    DPART_CHECK(cudaDeviceSynchronize());
}

// --- Timing ----------------------------------------------------------------------------------
/// A flag in mapped pinned memory that a spinning kernel waits on: the stream is held while
/// the host queues the timed work, so that launch costs are not timed (nvbandwidth's method).
class StreamBlocker {
public:
    StreamBlocker() {
        void* p = nullptr;
        DPART_CHECK(cudaHostAlloc(&p, sizeof(int), cudaHostAllocMapped | cudaHostAllocPortable));
        flag_ = static_cast<volatile int*>(p);
        *flag_ = 1;
    }
    ~StreamBlocker() { cudaFreeHost(const_cast<int*>(flag_)); }
    StreamBlocker(const StreamBlocker&) = delete;
    StreamBlocker& operator=(const StreamBlocker&) = delete;

    void block(cudaStream_t s) {
        *flag_ = 0;
        int* device_flag = nullptr;
        DPART_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&device_flag), const_cast<int*>(flag_), 0));
        spin_until<<<1, 1, 0, s>>>(device_flag, 20'000'000'000ll);
        DPART_CHECK(cudaGetLastError());
    }
    void release() { *flag_ = 1; }

private:
    volatile int* flag_ = nullptr;
};

/// Event-timed samples of `per_sample` operations queued behind a blocked stream, after one
/// unblocked operation (libraries' first-call setup) and one untimed sample.
std::vector<double> timed_on_stream(cudaStream_t stream, const Timing& t, const std::function<void()>& enqueue) {
    enqueue();
    DPART_CHECK(cudaStreamSynchronize(stream));
    StreamBlocker blocker;
    Event start, stop;
    const int per_sample = std::max(1, t.per_sample);
    std::vector<double> out;
    for (int sample = -1; sample < std::max(1, t.samples); ++sample) {
        blocker.block(stream);
        try {
            DPART_CHECK(cudaEventRecord(start.get(), stream));
            for (int i = 0; i < per_sample; ++i) enqueue();
            DPART_CHECK(cudaEventRecord(stop.get(), stream));
        } catch (...) {
            blocker.release();
            cudaStreamSynchronize(stream);
            throw;
        }
        blocker.release();
        DPART_CHECK(cudaEventSynchronize(stop.get()));
        float ms = 0;
        DPART_CHECK(cudaEventElapsedTime(&ms, start.get(), stop.get()));
        if (sample >= 0) out.push_back(static_cast<double>(ms) * 1e-3 / per_sample);
    }
    return out;
}

/// Host-timed samples: the wall time of `per_sample` calls of `op` and then `finish`.
std::vector<double> timed_on_host(const Timing& t, const std::function<void()>& op, const std::function<void()>& finish) {
    const int per_sample = std::max(1, t.per_sample);
    std::vector<double> out;
    for (int sample = -1; sample < std::max(1, t.samples); ++sample) {
        const auto begin = std::chrono::steady_clock::now();
        for (int i = 0; i < per_sample; ++i) op();
        finish();
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
        if (sample >= 0) out.push_back(s / per_sample);
    }
    return out;
}

const char* algorithm_name(cudnnConvolutionFwdAlgo_t a) {
    switch (a) {
        case CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM: return "IMPLICIT_GEMM";
        case CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM: return "IMPLICIT_PRECOMP_GEMM";
        case CUDNN_CONVOLUTION_FWD_ALGO_GEMM: return "GEMM";
        case CUDNN_CONVOLUTION_FWD_ALGO_DIRECT: return "DIRECT";
        case CUDNN_CONVOLUTION_FWD_ALGO_FFT: return "FFT";
        case CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING: return "FFT_TILING";
        case CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD: return "WINOGRAD";
        case CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED: return "WINOGRAD_NONFUSED";
        default: return "unknown";
    }
}

/// Enables `device`'s access to `peer`'s memory where the pair allows it (idempotent).
void enable_peer(int device, int peer) {
    if (device == peer || !can_access_peer(device, peer)) return;
    DPART_CHECK(cudaSetDevice(device));
    const cudaError_t e = cudaDeviceEnablePeerAccess(peer, 0);
    if (e == cudaErrorPeerAccessAlreadyEnabled) {
        (void)cudaGetLastError();
        return;
    }
    check(e, "cudaDeviceEnablePeerAccess");
}

}  // namespace

std::string unavailable() {
    int driver = 0;
    if (cudaDriverGetVersion(&driver) != cudaSuccess || driver == 0) {
        (void)cudaGetLastError();
        return "no CUDA device visible (no CUDA driver found)";
    }
    int count = 0;  // left unchanged by a failing call
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return std::string("no CUDA device visible (") + cudaGetErrorString(e) + ")";
    }
    if (count == 0) return "no CUDA device visible";
    return "";
}

int device_count() {
    if (!unavailable().empty()) return 0;
    int count = 0;
    DPART_CHECK(cudaGetDeviceCount(&count));
    return count;
}

DeviceFacts device_facts(int device) {
    cudaDeviceProp p{};
    DPART_CHECK(cudaGetDeviceProperties(&p, device));
    DeviceFacts f;
    f.name = p.name;
    char bus[32] = {};
    DPART_CHECK(cudaDeviceGetPCIBusId(bus, sizeof bus - 1, device));
    f.pci_bus = bus;
    f.sms = p.multiProcessorCount;
    f.cc_major = p.major;
    f.cc_minor = p.minor;
    f.mem_gib = static_cast<double>(p.totalGlobalMem) / (1ull << 30);
    f.l2_mib = static_cast<double>(p.l2CacheSize) / (1 << 20);
    int khz = 0;
    DPART_CHECK(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, device));
    f.sm_clock_mhz = khz / 1e3;
    DPART_CHECK(cudaDeviceGetAttribute(&khz, cudaDevAttrMemoryClockRate, device));
    f.mem_clock_mhz = khz / 1e3;
    DPART_CHECK(cudaDeviceGetAttribute(&f.mem_bus_bits, cudaDevAttrGlobalMemoryBusWidth, device));
    return f;
}

std::vector<double> gemm_times(int device, GemmType type, int n, const Timing& t) {
    DPART_CHECK(cudaSetDevice(device));
    const Element e = type == GemmType::bf16 ? Element::bf16 : type == GemmType::fp16 ? Element::f16 : Element::f32;
    const cudaDataType_t data = type == GemmType::bf16   ? CUDA_R_16BF
                                : type == GemmType::fp16 ? CUDA_R_16F
                                                         : CUDA_R_32F;
    const cublasComputeType_t compute = type == GemmType::tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    const std::size_t elements = static_cast<std::size_t>(n) * n;
    DeviceBuffer a(elements * element_bytes(e)), b(elements * element_bytes(e)), c(elements * element_bytes(e));
    fill_random(a.get(), elements, e, 1);
    fill_random(b.get(), elements, e, 2);
    Stream stream;
    cublasHandle_t handle = nullptr;
    DPART_CHECK(cublasCreate(&handle));
    Defer destroy([&] { cublasDestroy(handle); });
    DPART_CHECK(cublasSetStream(handle, stream.get()));
    const float alpha = 1.0f, beta = 0.0f;
    return timed_on_stream(stream.get(), t, [&] {
        DPART_CHECK(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, a.get(), data, n, b.get(), data, n,
                                 &beta, c.get(), data, n, compute, CUBLAS_GEMM_DEFAULT));
    });
}

ConvTimes conv_times(int device, const ConvShape& s, const Timing& t) {
    DPART_CHECK(cudaSetDevice(device));
    cudnnHandle_t handle = nullptr;
    DPART_CHECK(cudnnCreate(&handle));
    Defer destroy_handle([&] { cudnnDestroy(handle); });
    cudnnTensorDescriptor_t x = nullptr, y = nullptr;
    cudnnFilterDescriptor_t w = nullptr;
    cudnnConvolutionDescriptor_t conv = nullptr;
    DPART_CHECK(cudnnCreateTensorDescriptor(&x));
    Defer destroy_x([&] { cudnnDestroyTensorDescriptor(x); });
    DPART_CHECK(cudnnCreateTensorDescriptor(&y));
    Defer destroy_y([&] { cudnnDestroyTensorDescriptor(y); });
    DPART_CHECK(cudnnCreateFilterDescriptor(&w));
    Defer destroy_w([&] { cudnnDestroyFilterDescriptor(w); });
    DPART_CHECK(cudnnCreateConvolutionDescriptor(&conv));
    Defer destroy_conv([&] { cudnnDestroyConvolutionDescriptor(conv); });

    DPART_CHECK(cudnnSetTensor4dDescriptor(x, CUDNN_TENSOR_NHWC, CUDNN_DATA_HALF, s.n, s.c, s.h, s.w));
    DPART_CHECK(cudnnSetFilter4dDescriptor(w, CUDNN_DATA_HALF, CUDNN_TENSOR_NHWC, s.k, s.c, s.r, s.s));
    DPART_CHECK(cudnnSetConvolution2dDescriptor(conv, s.pad, s.pad, s.stride, s.stride, 1, 1, CUDNN_CROSS_CORRELATION,
                                                CUDNN_DATA_FLOAT));
    DPART_CHECK(cudnnSetConvolutionMathType(conv, CUDNN_TENSOR_OP_MATH));
    int on = 0, oc = 0, oh = 0, ow = 0;
    DPART_CHECK(cudnnGetConvolution2dForwardOutputDim(conv, x, w, &on, &oc, &oh, &ow));
    DPART_CHECK(cudnnSetTensor4dDescriptor(y, CUDNN_TENSOR_NHWC, CUDNN_DATA_HALF, on, oc, oh, ow));

    const std::size_t nx = static_cast<std::size_t>(s.n) * s.c * s.h * s.w;
    const std::size_t nw = static_cast<std::size_t>(s.k) * s.c * s.r * s.s;
    const std::size_t ny = static_cast<std::size_t>(on) * oc * oh * ow;
    DeviceBuffer xb(nx * 2), wb(nw * 2), yb(ny * 2);
    fill_random(xb.get(), nx, Element::f16, 3);
    fill_random(wb.get(), nw, Element::f16, 4);
    const std::size_t workspace_bytes = std::size_t{1} << 30;
    DeviceBuffer workspace(workspace_bytes);
    Stream stream;
    DPART_CHECK(cudnnSetStream(handle, stream.get()));

    // The fastest algorithm, as cuDNN times them (torch.backends.cudnn.benchmark does the same).
    cudnnConvolutionFwdAlgoPerf_t perf[CUDNN_CONVOLUTION_FWD_ALGO_COUNT] = {};
    int returned = 0;
    DPART_CHECK(cudnnFindConvolutionForwardAlgorithmEx(handle, x, xb.get(), w, wb.get(), conv, y, yb.get(),
                                                       CUDNN_CONVOLUTION_FWD_ALGO_COUNT, &returned, perf,
                                                       workspace.get(), workspace_bytes));
    const cudnnConvolutionFwdAlgoPerf_t* best = nullptr;
    for (int i = 0; i < returned && best == nullptr; ++i)
        if (perf[i].status == CUDNN_STATUS_SUCCESS && perf[i].memory <= workspace_bytes) best = &perf[i];
    if (best == nullptr) throw std::runtime_error("cuDNN found no forward algorithm for the convolution");
    DPART_CHECK(cudnnSetConvolutionMathType(conv, best->mathType));

    ConvTimes out;
    out.out_h = oh;
    out.out_w = ow;
    out.algorithm = algorithm_name(best->algo);
    if (best->mathType == CUDNN_TENSOR_OP_MATH || best->mathType == CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION)
        out.algorithm += " (tensor cores)";
    const float alpha = 1.0f, beta = 0.0f;
    const cudnnConvolutionFwdAlgo_t algo = best->algo;
    const std::size_t used = best->memory;
    out.seconds = timed_on_stream(stream.get(), t, [&] {
        DPART_CHECK(cudnnConvolutionForward(handle, &alpha, x, xb.get(), w, wb.get(), conv, algo, workspace.get(), used,
                                            &beta, y, yb.get()));
    });
    return out;
}

bool can_access_peer(int a, int b) {
    int yes = 0;
    DPART_CHECK(cudaDeviceCanAccessPeer(&yes, a, b));
    return yes != 0;
}

std::vector<double> copy_times(CopyKind kind, int device, int peer, std::size_t bytes, const Timing& t) {
    DPART_CHECK(cudaSetDevice(device));
    switch (kind) {
        case CopyKind::d2d: {
            DeviceBuffer src(bytes), dst(bytes);
            Stream stream;
            return timed_on_stream(stream.get(), t, [&] {
                DPART_CHECK(cudaMemcpyAsync(dst.get(), src.get(), bytes, cudaMemcpyDeviceToDevice, stream.get()));
            });
        }
        case CopyKind::h2d_pinned:
        case CopyKind::d2h_pinned: {
            DeviceBuffer dev(bytes);
            PinnedBuffer host(bytes);
            Stream stream;
            const bool h2d = kind == CopyKind::h2d_pinned;
            return timed_on_stream(stream.get(), t, [&] {
                DPART_CHECK(h2d ? cudaMemcpyAsync(dev.get(), host.get(), bytes, cudaMemcpyHostToDevice, stream.get())
                                : cudaMemcpyAsync(host.get(), dev.get(), bytes, cudaMemcpyDeviceToHost, stream.get()));
            });
        }
        case CopyKind::h2d_pageable:
        case CopyKind::d2h_pageable: {
            DeviceBuffer dev(bytes);
            std::unique_ptr<char[]> host(new char[bytes]);
            std::memset(host.get(), 1, bytes);  // every page faulted in before the timing
            const bool h2d = kind == CopyKind::h2d_pageable;
            return timed_on_host(
                t,
                [&] {
                    DPART_CHECK(h2d ? cudaMemcpy(dev.get(), host.get(), bytes, cudaMemcpyHostToDevice)
                                    : cudaMemcpy(host.get(), dev.get(), bytes, cudaMemcpyDeviceToHost));
                },
                // A pageable host-to-device cudaMemcpy may return before its DMA ends.
                [] { DPART_CHECK(cudaDeviceSynchronize()); });
        }
        case CopyKind::peer: {
            enable_peer(device, peer);
            DPART_CHECK(cudaSetDevice(peer));
            DeviceBuffer dst(bytes);
            DPART_CHECK(cudaSetDevice(device));
            DeviceBuffer src(bytes);
            Stream stream;
            return timed_on_stream(stream.get(), t, [&] {
                DPART_CHECK(cudaMemcpyPeerAsync(dst.get(), peer, src.get(), device, bytes, stream.get()));
            });
        }
    }
    throw std::runtime_error("unknown copy kind");
}

std::vector<double> copy_latencies(CopyKind kind, int device, int peer, std::size_t bytes, const Timing& t) {
    if (kind == CopyKind::peer) enable_peer(device, peer);
    DPART_CHECK(cudaSetDevice(kind == CopyKind::peer ? peer : device));
    DeviceBuffer other(bytes);
    DPART_CHECK(cudaSetDevice(device));
    DeviceBuffer dev(bytes);
    PinnedBuffer host(bytes);
    Stream stream;
    std::function<void()> op;
    switch (kind) {
        case CopyKind::d2d:
            op = [&] { DPART_CHECK(cudaMemcpyAsync(other.get(), dev.get(), bytes, cudaMemcpyDeviceToDevice, stream.get())); };
            break;
        case CopyKind::h2d_pinned:
        case CopyKind::h2d_pageable:
            op = [&] { DPART_CHECK(cudaMemcpyAsync(dev.get(), host.get(), bytes, cudaMemcpyHostToDevice, stream.get())); };
            break;
        case CopyKind::d2h_pinned:
        case CopyKind::d2h_pageable:
            op = [&] { DPART_CHECK(cudaMemcpyAsync(host.get(), dev.get(), bytes, cudaMemcpyDeviceToHost, stream.get())); };
            break;
        case CopyKind::peer:
            op = [&] { DPART_CHECK(cudaMemcpyPeerAsync(other.get(), peer, dev.get(), device, bytes, stream.get())); };
            break;
    }
    return timed_on_host(
        t,
        [&] {
            op();
            DPART_CHECK(cudaStreamSynchronize(stream.get()));
        },
        [] {});
}

NcclTimes nccl_times(Collective c, const std::vector<int>& devices, const std::vector<std::size_t>& counts,
                     const Timing& t) {
    NcclTimes out;
    int version = 0;
    DPART_CHECK(ncclGetVersion(&version));
    out.version = std::to_string(version / 10000) + "." + std::to_string((version % 10000) / 100) + "." +
                  std::to_string(version % 100);
    if (counts.empty()) return out;
    const int n = static_cast<int>(devices.size());
    std::vector<ncclComm_t> comms(devices.size(), nullptr);
    DPART_CHECK(ncclCommInitAll(comms.data(), n, devices.data()));
    Defer destroy([&] {
        for (ncclComm_t comm : comms) ncclCommDestroy(comm);
    });
    const std::size_t max_count = *std::max_element(counts.begin(), counts.end());
    const std::size_t send_elems = max_count * (c == Collective::reduce_scatter ? n : 1);
    const std::size_t recv_elems = max_count * (c == Collective::all_gather ? n : 1);
    std::vector<std::unique_ptr<DeviceBuffer>> send, recv;
    std::vector<std::unique_ptr<Stream>> streams;
    for (int d : devices) {
        DPART_CHECK(cudaSetDevice(d));
        send.push_back(std::make_unique<DeviceBuffer>(send_elems * sizeof(float)));
        recv.push_back(std::make_unique<DeviceBuffer>(recv_elems * sizeof(float)));
        streams.push_back(std::make_unique<Stream>());
    }
    auto launch = [&](std::size_t count) {
        DPART_CHECK(ncclGroupStart());
        for (int i = 0; i < n; ++i) {
            void* s = send[i]->get();
            void* r = recv[i]->get();
            cudaStream_t st = streams[i]->get();
            switch (c) {
                case Collective::all_reduce:
                    DPART_CHECK(ncclAllReduce(s, r, count, ncclFloat, ncclSum, comms[i], st));
                    break;
                case Collective::all_gather: DPART_CHECK(ncclAllGather(s, r, count, ncclFloat, comms[i], st)); break;
                case Collective::reduce_scatter:
                    DPART_CHECK(ncclReduceScatter(s, r, count, ncclFloat, ncclSum, comms[i], st));
                    break;
                case Collective::sendrecv:  // nccl-tests: to the next rank, from the previous one
                    DPART_CHECK(ncclSend(s, count, ncclFloat, (i + 1) % n, comms[i], st));
                    DPART_CHECK(ncclRecv(r, count, ncclFloat, (i + n - 1) % n, comms[i], st));
                    break;
            }
        }
        DPART_CHECK(ncclGroupEnd());
    };
    auto wait_all = [&] {
        for (int i = 0; i < n; ++i) {
            DPART_CHECK(cudaSetDevice(devices[static_cast<std::size_t>(i)]));
            DPART_CHECK(cudaStreamSynchronize(streams[static_cast<std::size_t>(i)]->get()));
        }
    };
    for (std::size_t count : counts) {
        const bool large = count * sizeof(float) > (std::size_t{64} << 20);
        const Timing timing{t.samples, large ? std::max(2, t.per_sample / 4) : t.per_sample};
        out.seconds.push_back(timed_on_host(timing, [&] { launch(count); }, wait_all));
    }
    return out;
}

std::string nccl_unique_id() {
    ncclUniqueId id{};
    DPART_CHECK(ncclGetUniqueId(&id));
    return std::string(reinterpret_cast<const char*>(&id), sizeof id);
}

NcclTimes nccl_rank_times(Collective c, const std::string& unique_id, int ranks, int rank, int device,
                          const std::vector<std::size_t>& counts, const Timing& t) {
    NcclTimes out;
    int version = 0;
    DPART_CHECK(ncclGetVersion(&version));
    out.version = std::to_string(version / 10000) + "." + std::to_string((version % 10000) / 100) + "." +
                  std::to_string(version % 100);
    ncclUniqueId id{};
    if (unique_id.size() != sizeof id)
        throw std::runtime_error("an NCCL unique id of " + std::to_string(unique_id.size()) + " bytes, " +
                                 std::to_string(sizeof id) + " expected");
    std::memcpy(&id, unique_id.data(), sizeof id);
    if (counts.empty()) return out;
    DPART_CHECK(cudaSetDevice(device));
    ncclComm_t comm = nullptr;
    DPART_CHECK(ncclCommInitRank(&comm, ranks, id, rank));
    Defer destroy([&] {
        if (comm != nullptr) ncclCommDestroy(comm);
    });
    const std::size_t max_count = *std::max_element(counts.begin(), counts.end());
    const std::size_t send_elems = max_count * (c == Collective::reduce_scatter ? static_cast<std::size_t>(ranks) : 1);
    const std::size_t recv_elems = max_count * (c == Collective::all_gather ? static_cast<std::size_t>(ranks) : 1);
    DeviceBuffer send(send_elems * sizeof(float)), recv(recv_elems * sizeof(float));
    Stream stream;
    auto launch = [&](std::size_t count) {
        void* s = send.get();
        void* r = recv.get();
        switch (c) {
            case Collective::all_reduce:
                DPART_CHECK(ncclAllReduce(s, r, count, ncclFloat, ncclSum, comm, stream.get()));
                break;
            case Collective::all_gather: DPART_CHECK(ncclAllGather(s, r, count, ncclFloat, comm, stream.get())); break;
            case Collective::reduce_scatter:
                DPART_CHECK(ncclReduceScatter(s, r, count, ncclFloat, ncclSum, comm, stream.get()));
                break;
            case Collective::sendrecv:  // nccl-tests: to the next rank, from the previous one
                DPART_CHECK(ncclGroupStart());
                DPART_CHECK(ncclSend(s, count, ncclFloat, (rank + 1) % ranks, comm, stream.get()));
                DPART_CHECK(ncclRecv(r, count, ncclFloat, (rank + ranks - 1) % ranks, comm, stream.get()));
                DPART_CHECK(ncclGroupEnd());
                break;
        }
    };
    try {
        for (std::size_t count : counts) {
            const bool large = count * sizeof(float) > (std::size_t{64} << 20);
            const Timing timing{t.samples, large ? std::max(2, t.per_sample / 4) : t.per_sample};
            out.seconds.push_back(timed_on_host(timing, [&] { launch(count); },
                                                [&] { DPART_CHECK(cudaStreamSynchronize(stream.get())); }));
        }
    } catch (...) {
        // Kernels may wait on peers: stop them before the buffers are freed (which waits for them).
        ncclCommAbort(comm);
        comm = nullptr;
        throw;
    }
    return out;
}

}  // namespace dpart::profile::gpu
