// In-process transport and the deterministic collectives every transport shares.
#include "dpart/runtime/transport.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>

#include "dpart/core/error.hpp"

namespace dpart::rt {

std::string describe(const Tag& tag) {
    switch (tag.kind) {
        case Tag::Kind::activation:
            return fmt::format("activations of microbatch {} at iteration {}", tag.microbatch, tag.iteration);
        case Tag::Kind::gradient:
            return fmt::format("gradients of microbatch {} at iteration {}", tag.microbatch, tag.iteration);
        case Tag::Kind::allreduce: return fmt::format("an all-reduce at iteration {}", tag.iteration);
        case Tag::Kind::allgather: return fmt::format("an all-gather at iteration {}", tag.iteration);
        case Tag::Kind::tied: return fmt::format("tied-weight gradients at iteration {}", tag.iteration);
        case Tag::Kind::barrier: return fmt::format("the start of iteration {}", tag.iteration);
        case Tag::Kind::report: return "the final report";
        case Tag::Kind::control: return fmt::format("the controller's exchange after iteration {}", tag.iteration);
        case Tag::Kind::migrate: return fmt::format("layer {}'s state (shard {}) moving at iteration {}", tag.index, tag.microbatch, tag.iteration);
        case Tag::Kind::copy: return fmt::format("a neighbour's state copy at iteration {}", tag.iteration);
        case Tag::Kind::comm: return fmt::format("a device communicator's message ({:x}/{}/{})", tag.iteration, tag.microbatch, tag.index);
    }
    return "a message";
}

void Reader::read(std::span<std::byte> out) {
    if (bytes_.size() - at_ < out.size())
        throw RuntimeError(fmt::format("a message is {} bytes short", out.size() - (bytes_.size() - at_)));
    if (!out.empty()) std::memcpy(out.data(), bytes_.data() + at_, out.size());
    at_ += out.size();
}

// --- In-process queues ---------------------------------------------------------------------

struct InProcessNetwork::State {
    struct Message {
        std::size_t src;
        Tag tag;
        Bytes data;
    };
    std::mutex mutex;
    std::condition_variable arrived;
    std::vector<std::deque<Message>> inbox;  // per destination
    std::string aborted;                     // non-empty once aborted
    std::chrono::milliseconds timeout;
};

namespace {

class InProcessEndpoint final : public Transport {
public:
    InProcessEndpoint(InProcessNetwork::State& s, std::size_t rank, std::size_t size) : s_(s), rank_(rank), size_(size) {}
    std::size_t rank() const override { return rank_; }
    std::size_t size() const override { return size_; }
    bool in_process() const override { return true; }

    void send(std::size_t dst, const Tag& tag, Bytes data) override {
        {
            std::lock_guard lock(s_.mutex);
            if (!s_.aborted.empty()) throw PeerStopped(s_.aborted);
            s_.inbox.at(dst).push_back({rank_, tag, std::move(data)});
        }
        s_.arrived.notify_all();
    }

    Bytes recv(std::size_t src, const Tag& tag) override {
        std::unique_lock lock(s_.mutex);
        auto& box = s_.inbox.at(rank_);
        const auto deadline = std::chrono::steady_clock::now() + s_.timeout;
        for (;;) {
            if (!s_.aborted.empty()) throw PeerStopped(s_.aborted);
            const auto it =
                std::find_if(box.begin(), box.end(), [&](const auto& m) { return m.src == src && m.tag == tag; });
            if (it != box.end()) {
                Bytes data = std::move(it->data);
                box.erase(it);
                return data;
            }
            if (s_.arrived.wait_until(lock, deadline) == std::cv_status::timeout) {
                const double seconds = std::chrono::duration<double>(s_.timeout).count();
                throw RuntimeError(fmt::format("worker {} waited {:g} s for {} from worker {}: no answer", rank_,
                                               seconds, describe(tag), src));
            }
        }
    }

