#pragma once
// Device buffers between workers that do not share memory (whole GPUs, in one process or in
// several under mpirun): NCCL's send/recv and all-reduce, as a DeviceComm per worker. No NCCL
// headers here: the communicator library is an interface (CommLibrary), implemented by NCCL in
// runtime/cuda and, for tests and machines without GPUs, by a stand-in with NCCL's semantics
// over a Transport and host memory (make_host_comm_library).
//
// How communicators are made (DeviceFabric, one per process, kept for the whole run):
//   - each transport rank keeps one *world* communicator across an adaptive run's segments,
//     bootstrapped as nccl-tests does: the first member makes a unique id and sends it to the
//     others over the Transport (MPI under mpirun), every member then initialises its rank;
//   - a segment whose workers are the world's members, or some of them (a device failed and
//     left), reuses the world, shrunk with ncclCommShrink around the ranks that are gone; the
//     workers first agree that they all hold the same world, or else bootstrap a new one;
//   - each segment splits from the world (ncclCommSplit) the communicators its plan needs: per
//     pair of neighbouring stages one for activations and one for gradients (each with its own
//     stream, so that a send waiting for its receiver never blocks a transfer the other way),
//     and one per data-parallel group.
// NCCL matches point-to-point messages in the order they are posted, not by tag: the executor
// posts them in the same order on both ends, and the host stand-in checks that it does.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "dpart/plan/plan.hpp"
#include "dpart/runtime/comm_groups.hpp"
#include "dpart/runtime/device.hpp"
#include "dpart/runtime/transport.hpp"

