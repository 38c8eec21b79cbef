#pragma once
// The CUDA backend's devices for `dpart run --backend cuda` (no CUDA headers here): each
// cluster device a worker runs on is a GPU of this machine or a green-context partition of one
// (cluster.toml's `sm`), and its DeviceOps runs the device layers there through cuBLAS and
// dpart's kernels. Implemented in runtime/cuda; a build without CUDA refuses with a message.
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "dpart/cluster/cluster.hpp"
#include "dpart/runtime/device.hpp"

namespace dpart::rt {

class CudaDevices {
public:
    /// Maps the cluster's devices to this machine's GPUs: a whole device is CUDA device k for
    /// the k-th whole device of its node; a partition is cut from its `gpu` (the partitions of a
    /// GPU are cut at once, by sm_partition's split steps). Throws RuntimeError when dpart was
    /// built without CUDA or sees no GPU, InputError (at the device) when a layout does not fit.
    explicit CudaDevices(const Cluster& cluster);
    ~CudaDevices();
    CudaDevices(const CudaDevices&) = delete;
    CudaDevices& operator=(const CudaDevices&) = delete;

    /// A DeviceOps on cluster device `device`: its own stream on the GPU, or on its partition's
    /// green context. Call it on the thread that will use it. fp32 products use TF32 when `tf32`.
    /// With `wait_limit` > 0 a host wait for the stream (synchronize, download) throws
    /// RuntimeError after that long (for streams that wait on device communicators' receives).
    [[nodiscard]] std::unique_ptr<DeviceOps> ops(std::size_t device, bool tf32 = false,
                                                 std::chrono::milliseconds wait_limit = {});

    /// What `device` runs on, e.g. "CUDA device 0 (NVIDIA H100 80GB HBM3), green context of 32 SMs".
    [[nodiscard]] std::string describe(std::size_t device) const;

    /// The memory `device`'s buffers live in (RunOptions::memory_domain): its GPU's ordinal, so
    /// that the partitions of one GPU hand tensors to each other on the device.
    [[nodiscard]] std::optional<std::uint64_t> memory_domain(std::size_t device) const;

    struct Impl;

private:
    std::unique_ptr<Impl> impl_;
};

/// A DeviceOps on a stream of its own on CUDA device `gpu` (the whole GPU), for work outside a
/// run (dpart profile --model). Throws RuntimeError in a build without CUDA or without the GPU.
[[nodiscard]] std::unique_ptr<DeviceOps> make_gpu_ops(int gpu, bool tf32 = false);

class CommLibrary;
/// NCCL as the device communicators' library (DeviceFabric): for workers on whole GPUs, one
/// communicator rank per GPU. Communicators are non-blocking: every wait for their set-up or an
/// enqueue gives up after `timeout`. Throws RuntimeError in a build without CUDA.
[[nodiscard]] std::unique_ptr<CommLibrary> make_nccl_library(std::chrono::milliseconds timeout);

/// Whether this binary has the CUDA backend.
[[nodiscard]] bool built_with_cuda_backend() noexcept;

}  // namespace dpart::rt