    void abort(const std::string& reason) override {
        {
            std::lock_guard lock(s_.mutex);
            if (s_.aborted.empty()) s_.aborted = reason;
        }
        s_.arrived.notify_all();
    }

private:
    InProcessNetwork::State& s_;
    std::size_t rank_, size_;
};

}  // namespace

InProcessNetwork::InProcessNetwork(std::size_t size, std::chrono::milliseconds timeout) : state_(std::make_unique<State>()) {
    state_->inbox.resize(size);
    state_->timeout = timeout;
    for (std::size_t r = 0; r < size; ++r) endpoints_.push_back(std::make_unique<InProcessEndpoint>(*state_, r, size));
}
InProcessNetwork::~InProcessNetwork() = default;
Transport& InProcessNetwork::endpoint(std::size_t rank) { return *endpoints_.at(rank); }

// --- Collectives -----------------------------------------------------------------------------

namespace {
Bytes bytes_of(std::span<const float> v) {
    Bytes b;
    append(b, v);
    return b;
}
void copy_into(const Bytes& b, std::span<float> out, std::size_t from, const Tag& tag) {
    if (b.size() != out.size_bytes())
        throw RuntimeError(fmt::format("{} from worker {}: {} bytes where {} were expected", describe(tag), from,
                                       b.size(), out.size_bytes()));
    if (!b.empty()) std::memcpy(out.data(), b.data(), b.size());
}
}  // namespace

namespace {

/// This caller's index in `group`.
std::size_t member_index(const Transport& t, std::span<const std::size_t> group, const Tag& tag) {
    const auto at = std::find(group.begin(), group.end(), t.rank());
    if (at == group.end()) throw RuntimeError(fmt::format("{}: rank {} is not in its group", describe(tag), t.rank()));
    return static_cast<std::size_t>(at - group.begin());
}

std::span<float> part_of(std::span<float> data, std::size_t k, std::size_t n) {
    const auto [first, count] = group_part(data.size(), k, n);
    return data.subspan(first, count);
}

}  // namespace

std::pair<std::size_t, std::size_t> group_part(std::size_t total, std::size_t k, std::size_t n) {
    const std::size_t c = (total + n - 1) / n;
    const std::size_t lo = std::min(total, k * c), hi = std::min(total, (k + 1) * c);
    return {lo, hi - lo};
}

void group_reduce_scatter_sum(Transport& t, std::span<const std::size_t> group, Tag tag, std::span<float> data) {
    const std::size_t n = group.size();
    if (n <= 1) return;
    const std::size_t me = member_index(t, group, tag);
    // Member k sums part k in group order (x_0 + x_1 + ...): bitwise what one root summing in
    // group order gives, each member sending and receiving (n - 1) / n of the data.
    for (std::size_t k = 0; k < n; ++k)
        if (k != me) t.send(group[k], tag, bytes_of(part_of(data, k, n)));
    const std::span<float> mine = part_of(data, me, n);
    std::vector<float> sum(mine.size()), part(mine.size());
    for (std::size_t j = 0; j < n; ++j) {
        std::span<const float> x = mine;
        if (j != me) {
            copy_into(t.recv(group[j], tag), part, group[j], tag);
            x = part;
        }
        if (j == 0) std::copy(x.begin(), x.end(), sum.begin());
        else
            for (std::size_t i = 0; i < sum.size(); ++i) sum[i] += x[i];
    }
    std::copy(sum.begin(), sum.end(), mine.begin());
}

void group_allgather_parts(Transport& t, std::span<const std::size_t> group, Tag tag, std::span<float> data) {
    const std::size_t n = group.size();
    if (n <= 1) return;
    const std::size_t me = member_index(t, group, tag);
    for (std::size_t k = 0; k < n; ++k)
        if (k != me) t.send(group[k], tag, bytes_of(part_of(data, me, n)));
    for (std::size_t k = 0; k < n; ++k)
        if (k != me) copy_into(t.recv(group[k], tag), part_of(data, k, n), group[k], tag);
}

void group_allreduce_sum(Transport& t, std::span<const std::size_t> group, Tag tag, std::span<float> data) {
    // A reduce-scatter, then an all-gather of the sums: 2 (n - 1) / n of the data each, as in a
    // ring, instead of the whole of it n - 1 times through one root. The gather phase's tag has
    // the index's top bit set.
    group_reduce_scatter_sum(t, group, tag, data);
    Tag gather = tag;
    gather.index |= 0x80000000u;
    group_allgather_parts(t, group, gather, data);
}
void group_allgather(Transport& t, std::span<const std::size_t> group, Tag tag, std::span<const float> mine,
                     std::span<float> all) {
    const std::size_t n = mine.size();
    if (all.size() != n * group.size()) throw RuntimeError("all-gather: the output is not group size x input");
    const std::size_t root = group.front();
    if (t.rank() != root) {
        t.send(root, tag, bytes_of(mine));
        copy_into(t.recv(root, tag), all, root, tag);
        return;
    }
    std::copy(mine.begin(), mine.end(), all.begin());
    for (std::size_t k = 1; k < group.size(); ++k) copy_into(t.recv(group[k], tag), all.subspan(k * n, n), group[k], tag);
    for (std::size_t k = 1; k < group.size(); ++k) t.send(group[k], tag, bytes_of(all));
}

void group_barrier(Transport& t, std::span<const std::size_t> group, Tag tag) {
    if (group.size() <= 1) return;
    const std::size_t root = group.front();
    if (t.rank() != root) {
        t.send(root, tag, {});
        (void)t.recv(root, tag);
        return;
    }
    for (std::size_t k = 1; k < group.size(); ++k) (void)t.recv(group[k], tag);
    for (std::size_t k = 1; k < group.size(); ++k) t.send(group[k], tag, {});
}

std::vector<std::uint8_t> group_vote(Transport& t, std::span<const std::size_t> group, Tag tag, std::uint8_t mine) {
    std::vector<std::uint8_t> votes(group.size(), 0);
    const auto me = std::find(group.begin(), group.end(), t.rank());
    if (me == group.end()) throw RuntimeError(fmt::format("rank {} votes in a group it is not in", t.rank()));
    if (group.size() <= 1) return {mine};
    const std::size_t root = group.front();
    if (t.rank() != root) {
        t.send(root, tag, Bytes{std::byte{mine}});
        const Bytes all = t.recv(root, tag);
        if (all.size() != group.size()) throw RuntimeError(fmt::format("{}: a vote of the wrong size", describe(tag)));
        for (std::size_t k = 0; k < all.size(); ++k) votes[k] = static_cast<std::uint8_t>(all[k]);
        return votes;
    }
    votes[0] = mine;
    for (std::size_t k = 1; k < group.size(); ++k) {
        const Bytes b = t.recv(group[k], tag);
        if (b.size() != 1) throw RuntimeError(fmt::format("{} from worker {}: not a vote", describe(tag), group[k]));
        votes[k] = static_cast<std::uint8_t>(b[0]);
    }
    Bytes all(votes.size());
    for (std::size_t k = 0; k < votes.size(); ++k) all[k] = std::byte{votes[k]};
    for (std::size_t k = 1; k < group.size(); ++k) t.send(group[k], tag, all);
    return votes;
}

bool group_agree(Transport& t, std::span<const std::size_t> group, Tag tag, std::uint64_t mine) {
    if (std::find(group.begin(), group.end(), t.rank()) == group.end())
        throw RuntimeError(fmt::format("rank {} agrees in a group it is not in", t.rank()));
    if (group.size() <= 1) return true;
    const std::size_t root = group.front();
    if (t.rank() != root) {
        Bytes b;
        append_value(b, mine);
        t.send(root, tag, std::move(b));
        const Bytes answer = t.recv(root, tag);
        if (answer.size() != 1) throw RuntimeError(fmt::format("{}: not an answer", describe(tag)));
        return answer[0] == std::byte{1};
    }
    bool same = true;
    for (std::size_t k = 1; k < group.size(); ++k) {
        const Bytes b = t.recv(group[k], tag);
        Reader in(b);
        const auto theirs = in.value<std::uint64_t>();
        if (!in.done()) throw RuntimeError(fmt::format("{} from worker {}: not a value", describe(tag), group[k]));
        same = same && theirs == mine;
    }
    for (std::size_t k = 1; k < group.size(); ++k) t.send(group[k], tag, Bytes{std::byte{static_cast<unsigned char>(same ? 1 : 0)}});
    return same;
}

}  // namespace dpart::rt
