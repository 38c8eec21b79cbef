// NCCL as the CommLibrary of DeviceFabric (dpart/runtime/device_comm.hpp): communicators made
// with ncclCommInitRank from a unique id the fabric shares over the Transport, split with
// ncclCommSplit, shrunk with ncclCommShrink; transfers on a stream of each communicator's own,
// ordered with the worker's compute by events:
//   - send: the communicator's stream waits for the compute queued so far, ncclSend; the buffer
//     is kept until an event after the send has completed, then released (freeing never makes
//     the compute wait for a receiver);
//   - recv: the communicator's stream waits for the compute (the buffer's allocation), ncclRecv,
//     then the compute waits for the receive;
//   - all-reduce: the same, in place (ncclAllReduce, fp32 sum).
// A communicator's transfers to one peer are matched in the order they are posted: the
// executor posts them in the same order on both ends (the host stand-in checks it in tests).
#include <cuda_runtime.h>
#include <fmt/format.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>
#include <utility>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "check.cuh"
#include "dpart/runtime/cuda_backend.hpp"
#include "dpart/runtime/device_comm.hpp"
#include "streams.hpp"

namespace dpart::rt {
namespace {

using cuda::check_cuda;

void check_nccl(ncclResult_t r, const char* what) {
    if (r == ncclSuccess) return;
    throw RuntimeError(fmt::format("{}: {} ({})", what, ncclGetErrorString(r), static_cast<int>(r)));
}

/// An event that exists while it is in scope (no timing).
class Event {
public:
    Event() { check_cuda(cudaEventCreateWithFlags(&e_, cudaEventDisableTiming), "cudaEventCreateWithFlags"); }
    ~Event() {
        if (e_ != nullptr) cudaEventDestroy(e_);
    }
    Event(Event&& o) noexcept : e_(o.e_) { o.e_ = nullptr; }
    Event& operator=(Event&& o) noexcept {
        std::swap(e_, o.e_);
        return *this;
    }
    Event(const Event&) = delete;
    Event& operator=(const Event&) = delete;
    [[nodiscard]] cudaEvent_t get() const noexcept { return e_; }

private:
    cudaEvent_t e_ = nullptr;
};

/// `later` waits for what is queued on `earlier` so far.
void order(cudaStream_t earlier, cudaStream_t later) {
    Event e;
    check_cuda(cudaEventRecord(e.get(), earlier), "cudaEventRecord");
    check_cuda(cudaStreamWaitEvent(later, e.get(), 0), "cudaStreamWaitEvent");
}

/// NCCL behind CommLibrary. Every call on a communicator holds its lock and first checks that it
/// has not been aborted: abort_all (another worker's thread) takes each lock in turn, so NCCL
/// never sees a communicator used while it is aborted, nor after (when NCCL frees it). The
/// locks are held only for a call or one poll, never across a wait on the GPU, so an abort can
/// always reach a worker that waits on a peer.
class NcclLibrary final : public CommLibrary {
public:
    explicit NcclLibrary(std::chrono::milliseconds timeout) : timeout_(timeout) {}
    ~NcclLibrary() override {
        abort_all();
        for (auto& [h, c] : comms_) close(*c, true);
        for (auto& c : making_) close(*c, true);
    }

    std::string name() const override { return "NCCL"; }

    Bytes unique_id() override {
        ncclUniqueId id{};
        check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
        Bytes b(sizeof id);
        std::memcpy(b.data(), &id, sizeof id);
        return b;
    }

    Communicator init(const Bytes& unique_id, std::span<const std::size_t> members, std::size_t rank,
                      DeviceOps& ops) override {
        ncclUniqueId id{};
        if (unique_id.size() != sizeof id)
            throw RuntimeError(fmt::format("an NCCL unique id of {} bytes, {} expected", unique_id.size(), sizeof id));
        std::memcpy(&id, unique_id.data(), sizeof id);
        const cuda::OpsStream s = cuda::stream_of(ops);
        check_cuda(cudaSetDevice(s.device), "cudaSetDevice");
        ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
        config.blocking = 0;  // every wait below is bounded by the timeout and the abort switch
        // The new communicator lives on the heap from the start: a Comm of its own, which
        // abort_all reaches like any other while it is being made.
        auto made = std::make_unique<Comm>();
        made->device = s.device;
        Comm& m = *made;
        {
            std::lock_guard lock(mutex_);
            if (aborted_) throw RuntimeError("ncclCommInitRankConfig: stopped: another worker failed");
            making_.push_back(std::move(made));
        }
        {
            std::lock_guard lock(m.mutex);
            const ncclResult_t r =
                ncclCommInitRankConfig(&m.comm, static_cast<int>(members.size()), id, static_cast<int>(rank), &config);
            if (r != ncclSuccess && r != ncclInProgress) {
                if (m.comm != nullptr) ncclCommAbort(m.comm);
                m.aborted = true;
                check_nccl(r, "ncclCommInitRankConfig");
            }
        }
        try {
            settle(m, "ncclCommInitRankConfig");
        } catch (...) {
            discard(m);
            throw;
        }
        return adopt(m);
    }

