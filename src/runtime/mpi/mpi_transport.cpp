// The MPI transport: non-blocking sends kept alive until delivered, receives by polling with
// a deadline (so a dead or hung peer never hangs this rank), and a local store for messages
// that arrive before they are asked for.
#include <mpi.h>

#include <fmt/format.h>

#include <algorithm>
#include <exception>
#include <cstring>
#include <list>
#include <thread>

#include "dpart/core/error.hpp"
#include "dpart/runtime/mpi.hpp"

namespace dpart::rt {

std::string mpi_version() {
    char text[MPI_MAX_LIBRARY_VERSION_STRING];
    int n = 0;
    MPI_Get_library_version(text, &n);
    std::string s(text, static_cast<std::size_t>(n));
    return s.substr(0, s.find_first_of(",\n"));
}

namespace {

constexpr int kMessageTag = 4242;

struct Header {
    std::uint8_t kind = 0;
    std::uint32_t iteration = 0, microbatch = 0, index = 0;
};

class MpiTransport final : public Transport {
public:
    explicit MpiTransport(std::chrono::milliseconds timeout) : timeout_(timeout) {
        int r = 0, n = 0;
        MPI_Comm_rank(MPI_COMM_WORLD, &r);
        MPI_Comm_size(MPI_COMM_WORLD, &n);
        rank_ = static_cast<std::size_t>(r);
        size_ = static_cast<std::size_t>(n);
    }
    ~MpiTransport() override {
        try {
            flush();
        } catch (...) {  // a peer that left: nothing more to deliver
        }
    }
    std::size_t rank() const override { return rank_; }
    std::size_t size() const override { return size_; }

    void send(std::size_t dst, const Tag& tag, Bytes data) override {
        check_aborted();
        if (dst >= size_) throw RuntimeError(fmt::format("rank {} does not exist (world size {})", dst, size_));
        Bytes& buf = sending_.emplace_back().data;
        const Header h{static_cast<std::uint8_t>(tag.kind), tag.iteration, tag.microbatch, tag.index};
        buf.resize(sizeof h + data.size());
        std::memcpy(buf.data(), &h, sizeof h);
        if (!data.empty()) std::memcpy(buf.data() + sizeof h, data.data(), data.size());
        MPI_Isend(buf.data(), static_cast<int>(buf.size()), MPI_BYTE, static_cast<int>(dst), kMessageTag,
                  MPI_COMM_WORLD, &sending_.back().request);
        reap();
    }

    Bytes recv(std::size_t src, const Tag& tag) override {
        const auto deadline = std::chrono::steady_clock::now() + timeout_;
        for (int spins = 0;; ++spins) {
            check_aborted();
            for (auto it = early_.begin(); it != early_.end(); ++it)
                if (it->src == src && it->tag == tag) {
                    Bytes data = std::move(it->data);
                    early_.erase(it);
                    return data;
                }
            int flag = 0;
            MPI_Status status;
            MPI_Iprobe(static_cast<int>(src), kMessageTag, MPI_COMM_WORLD, &flag, &status);
            if (flag != 0) {
                int count = 0;
                MPI_Get_count(&status, MPI_BYTE, &count);
                Bytes buf(static_cast<std::size_t>(count));
                MPI_Recv(buf.data(), count, MPI_BYTE, static_cast<int>(src), kMessageTag, MPI_COMM_WORLD,
                         MPI_STATUS_IGNORE);
                Header h;
                if (buf.size() < sizeof h) throw RuntimeError(fmt::format("rank {} sent a truncated message", src));
                std::memcpy(&h, buf.data(), sizeof h);
                const Tag got{static_cast<Tag::Kind>(h.kind), h.iteration, h.microbatch, h.index};
                Bytes data(buf.begin() + sizeof h, buf.end());
                if (got == tag) return data;
                early_.push_back({src, got, std::move(data)});
                continue;
            }
            reap();
            if (std::chrono::steady_clock::now() > deadline)
                throw RuntimeError(fmt::format("rank {} waited {:g} s for {} from rank {}: no answer (did rank {} stop?)",
                                               rank_, std::chrono::duration<double>(timeout_).count(), describe(tag),
                                               src, src));
            // Spin briefly for latency, then yield the core to the ranks doing the work.
            if (spins > 200) std::this_thread::sleep_for(std::chrono::microseconds(50));
        }
    }

    void abort(const std::string& reason) override {
        if (aborted_.empty()) aborted_ = reason;
    }

    void flush() override {
        const auto deadline = std::chrono::steady_clock::now() + timeout_;
        while (!sending_.empty()) {
            reap();
            if (sending_.empty()) break;
            if (std::chrono::steady_clock::now() > deadline)
                throw RuntimeError(fmt::format("rank {}: {} messages were not taken by their receivers within {:g} s",
                                               rank_, sending_.size(), std::chrono::duration<double>(timeout_).count()));
            std::this_thread::sleep_for(std::chrono::microseconds(50));
        }
    }

private:
    struct Pending {
        Bytes data;
        MPI_Request request = MPI_REQUEST_NULL;
    };
    struct Early {
        std::size_t src;
        Tag tag;
        Bytes data;
    };
    void reap() {
        for (auto it = sending_.begin(); it != sending_.end();) {
            int done = 0;
            MPI_Test(&it->request, &done, MPI_STATUS_IGNORE);
            it = done != 0 ? sending_.erase(it) : std::next(it);
        }
    }
    void check_aborted() const {
        if (!aborted_.empty()) throw PeerStopped(aborted_);
    }

    std::chrono::milliseconds timeout_;
    std::size_t rank_ = 0, size_ = 1;
    std::list<Pending> sending_;  // a list: buffers must not move while MPI reads them
    std::list<Early> early_;
    std::string aborted_;
};

}  // namespace

MpiSession::MpiSession(std::chrono::milliseconds timeout) {
    int provided = 0;
    MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
    // Errors come back as codes (and our own deadlines), not as an abort inside MPI.
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    transport_ = std::make_unique<MpiTransport>(timeout);
}

MpiSession::~MpiSession() {
    transport_.reset();
    // Leaving on an error (a peer died or hung): MPI_Finalize could wait for that peer forever,
    // before the error is even printed. The process ends with the error's exit code instead.
    if (std::uncaught_exceptions() > 0) return;
    MPI_Finalize();
}

Transport& MpiSession::transport() { return *transport_; }

}  // namespace dpart::rt
