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

#include <cstring>
#include <map>
#include <utility>
#include <memory>
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
    ~NcclLibrary() override {
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
        ncclComm_t comm = nullptr;
        check_nccl(ncclCommInitRank(&comm, static_cast<int>(members.size()), id, static_cast<int>(rank)),
                   "ncclCommInitRank");
        return adopt(comm, s.device);
    }

    Communicator split(const Communicator& parent, int colour, int key) override {
        Comm& p = of(parent);
        check_cuda(cudaSetDevice(p.device), "cudaSetDevice");
        ncclComm_t comm = nullptr;
        check_nccl(ncclCommSplit(p.comm, colour < 0 ? NCCL_SPLIT_NOCOLOR : colour, key, &comm, nullptr), "ncclCommSplit");
        if (colour < 0 || comm == nullptr) return {};
        return adopt(comm, p.device);
    }

    Communicator shrink(const Communicator& parent, std::span<const int> excluded) override {
        Comm& p = of(parent);
        check_cuda(cudaSetDevice(p.device), "cudaSetDevice");
        std::vector<int> list(excluded.begin(), excluded.end());
        ncclComm_t comm = nullptr;
        // Nothing is in flight at the start-of-iteration vote that tells who left.
        check_nccl(ncclCommShrink(p.comm, list.data(), static_cast<int>(list.size()), &comm, nullptr,
                                  NCCL_SHRINK_DEFAULT),
                   "ncclCommShrink");
        return adopt(comm, p.device);
    }

    void destroy(Communicator& c, bool abort) noexcept override {
        const auto it = comms_.find(c.handle);
        if (it != comms_.end()) {
            close(*it->second, abort);
            comms_.erase(it);
        }
        c = {};
    }

    void send(const Communicator& c, std::size_t peer, const Tag&, DeviceBuffer data, DeviceOps& ops) override {
        Comm& m = of(c);
        reap(m);
        const cuda::OpsStream s = cuda::stream_of(ops);
        order(s.stream, m.stream);
        check_nccl(ncclSend(data.span().ptr, data.span().bytes(), ncclUint8, static_cast<int>(peer), m.comm, m.stream),
                   "ncclSend");
        Event done;
        check_cuda(cudaEventRecord(done.get(), m.stream), "cudaEventRecord");
        m.pending.push_back({std::move(done), std::move(data)});
    }

    void recv(const Communicator& c, std::size_t peer, const Tag&, DeviceSpan into, DeviceOps& ops) override {
        Comm& m = of(c);
        reap(m);
        const cuda::OpsStream s = cuda::stream_of(ops);
        order(s.stream, m.stream);
        check_nccl(ncclRecv(into.ptr, into.bytes(), ncclUint8, static_cast<int>(peer), m.comm, m.stream), "ncclRecv");
        order(m.stream, s.stream);
    }

    void allreduce_sum(const Communicator& c, DeviceSpan data, DeviceOps& ops) override {
        Comm& m = of(c);
        reap(m);
        const cuda::OpsStream s = cuda::stream_of(ops);
        order(s.stream, m.stream);
        check_nccl(ncclAllReduce(data.ptr, data.ptr, data.count, type(data.elem), ncclSum, m.comm, m.stream),
                   "ncclAllReduce");
        order(m.stream, s.stream);
    }

    void allgather(const Communicator& c, DeviceSpan mine, DeviceSpan all, DeviceOps& ops) override {
        if (all.elem != mine.elem || all.count != mine.count * c.members.size())
            throw RuntimeError("NCCL all-gather: the output is not members x the input");
        Comm& m = of(c);
        reap(m);
        const cuda::OpsStream s = cuda::stream_of(ops);
        order(s.stream, m.stream);
        check_nccl(ncclAllGather(mine.ptr, all.ptr, mine.count, type(mine.elem), m.comm, m.stream), "ncclAllGather");
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
    };

    static ncclDataType_t type(Elem e) {
        switch (e) {
        case Elem::f32: return ncclFloat;
        case Elem::bf16: return ncclBfloat16;
        case Elem::i32: break;
        }
        throw RuntimeError("NCCL collectives: sums and gathers are of floats");
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
        comms_.emplace(c.get(), std::move(c));
        return out;
    }
    Comm& of(const Communicator& c) {
        const auto it = comms_.find(c.handle);
        if (it == comms_.end()) throw RuntimeError("an NCCL communicator that is not (or no longer) open");
        return *it->second;
    }
    /// Releases the buffers whose sends have completed.
    static void reap(Comm& m) {
        std::erase_if(m.pending, [](const Pending& p) { return cudaEventQuery(p.done.get()) == cudaSuccess; });
    }
    static void close(Comm& m, bool abort) noexcept {
        cudaSetDevice(m.device);
        if (!abort) cudaStreamSynchronize(m.stream);
        m.pending.clear();
        if (m.comm != nullptr) {
            if (abort) ncclCommAbort(m.comm);
            else ncclCommDestroy(m.comm);
        }
        if (m.stream != nullptr) cudaStreamDestroy(m.stream);
        m.comm = nullptr;
        m.stream = nullptr;
    }

    std::map<void*, std::unique_ptr<Comm>> comms_;
};

}  // namespace

std::unique_ptr<CommLibrary> make_nccl_library() { return std::make_unique<NcclLibrary>(); }

}  // namespace dpart::rt
