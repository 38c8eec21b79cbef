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

#include <atomic>
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

class NcclLibrary final : public CommLibrary {
public:
    explicit NcclLibrary(std::chrono::milliseconds timeout) : timeout_(timeout) {}
    ~NcclLibrary() override {
        abort_all();
        for (auto& [h, c] : comms_) close(*c, true);
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
        ncclComm_t comm = nullptr;
        started(ncclCommInitRankConfig(&comm, static_cast<int>(members.size()), id, static_cast<int>(rank), &config),
                comm, "ncclCommInitRankConfig");
        settle(comm, "ncclCommInitRankConfig", true);
        return adopt(comm, s.device);
    }

    Communicator split(const Communicator& parent, int colour, int key) override {
        Comm& p = of(parent);
        check_cuda(cudaSetDevice(p.device), "cudaSetDevice");
        ncclComm_t comm = nullptr;  // inherits the parent's (non-blocking) configuration
        started(ncclCommSplit(p.comm, colour < 0 ? NCCL_SPLIT_NOCOLOR : colour, key, &comm, nullptr), comm,
                "ncclCommSplit");
        settle(p.comm, "ncclCommSplit", false);
        if (comm != nullptr) settle(comm, "ncclCommSplit", true);
        if (colour < 0 || comm == nullptr) return {};
        return adopt(comm, p.device);
    }

    Communicator shrink(const Communicator& parent, std::span<const int> excluded) override {
        Comm& p = of(parent);
        check_cuda(cudaSetDevice(p.device), "cudaSetDevice");
        std::vector<int> list(excluded.begin(), excluded.end());
        ncclComm_t comm = nullptr;
        // Nothing is in flight at the start-of-iteration vote that tells who left.
        started(ncclCommShrink(p.comm, list.data(), static_cast<int>(list.size()), &comm, nullptr, NCCL_SHRINK_DEFAULT),
                comm, "ncclCommShrink");
        if (comm != nullptr) settle(comm, "ncclCommShrink", true);
        return adopt(comm, p.device);
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
        aborted_ = true;
        std::lock_guard lock(mutex_);
        ncclGroupStart();  // several communicators of one process: aborted together
        for (auto& [h, c] : comms_)
            if (!c->aborted.exchange(true)) ncclCommAbort(c->comm);
        ncclGroupEnd();
    }

    void send(const Communicator& c, std::size_t peer, const Tag&, DeviceBuffer data, DeviceOps& ops) override {
        Comm& m = of(c);
        reap(m);
        const cuda::OpsStream s = cuda::stream_of(ops);
        order(s.stream, m.stream);
        started(ncclSend(data.span().ptr, data.span().bytes(), ncclUint8, static_cast<int>(peer), m.comm, m.stream),
                m.comm, "ncclSend");
        settle(m.comm, "ncclSend", false);
        Event done;
        check_cuda(cudaEventRecord(done.get(), m.stream), "cudaEventRecord");
        m.pending.push_back({std::move(done), std::move(data)});
    }

    void recv(const Communicator& c, std::size_t peer, const Tag&, DeviceSpan into, DeviceOps& ops) override {
        Comm& m = of(c);
        reap(m);
        const cuda::OpsStream s = cuda::stream_of(ops);
        order(s.stream, m.stream);  // after the compute queued so far (the buffer's allocation among it)
        started(ncclRecv(into.ptr, into.bytes(), ncclUint8, static_cast<int>(peer), m.comm, m.stream), m.comm,
                "ncclRecv");
        settle(m.comm, "ncclRecv", false);
        order(m.stream, s.stream);
    }

    void allreduce_sum(const Communicator& c, DeviceSpan data, DeviceOps& ops) override {
        Comm& m = of(c);
        reap(m);
        const cuda::OpsStream s = cuda::stream_of(ops);
        order(s.stream, m.stream);
        started(ncclAllReduce(data.ptr, data.ptr, data.count, type(data.elem), ncclSum, m.comm, m.stream), m.comm,
                "ncclAllReduce");
        settle(m.comm, "ncclAllReduce", false);
        order(m.stream, s.stream);
    }

    void allgather(const Communicator& c, DeviceSpan mine, DeviceSpan all, DeviceOps& ops) override {
        if (all.elem != mine.elem || all.count != mine.count * c.members.size())
            throw RuntimeError("NCCL all-gather: the output is not members x the input");
        Comm& m = of(c);
        reap(m);
        const cuda::OpsStream s = cuda::stream_of(ops);
        order(s.stream, m.stream);
        started(ncclAllGather(mine.ptr, all.ptr, mine.count, type(mine.elem), m.comm, m.stream), m.comm,
                "ncclAllGather");
        settle(m.comm, "ncclAllGather", false);
        order(m.stream, s.stream);
    }

private:
    struct Pending {
        Event done;
        DeviceBuffer buffer;
    };
    struct Comm {
        ncclComm_t comm = nullptr;
        cudaStream_t stream = nullptr;
        int device = 0;
        std::vector<Pending> pending;
        std::atomic<bool> aborted{false};
    };

