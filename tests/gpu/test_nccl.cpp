// dpart_gpu_tests' NCCL checks (C++, linked with test_device_ops.cu): what one GPU can run of the
// device communicators: a one-rank world bootstrapped through DeviceFabric, a split, an
// all-reduce, reduce-scatter and all-gather (identities on one rank, through the communicator's
// own stream and events), and
// the communicators destroyed. Several ranks need several GPUs (DEVICE.md).
#include <chrono>
#include <cmath>
#include <string>
#include <vector>

#include "dpart/runtime/cuda_backend.hpp"
#include "dpart/runtime/device_comm.hpp"
#include "one_gpu.hpp"

namespace dpart::rt {

void nccl_checks(const std::function<void(bool, const std::string&, const std::string&)>& record) {
    const Cluster cluster = one_gpu_cluster();
    CudaDevices gpus(cluster);
    const std::unique_ptr<DeviceOps> ops = gpus.ops(0);
    std::unique_ptr<CommLibrary> lib = make_nccl_library(std::chrono::milliseconds(60000));
    const std::vector<std::size_t> members{0};
    Communicator world = lib->init(lib->unique_id(), members, 0, *ops);
    record(static_cast<bool>(world), "nccl: one-rank world (ncclGetUniqueId, ncclCommInitRank)", "");
    Communicator part = lib->split(world, 0, 0);
    record(static_cast<bool>(part), "nccl: ncclCommSplit of it", "");
    part.members = members;
    std::vector<float> values(1000);
    for (std::size_t i = 0; i < values.size(); ++i) values[i] = std::sin(static_cast<float>(i));
    DeviceBuffer b(*ops, values.size(), Elem::f32);
    ops->upload(values, b.span());
    lib->allreduce_sum(part, b.span(), *ops);
    std::vector<float> back(values.size());
    ops->download(b.span(), back);
    record(back == values, "nccl: all-reduce on one rank leaves the values", "");
    // ZeRO-1's reduce-scatter and all-gather: on one rank, a copy each way.
    DeviceBuffer out(*ops, values.size(), Elem::f32), all(*ops, values.size(), Elem::f32);
    lib->reduce_scatter_sum(part, b.span(), out.span(), *ops);
    lib->allgather(part, out.span(), all.span(), *ops);
    ops->download(all.span(), back);
    record(back == values, "nccl: reduce-scatter then all-gather on one rank leave the values", "");
    lib->destroy(part, false);
    lib->destroy(world, false);

    // The fabric's bootstrap over an in-process transport, for a one-worker plan.
    InProcessNetwork net(1, std::chrono::milliseconds(10000));
    DeviceFabric fabric([](Transport&) { return make_nccl_library(std::chrono::milliseconds(60000)); });
    Plan plan;
    Stage st;
    st.devices = {0};
    plan.stages.push_back(st);
    CommSetup cs;
    cs.plan = &plan;
    cs.transport_ranks = {0};
    cs.net = &net.endpoint(0);
    cs.ops = ops.get();
    { const auto comm = fabric.connect(cs); }
    { const auto comm = fabric.connect(cs); }
    const DeviceFabric::Counts c = fabric.counts();
    record(c.bootstraps == 1 && c.reuses == 1, "nccl: the fabric bootstraps a world once, then reuses it",
           "bootstraps " + std::to_string(c.bootstraps) + ", reuses " + std::to_string(c.reuses));
}

}  // namespace dpart::rt
