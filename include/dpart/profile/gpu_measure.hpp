#pragma once
// The GPU measurements behind the gpu.* and nccl.* probes: the only interface between the
// probes (plain C++) and the CUDA code (src/profile/cuda/, compiled as C++17 by nvcc). Without
// CUDA, src/profile/gpu_measure_none.cpp stands in: unavailable() says why and nothing runs.
// Every function returns raw timings (seconds); the arithmetic (rates, medians, busbw) is done
// by the caller in plain, unit-tested C++ (dpart/profile/gpu.hpp). Errors throw
// std::runtime_error naming the CUDA, cuBLAS, cuDNN or NCCL call that failed.
#include <cstddef>
#include <string>
#include <vector>

namespace dpart::profile::gpu {

/// Why no GPU can be measured here ("" when one can): built without CUDA, no driver, no device.
[[nodiscard]] std::string unavailable();
/// The CUDA devices visible to this process (0 where unavailable() is not empty).
[[nodiscard]] int device_count();

struct DeviceFacts {
    std::string name;         ///< e.g. "NVIDIA H100 80GB HBM3"
    std::string pci_bus;      ///< e.g. "0000:18:00.0"
    int sms = 0;              ///< streaming multiprocessors
    int cc_major = 0;         ///< compute capability
    int cc_minor = 0;
    double mem_gib = 0;       ///< total device memory, GiB (2^30 bytes)
    double l2_mib = 0;        ///< L2 cache, MiB
    double sm_clock_mhz = 0;  ///< peak SM clock
    double mem_clock_mhz = 0; ///< peak memory clock
    int mem_bus_bits = 0;     ///< memory bus width
};
[[nodiscard]] DeviceFacts device_facts(int device);

/// The dtypes of the GEMM probes: fp32 (CUBLAS_COMPUTE_32F), tf32 (fp32 data,
/// CUBLAS_COMPUTE_32F_FAST_TF32), bf16 and fp16 (16-bit A, B and C, fp32 accumulation).
enum class GemmType { fp32, tf32, bf16, fp16 };

/// How a timed sample runs: `per_sample` operations queued back to back behind a blocked
/// stream, timed by CUDA events around them; one untimed warm-up sample first. Each returned
/// value is one sample's time divided by `per_sample` (seconds per operation).
struct Timing {
    int samples = 5;
    int per_sample = 10;
};

/// C = A B with n x n matrices of random values in [-1, 1), through cublasGemmEx.
[[nodiscard]] std::vector<double> gemm_times(int device, GemmType type, int n, const Timing& t);

/// A convolution forward pass through cuDNN (fp16 NHWC, fp32 accumulation, tensor cores,
/// the fastest algorithm cudnnFindConvolutionForwardAlgorithm finds within 1 GiB of workspace).
struct ConvShape {
    int n = 128, c = 256, h = 28, w = 28;  ///< input
    int k = 256, r = 3, s = 3;             ///< filters
    int pad = 1, stride = 1;
};
struct ConvTimes {
    std::vector<double> seconds;
    int out_h = 0, out_w = 0;
    std::string algorithm;  ///< cuDNN's algorithm, e.g. "IMPLICIT_PRECOMP_GEMM"
};
[[nodiscard]] ConvTimes conv_times(int device, const ConvShape& shape, const Timing& t);

/// Copies of `bytes`. d2d: cudaMemcpyAsync inside one device; h2d/d2h pinned: from/to
/// cudaHostAlloc'ed memory (event-timed behind a blocked stream); pageable: from/to ordinary
/// memory, timed on the host around synchronous cudaMemcpy calls (a blocked stream would
/// deadlock them); peer: cudaMemcpyPeerAsync from `device` to `peer`, on `device`'s stream,
/// with peer access enabled where cudaDeviceCanAccessPeer allows it.
enum class CopyKind { d2d, h2d_pinned, d2h_pinned, h2d_pageable, d2h_pageable, peer };
[[nodiscard]] std::vector<double> copy_times(CopyKind kind, int device, int peer, std::size_t bytes, const Timing& t);
/// The latency of a copy of `bytes` (4 in the probe): the host's wall time of
/// cudaMemcpyAsync + cudaStreamSynchronize, averaged over `per_sample` copies per sample.
[[nodiscard]] std::vector<double> copy_latencies(CopyKind kind, int device, int peer, std::size_t bytes,
                                                 const Timing& t);
/// Whether `a` can access `b`'s memory directly (cudaDeviceCanAccessPeer).
[[nodiscard]] bool can_access_peer(int a, int b);

/// The NCCL collectives, as nccl-tests names them.
enum class Collective { all_reduce, all_gather, reduce_scatter, sendrecv };

/// One NCCL communicator per device of `devices` in this process (ncclCommInitAll), float data,
/// sum. For each entry of `counts` (elements per rank: the all-reduce's buffer, the all-gather's
/// send count, the reduce-scatter's receive count, the sendrecv's message), the seconds per
/// collective as nccl-tests measures them: the host's wall time around `per_sample` calls
/// (each a ncclGroupStart/End over every device; a quarter as many, at least 2, above 64 MiB
/// per rank) and the wait for every stream, / calls. One warm-up sample per count. Returns one vector of per-sample times per count.
struct NcclTimes {
    std::vector<std::vector<double>> seconds;
    std::string version;  ///< the NCCL library found at run time
};
[[nodiscard]] NcclTimes nccl_times(Collective c, const std::vector<int>& devices, const std::vector<std::size_t>& counts,
                                   const Timing& t);

/// Across processes (mpirun, one GPU per rank, as nccl-tests runs there): a new NCCL unique id
/// (ncclGetUniqueId, as bytes), made by one rank and sent to the others.
[[nodiscard]] std::string nccl_unique_id();
/// This process's `device` as rank `rank` of `ranks` (ncclCommInitRank from `unique_id`): the
/// same timing as nccl_times for this rank (the host's wall time around the calls and the
/// stream's wait; sendrecv to the next rank and from the previous one in one group). Every rank
/// calls it with the same collective and counts.
[[nodiscard]] NcclTimes nccl_rank_times(Collective c, const std::string& unique_id, int ranks, int rank, int device,
                                        const std::vector<std::size_t>& counts, const Timing& t);

}  // namespace dpart::profile::gpu