    Communicator split(const Communicator& parent, int colour, int key) override {
        Comm& p = of(parent);
        check_cuda(cudaSetDevice(p.device), "cudaSetDevice");
        {
            std::lock_guard lock(p.mutex);
            live(p, "ncclCommSplit");
            p.child = nullptr;  // NCCL writes the child here when the split completes (inherits non-blocking)
            check_nccl_started(ncclCommSplit(p.comm, colour < 0 ? NCCL_SPLIT_NOCOLOR : colour, key, &p.child, nullptr),
                               "ncclCommSplit");
        }
        settle(p, "ncclCommSplit");  // the split's job completes through the parent
        return child_of(p, colour >= 0, "ncclCommSplit");
    }

    Communicator shrink(const Communicator& parent, std::span<const int> excluded) override {
        Comm& p = of(parent);
        check_cuda(cudaSetDevice(p.device), "cudaSetDevice");
        std::vector<int> list(excluded.begin(), excluded.end());
        {
            std::lock_guard lock(p.mutex);
            live(p, "ncclCommShrink");
            p.child = nullptr;
            // Nothing is in flight at the start-of-iteration vote that tells who left.
            check_nccl_started(ncclCommShrink(p.comm, list.data(), static_cast<int>(list.size()), &p.child, nullptr,
                                              NCCL_SHRINK_DEFAULT),
                               "ncclCommShrink");
        }
        settle(p, "ncclCommShrink");
        return child_of(p, true, "ncclCommShrink");
    }

    void destroy(Communicator& c, bool abort) noexcept override {
        std::unique_ptr<Comm> m;
        {
            std::lock_guard lock(mutex_);
            const auto it = comms_.find(c.handle);
            if (it != comms_.end()) {
                m = std::move(it->second);
                comms_.erase(it);
            }
        }
        if (m) close(*m, abort || aborted_);
        c = {};
    }

    /// From any thread (another worker's, when it failed): NCCL stops every communicator's
    /// kernels, so that a wait on a peer that will not come ends; the owner's next call throws,
    /// and its destroy frees what is left.
    void abort_all() noexcept override {
        std::lock_guard lock(mutex_);
        aborted_ = true;
        std::vector<std::unique_lock<std::mutex>> held;
        std::vector<ncclComm_t> victims;
        const auto take = [&](Comm& c) {
            held.emplace_back(c.mutex);
            if (c.aborted) return;
            c.aborted = true;
            if (c.comm != nullptr) victims.push_back(c.comm);
            if (c.child != nullptr) victims.push_back(c.child), c.child = nullptr;
        };
        for (auto& [h, c] : comms_) take(*c);
        for (auto& c : making_) take(*c);
        ncclGroupStart();  // several communicators of one process: aborted together
        for (ncclComm_t v : victims) ncclCommAbort(v);
        ncclGroupEnd();
    }

    void send(const Communicator& c, std::size_t peer, const Tag&, DeviceBuffer data, DeviceOps& ops) override {
        Comm& m = of(c);
        const cuda::OpsStream s = cuda::stream_of(ops);
        const void* ptr = data.span().ptr;
        const std::size_t bytes = data.span().bytes();
        {
            std::lock_guard lock(m.mutex);
            live(m, "ncclSend");
            reap(m);
            order(s.stream, m.stream);
            // Kept from here on: released only once the send is known done, or after an abort.
            m.pending.push_back({Event{}, std::move(data), false});
            check_nccl_started(ncclSend(ptr, bytes, ncclUint8, static_cast<int>(peer), m.comm, m.stream), "ncclSend");
        }
        settle(m, "ncclSend");
        std::lock_guard lock(m.mutex);
        live(m, "ncclSend");
        Pending& p = m.pending.back();
        check_cuda(cudaEventRecord(p.done.get(), m.stream), "cudaEventRecord");
        p.recorded = true;
    }