namespace dpart::rt {

/// A worker's transfers of device buffers to and from the workers it does not share memory
/// with (transport ranks, as the executor's). Calls are enqueued on the worker's device in
/// order with its compute: a receive's values are there for the work queued after it.
class DeviceComm {
public:
    virtual ~DeviceComm() = default;
    /// Sends `data` to `dst`; returns without waiting for the receiver. The buffer is the
    /// communicator's from then on, released once it has left.
    virtual void send(std::size_t dst, const Tag& tag, DeviceBuffer data) = 0;
    /// Receives into `into` what `src` sent with `tag` (the same number of values and type).
    virtual void recv(std::size_t src, const Tag& tag, DeviceSpan into) = 0;
    /// `data` (f32) becomes the sum of every member's `data`; `group` is one of the plan's
    /// data-parallel groups (transport ranks, in replica order), this worker among them.
    virtual void allreduce_sum(std::span<const std::size_t> group, const Tag& tag, DeviceSpan data) = 0;
    /// `all` becomes every member's `mine` (f32, the same count on each) in group order: the
    /// ZeRO-1 parameter all-gather over a data-parallel group.
    virtual void allgather(std::span<const std::size_t> group, const Tag& tag, DeviceSpan mine, DeviceSpan all) = 0;
    /// `out` becomes the group's sum of each member's `data` part of out.count values at
    /// out.count x (this member's index): ZeRO-1's gradient reduce-scatter.
    virtual void reduce_scatter_sum(std::span<const std::size_t> group, const Tag& tag, DeviceSpan data, DeviceSpan out) = 0;
    /// The worker's tensor-parallel group on the devices (null when its stage has tp = 1).
    [[nodiscard]] virtual DeviceGroup* tensor_parallel() { return nullptr; }
};

/// A communicator of a CommLibrary: its handle (an ncclComm_t), this member's rank and the
/// members' transport ranks in rank order.
struct Communicator {
    void* handle = nullptr;
    std::uint64_t id = 0;  ///< the same on every member (derived from the bootstrap's unique id)
    std::size_t rank = 0;
    std::vector<std::size_t> members;
    [[nodiscard]] explicit operator bool() const noexcept { return handle != nullptr; }
};

/// NCCL's calls, behind an interface (one instance per transport rank). Collective calls
/// (init, split, shrink) are made by every member in the same order.
class CommLibrary {
public:
    virtual ~CommLibrary() = default;
    [[nodiscard]] virtual std::string name() const = 0;
    /// A new unique id (ncclGetUniqueId), made by the first member and sent to the others.
    [[nodiscard]] virtual Bytes unique_id() = 0;
    /// ncclCommInitRank on `ops`' device: `members` are the transport ranks in rank order
    /// (NCCL needs only their number), this process is members[rank].
    [[nodiscard]] virtual Communicator init(const Bytes& unique_id, std::span<const std::size_t> members,
                                            std::size_t rank, DeviceOps& ops) = 0;
    /// ncclCommSplit: members with the same colour (>= 0) form a communicator, ordered by key;
    /// colour -1 gives an empty Communicator.
    [[nodiscard]] virtual Communicator split(const Communicator& parent, int colour, int key) = 0;
    /// ncclCommShrink: the members but `excluded` (parent ranks, sorted), renumbered in order.
    /// Called by the remaining members only.
    [[nodiscard]] virtual Communicator shrink(const Communicator& parent, std::span<const int> excluded) = 0;
    /// Frees the communicator (ncclCommDestroy; ncclCommAbort when `abort`: a communicator some
    /// of whose members may be gone, or one left by an error).
    virtual void destroy(Communicator& c, bool abort) noexcept = 0;
    /// Callable from any thread: stops every communicator of this library (ncclCommAbort), so
    /// that no wait on a peer outlives a worker that failed; later calls throw.
    virtual void abort_all() noexcept = 0;
    /// Point-to-point and the sum, enqueued on `ops`' device after the work queued there (the
    /// tag is what the executor meant: NCCL ignores it; the host stand-in checks it).
    virtual void send(const Communicator& c, std::size_t peer, const Tag& tag, DeviceBuffer data, DeviceOps& ops) = 0;
    virtual void recv(const Communicator& c, std::size_t peer, const Tag& tag, DeviceSpan into, DeviceOps& ops) = 0;
    /// In place, f32 or bf16 (a bf16 sum rounds once per step of NCCL's algorithm; the host
    /// stand-in sums floats in rank order and rounds once).
    virtual void allreduce_sum(const Communicator& c, DeviceSpan data, DeviceOps& ops) = 0;
    /// all = every member's `mine` in rank order (ncclAllGather).
    virtual void allgather(const Communicator& c, DeviceSpan mine, DeviceSpan all, DeviceOps& ops) = 0;
    /// `out` (n values) = the sum over members of their `data`'s values [rank n, (rank + 1) n)
    /// (ncclReduceScatter; `data` holds members x n values), f32.
    virtual void reduce_scatter_sum(const Communicator& c, DeviceSpan data, DeviceSpan out, DeviceOps& ops) = 0;
};

/// NCCL's semantics over `net` (this process's endpoint) and host memory: ids from a counter,
/// messages matched in the order they are posted (a message that arrives in another order than
/// the receiver expects stops the run, naming both tags), sums in group order
/// (group_allreduce_sum). For tests, and for the host-device backend.
[[nodiscard]] std::unique_ptr<CommLibrary> make_host_comm_library(Transport& net);

/// A communicator's id from its bootstrap's unique id, and a child's from its parent's and a
/// salt (FNV-1a; never 0).
[[nodiscard]] std::uint64_t comm_id(const Bytes& unique_id);
[[nodiscard]] std::uint64_t comm_id(std::uint64_t parent, std::span<const std::int64_t> salt);

/// One ncclCommSplit call of a plan's communicators: each world rank's colour (-1: not in any)
/// and the groups (worker ranks, rank order) by colour. Groups of one call are disjoint.
struct CommSplit {
    enum class Purpose : std::uint8_t { activation, gradient, data_parallel, tensor_parallel };
    Purpose purpose = Purpose::activation;
    std::vector<int> colour;
    std::vector<std::vector<std::size_t>> groups;
};
/// The split calls for `groups` over `workers` workers (world rank = worker rank): pipeline
/// pairs alternate between two calls (a middle stage is in two pairs), each for activations and
/// for gradients; the data-parallel groups in one; the tensor-parallel groups in one.
[[nodiscard]] std::vector<CommSplit> comm_splits(const CommGroups& groups, std::size_t workers);

/// How a segment gets its world from what a rank holds: `reuse` (the same members), `shrink`
/// (a strict superset: ncclCommShrink excluding `excluded`, parent ranks), or neither (a fresh
/// bootstrap). `held` is empty when the rank holds no world.
struct WorldStep {
    bool reuse = false;
    bool shrink = false;
    std::vector<int> excluded;
};
[[nodiscard]] WorldStep world_step(std::span<const std::size_t> held, std::span<const std::size_t> wanted);

/// What connect() needs to know about a worker.
struct CommSetup {
    const Plan* plan = nullptr;
    std::size_t worker = 0;                    ///< executor rank
    std::vector<std::size_t> transport_ranks;  ///< per worker of the plan
    std::uint64_t segment = 0;                 ///< the first iteration (tags the set-up messages)
    Transport* net = nullptr;
    DeviceOps* ops = nullptr;
};

/// Every transport rank's communicators in this process (one rank under mpirun, every worker
/// in process), kept across segments. Thread-safe: each worker thread connects its own rank.
class DeviceFabric {
public:
    using LibraryFactory = std::function<std::unique_ptr<CommLibrary>(Transport&)>;
    explicit DeviceFabric(LibraryFactory make_library);
    ~DeviceFabric();
    DeviceFabric(const DeviceFabric&) = delete;
    DeviceFabric& operator=(const DeviceFabric&) = delete;

    /// The worker's DeviceComm for one segment (collective: every worker of the plan connects).
    /// On an error the rank's world is dropped (the next connect bootstraps a new one).
    [[nodiscard]] std::unique_ptr<DeviceComm> connect(const CommSetup& setup);
    /// A worker failed: every rank's communicators stop (CommLibrary::abort_all), and every
    /// world is dropped. The executor calls it before it tells the others through the transport.
    void abort_all() noexcept;

    /// What connects did, counted per rank (a bootstrap of 4 ranks counts 4).
    struct Counts {
        std::uint64_t bootstraps = 0, reuses = 0, shrinks = 0, splits = 0;
    };
    [[nodiscard]] Counts counts() const;

    struct Rank;  ///< one transport rank's library and world (device_comm.cpp)

private:
    std::unique_ptr<DeviceComm> connect(const CommSetup& setup, Rank& rank, std::size_t me);

    LibraryFactory make_library_;
    mutable std::mutex mutex_;
    std::map<std::size_t, std::unique_ptr<Rank>> ranks_;
    Counts counts_;
    bool aborted_ = false;
};

}  // namespace dpart::rt