    static ncclDataType_t type(Elem e) {
        switch (e) {
        case Elem::f32: return ncclFloat;
        case Elem::bf16: return ncclBfloat16;
        case Elem::i32: break;
        }
        throw RuntimeError("NCCL collectives: sums and gathers are of floats");
    }

    /// A non-blocking call's immediate result: success or in progress go on; an error aborts the
    /// communicator it was making (if any) and throws.
    static void started(ncclResult_t r, ncclComm_t& made, const char* what) {
        if (r == ncclSuccess || r == ncclInProgress) return;
        if (made != nullptr) ncclCommAbort(made), made = nullptr;
        check_nccl(r, what);
    }
    /// Waits until `comm` has left ncclInProgress, polling within the timeout; stops when another
    /// worker failed (abort_all). On a failure, a communicator being made (`making`) is aborted.
    void settle(ncclComm_t& comm, const char* what, bool making) {
        const auto deadline = std::chrono::steady_clock::now() + timeout_;
        ncclResult_t state = ncclInProgress;
        for (int spin = 0;; ++spin) {
            const ncclResult_t r = ncclCommGetAsyncError(comm, &state);
            if (r != ncclSuccess) state = r;
            if (state != ncclInProgress) break;
            std::string why;
            if (aborted_) why = "stopped: another worker failed";
            else if (std::chrono::steady_clock::now() > deadline)
                why = fmt::format("no progress within {} s (a rank that never joined?)", timeout_.count() / 1e3);
            if (!why.empty()) {
                if (making) ncclCommAbort(comm), comm = nullptr;
                throw RuntimeError(fmt::format("{}: {}", what, why));
            }
            if (spin > 100) std::this_thread::sleep_for(std::chrono::microseconds(100));
        }
        if (state != ncclSuccess) {
            const std::string text = ncclGetLastError(comm);
            if (making) ncclCommAbort(comm), comm = nullptr;
            throw RuntimeError(fmt::format("{}: {} ({})", what, ncclGetErrorString(state), text));
        }
    }

    Communicator adopt(ncclComm_t comm, int device) {
        auto c = std::make_unique<Comm>();
        c->comm = comm;
        c->device = device;
        const cudaError_t e = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking);
        if (e != cudaSuccess) {
            ncclCommAbort(comm);
            check_cuda(e, "cudaStreamCreateWithFlags");
        }
        Communicator out;
        out.handle = c.get();
        std::lock_guard lock(mutex_);
        comms_.emplace(c.get(), std::move(c));
        return out;
    }
    Comm& of(const Communicator& c) {
        std::lock_guard lock(mutex_);
        const auto it = comms_.find(c.handle);
        if (it == comms_.end())
            throw RuntimeError(aborted_ ? "an NCCL communicator aborted because another worker failed"
                                        : "an NCCL communicator that is not (or no longer) open");
        return *it->second;
    }
    /// Releases the buffers whose sends have completed.
    static void reap(Comm& m) {
        std::erase_if(m.pending, [](const Pending& p) { return cudaEventQuery(p.done.get()) == cudaSuccess; });
    }
    /// A communicator's end. Aborted: NCCL stops its kernels first, and only then are the send
    /// buffers released (a send may still read one). Destroyed: its stream is waited for.
    static void close(Comm& m, bool abort) noexcept {
        cudaSetDevice(m.device);
        if (!m.aborted.exchange(true)) {
            if (abort) ncclCommAbort(m.comm);
            else cudaStreamSynchronize(m.stream), ncclCommDestroy(m.comm);
        }
        m.pending.clear();
        if (m.stream != nullptr) cudaStreamDestroy(m.stream);
        m.stream = nullptr;
    }

    std::chrono::milliseconds timeout_;
    std::atomic<bool> aborted_{false};
    std::mutex mutex_;  // comms_: abort_all comes from another worker's thread
    std::map<void*, std::unique_ptr<Comm>> comms_;
};

}  // namespace

std::unique_ptr<CommLibrary> make_nccl_library(std::chrono::milliseconds timeout) {
    return std::make_unique<NcclLibrary>(timeout);
}

}  // namespace dpart::rt