    void recv(const Communicator& c, std::size_t peer, const Tag&, DeviceSpan into, DeviceOps& ops) override {
        enqueue(c, ops, "ncclRecv", [&](Comm& m) {
            return ncclRecv(into.ptr, into.bytes(), ncclUint8, static_cast<int>(peer), m.comm, m.stream);
        });
    }

    void allreduce_sum(const Communicator& c, DeviceSpan data, DeviceOps& ops) override {
        enqueue(c, ops, "ncclAllReduce", [&](Comm& m) {
            return ncclAllReduce(data.ptr, data.ptr, data.count, type(data.elem), ncclSum, m.comm, m.stream);
        });
    }

    void allgather(const Communicator& c, DeviceSpan mine, DeviceSpan all, DeviceOps& ops) override {
        if (all.elem != mine.elem || all.count != mine.count * c.members.size())
            throw RuntimeError("NCCL all-gather: the output is not members x the input");
        enqueue(c, ops, "ncclAllGather", [&](Comm& m) {
            return ncclAllGather(mine.ptr, all.ptr, mine.count, type(mine.elem), m.comm, m.stream);
        });
    }

    void reduce_scatter_sum(const Communicator& c, DeviceSpan data, DeviceSpan out, DeviceOps& ops) override {
        if (data.elem != out.elem || data.count != out.count * c.members.size())
            throw RuntimeError("NCCL reduce-scatter: the input is not members x the output");
        enqueue(c, ops, "ncclReduceScatter", [&](Comm& m) {
            return ncclReduceScatter(data.ptr, out.ptr, out.count, type(out.elem), ncclSum, m.comm, m.stream);
        });
    }

private:
    struct Pending {
        Event done;
        DeviceBuffer buffer;
        bool recorded = false;  ///< `done` follows the send on the stream
    };
    struct Comm {
        std::mutex mutex;
        ncclComm_t comm = nullptr;
        ncclComm_t child = nullptr;  ///< where a split or shrink puts its result (outlives the call)
        cudaStream_t stream = nullptr;
        int device = 0;
        std::vector<Pending> pending;
        bool aborted = false;
    };

