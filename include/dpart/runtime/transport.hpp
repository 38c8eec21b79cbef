#pragma once
// How workers exchange bytes: point-to-point messages matched by (source, tag), and the
// collectives built on them. Implementations: in-process queues between threads, and MPI
// between ranks (runtime/mpi). Every wait has a timeout and every failure names the peer, so
// a dead or hung peer stops the run with a message instead of hanging it.
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "dpart/core/error.hpp"

namespace dpart::rt {

/// Thrown by a wait that was cut short because another worker failed (that worker's error
/// is the one to report).
class PeerStopped : public RuntimeError {
public:
    using RuntimeError::RuntimeError;
};

using Bytes = std::vector<std::byte>;

/// What a message is: its kind, the iteration and microbatch it belongs to, and a sub-index.
struct Tag {
    enum class Kind : std::uint8_t {
        activation, gradient, allreduce, allgather, tied, barrier, report,
        control,  ///< an adaptive run's measurements and decisions
        migrate,  ///< a layer's state moving to a new owner (index: layer, microbatch: shard)
        copy,     ///< a worker's state copied to its neighbour
        comm      ///< device communicators' set-up, and the host stand-in for NCCL's messages
    };
    Kind kind = Kind::activation;
    std::uint32_t iteration = 0;
    std::uint32_t microbatch = 0;
    std::uint32_t index = 0;
    friend bool operator==(const Tag&, const Tag&) = default;
};
[[nodiscard]] std::string describe(const Tag& tag);

class Transport {
public:
    virtual ~Transport() = default;
    [[nodiscard]] virtual std::size_t rank() const = 0;
    [[nodiscard]] virtual std::size_t size() const = 0;
    /// Queues a message for `dst`; never blocks on the receiver.
    virtual void send(std::size_t dst, const Tag& tag, Bytes data) = 0;
    /// The message from `src` with `tag`; throws RuntimeError after the timeout, or as soon as
    /// the transport is aborted.
    [[nodiscard]] virtual Bytes recv(std::size_t src, const Tag& tag) = 0;
    /// Makes every pending and later wait (in this process) throw PeerStopped(reason).
    virtual void abort(const std::string& reason) = 0;
    /// Waits until the messages this rank sent have left (MPI), within the timeout.
    virtual void flush() {}
    /// Whether every rank is a thread of this process (a message may then carry a pointer to
    /// memory the sender hands over, such as a device buffer).
    [[nodiscard]] virtual bool in_process() const { return false; }
};

/// Queues between the threads of one process: `size` endpoints sharing one state.
class InProcessNetwork {
public:
    InProcessNetwork(std::size_t size, std::chrono::milliseconds timeout);
    ~InProcessNetwork();
    InProcessNetwork(const InProcessNetwork&) = delete;
    InProcessNetwork& operator=(const InProcessNetwork&) = delete;
    /// The endpoint of `rank` (owned by the network).
    [[nodiscard]] Transport& endpoint(std::size_t rank);
    struct State;  ///< the queues (defined in transport.cpp)

private:
    std::unique_ptr<State> state_;
    std::vector<std::unique_ptr<Transport>> endpoints_;
};

// --- Serialising values into messages ----------------------------------------------------
template <class T>
void append(Bytes& out, std::span<const T> values) {
    const auto* p = reinterpret_cast<const std::byte*>(values.data());
    out.insert(out.end(), p, p + values.size_bytes());
}
template <class T>
void append_value(Bytes& out, const T& v) {
    append(out, std::span<const T>(&v, 1));
}
/// Reads values in the order they were appended; throws RuntimeError on a short message.
class Reader {
public:
    explicit Reader(const Bytes& b) : bytes_(b) {}
    void read(std::span<std::byte> out);
    template <class T>
    void read_into(std::span<T> out) {
        read(std::as_writable_bytes(out));
    }
    template <class T>
    [[nodiscard]] T value() {
        T v{};
        read_into(std::span<T>(&v, 1));
        return v;
    }
    [[nodiscard]] bool done() const noexcept { return at_ == bytes_.size(); }

private:
    const Bytes& bytes_;
    std::size_t at_ = 0;
};

/// Deterministic collectives over a group of ranks (`group` in a fixed order, containing the
/// caller). A sum is taken in group order, chunk k by member k (a reduce-scatter, then an
/// all-gather, whose messages carry the tag with the index's top bit set): every member gets
/// bitwise the same result, the one a single root summing in group order gets, whatever the
/// transport, and each member moves 2 (n - 1) / n of the data, as in a ring.
void group_allreduce_sum(Transport& t, std::span<const std::size_t> group, Tag tag, std::span<float> data);
/// Its two halves, for ZeRO-1. Member k's part of `total` values: [k c, (k + 1) c) of them,
/// c = ceil(total / n) (the last parts shorter, or empty), as {first, count}: NCCL's layout, so
/// that a buffer padded to n c values is reduce-scattered and all-gathered in place. group_reduce_scatter_sum: member `me`'s part of `data` becomes the group's sum
/// of it (the rest of `data` is left as it was); group_allgather_parts: every member's part of
/// `data` becomes what that member holds there.
[[nodiscard]] std::pair<std::size_t, std::size_t> group_part(std::size_t total, std::size_t k, std::size_t n);
void group_reduce_scatter_sum(Transport& t, std::span<const std::size_t> group, Tag tag, std::span<float> data);
void group_allgather_parts(Transport& t, std::span<const std::size_t> group, Tag tag, std::span<float> data);
void group_allgather(Transport& t, std::span<const std::size_t> group, Tag tag, std::span<const float> mine,
                     std::span<float> all);
/// Returns when every rank of `group` has called it.
void group_barrier(Transport& t, std::span<const std::size_t> group, Tag tag);
/// A barrier that also tells every member each member's byte (in group order).
[[nodiscard]] std::vector<std::uint8_t> group_vote(Transport& t, std::span<const std::size_t> group, Tag tag,
                                                   std::uint8_t mine);
/// Whether every member of `group` called it with the same value (every member learns it).
[[nodiscard]] bool group_agree(Transport& t, std::span<const std::size_t> group, Tag tag, std::uint64_t mine);

}  // namespace dpart::rt