    static ncclDataType_t type(Elem e) {
        switch (e) {
        case Elem::f32: return ncclFloat;
        case Elem::bf16: return ncclBfloat16;
        case Elem::i32: break;
        }
        throw RuntimeError("NCCL collectives: sums and gathers are of floats");
    }
    /// A call that receives: the communicator's stream waits for the compute queued so far (the
    /// receiving buffer's allocation among it), the call, then the compute waits for the stream.
    template <class Call>
    void enqueue(const Communicator& c, DeviceOps& ops, const char* what, Call&& call) {
        Comm& m = of(c);
        const cuda::OpsStream s = cuda::stream_of(ops);
        {
            std::lock_guard lock(m.mutex);
            live(m, what);
            reap(m);
            order(s.stream, m.stream);
            check_nccl_started(call(m), what);
        }
        settle(m, what);
        std::lock_guard lock(m.mutex);
        live(m, what);
        order(m.stream, s.stream);
    }
    /// Throws when the communicator was aborted (the caller holds its lock).
    void live(const Comm& m, const char* what) const {
        if (m.aborted) throw RuntimeError(fmt::format("{}: stopped: another worker failed", what));
    }
    static void check_nccl_started(ncclResult_t r, const char* what) {
        if (r != ncclSuccess && r != ncclInProgress) check_nccl(r, what);
    }
    /// Waits until `m` has left ncclInProgress, one poll at a time under its lock, within the
    /// timeout; stops when another worker failed.
    void settle(Comm& m, const char* what) {
        const auto deadline = std::chrono::steady_clock::now() + timeout_;
        for (int spin = 0;; ++spin) {
            ncclResult_t state = ncclInProgress;
            std::string text;
            {
                std::lock_guard lock(m.mutex);
                live(m, what);
                const ncclResult_t r = ncclCommGetAsyncError(m.comm, &state);
                if (r != ncclSuccess) state = r;
                if (state != ncclInProgress && state != ncclSuccess) text = ncclGetLastError(m.comm);
            }
            if (state == ncclSuccess) return;
            if (state != ncclInProgress)
                throw RuntimeError(fmt::format("{}: {} ({})", what, ncclGetErrorString(state), text));
            if (std::chrono::steady_clock::now() > deadline)
                throw RuntimeError(fmt::format("{}: no progress within {} s (a rank that never joined?)", what,
                                               static_cast<double>(timeout_.count()) / 1e3));
            if (spin > 100) std::this_thread::sleep_for(std::chrono::microseconds(100));
        }
    }
    /// The communicator a split or shrink of `p` made (none for a split without a colour).
    Communicator child_of(Comm& p, bool expected, const char* what) {
        ncclComm_t child = nullptr;
        {
            std::lock_guard lock(p.mutex);
            live(p, what);
            child = p.child;
            p.child = nullptr;
        }
        if (child == nullptr) {
            if (expected) throw RuntimeError(fmt::format("{}: NCCL gave no communicator", what));
            return {};
        }
        auto c = std::make_unique<Comm>();
        c->comm = child;
        c->device = p.device;
        Comm& m = *c;
        {
            std::lock_guard lock(mutex_);
            if (aborted_) {
                ncclCommAbort(child);
                throw RuntimeError(fmt::format("{}: stopped: another worker failed", what));
            }
            making_.push_back(std::move(c));
        }
        try {
            settle(m, what);
        } catch (...) {
            discard(m);
            throw;
        }
        return adopt(m);
    }
    /// A communicator that failed while being made: aborted and freed.
    void discard(Comm& m) noexcept {
        if (std::unique_ptr<Comm> owned = unmake(m)) close(*owned, true);
    }
    /// Takes `m` out of making_ (null when it is not there).
    std::unique_ptr<Comm> unmake(Comm& m) noexcept {
        std::lock_guard lock(mutex_);
        const auto it = std::find_if(making_.begin(), making_.end(), [&](const auto& c) { return c.get() == &m; });
        if (it == making_.end()) return nullptr;
        std::unique_ptr<Comm> owned = std::move(*it);
        making_.erase(it);
        return owned;
    }
    /// A communicator made (in making_) becomes usable: its stream, its handle.
    Communicator adopt(Comm& m) {
        std::unique_ptr<Comm> owned = unmake(m);
        if (!owned) throw RuntimeError("an NCCL communicator adopted twice");
        const cudaError_t e = cudaStreamCreateWithFlags(&owned->stream, cudaStreamNonBlocking);
        std::lock_guard lock(mutex_);
        if (e != cudaSuccess || aborted_) {
            close(*owned, true);
            if (e != cudaSuccess) check_cuda(e, "cudaStreamCreateWithFlags");
            throw RuntimeError("NCCL: stopped: another worker failed");
        }
        Communicator out;
        out.handle = owned.get();
        comms_.emplace(owned.get(), std::move(owned));
        return out;
    }
    Comm& of(const Communicator& c) {
        std::lock_guard lock(mutex_);
        const auto it = comms_.find(c.handle);
        if (it == comms_.end() || aborted_)
            throw RuntimeError(aborted_ ? "an NCCL communicator aborted because another worker failed"
                                        : "an NCCL communicator that is not (or no longer) open");
        return *it->second;
    }
    /// Releases the buffers whose sends have completed (the caller holds the lock).
    static void reap(Comm& m) {
        std::erase_if(m.pending,
                      [](const Pending& p) { return p.recorded && cudaEventQuery(p.done.get()) == cudaSuccess; });
    }
    /// A communicator's end, by its owner. Aborted (or to abort): NCCL has stopped its kernels
    /// before the send buffers are released (a send may still read one). Destroyed: its stream is
    /// waited for first.
    static void close(Comm& m, bool abort) noexcept {
        cudaSetDevice(m.device);
        {
            std::lock_guard lock(m.mutex);
            if (!m.aborted) {
                m.aborted = true;
                if (m.comm != nullptr) {
                    if (abort) ncclCommAbort(m.comm);
                    else {
                        if (m.stream != nullptr) cudaStreamSynchronize(m.stream);
                        ncclCommDestroy(m.comm);
                    }
                }
                if (m.child != nullptr) ncclCommAbort(m.child), m.child = nullptr;
            }
        }
        m.pending.clear();
        if (m.stream != nullptr) cudaStreamDestroy(m.stream);
        m.stream = nullptr;
    }

    std::chrono::milliseconds timeout_;
    std::mutex mutex_;  // comms_, making_, aborted_: abort_all comes from another worker's thread
    bool aborted_ = false;
    std::map<void*, std::unique_ptr<Comm>> comms_;
    std::vector<std::unique_ptr<Comm>> making_;  // being initialised or split, not yet adopted
};

}  // namespace

std::unique_ptr<CommLibrary> make_nccl_library(std::chrono::milliseconds timeout) {
    return std::make_unique<NcclLibrary>(timeout);
}

}  // namespace dpart::rt
