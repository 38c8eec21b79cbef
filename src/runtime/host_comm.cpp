// The host stand-in for NCCL (make_host_comm_library): the same calls with NCCL's semantics,
// over a Transport and whatever memory the DeviceOps has (values go through host floats). It
// runs every path of DeviceFabric and the executor's device transfers without a GPU, and it is
// stricter than NCCL where the executor could go wrong unnoticed: a point-to-point message
// carries the tag the sender meant, and the receiver refuses one that is not the tag it posted.
#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <utility>

#include "dpart/core/error.hpp"
#include "dpart/runtime/device_comm.hpp"

namespace dpart::rt {
namespace {

enum Op : std::uint32_t { split_op = 1, p2p_op = 2, sum_op = 3, gather_op = 4, scatter_op = 5 };

Tag comm_tag(std::uint64_t id, std::uint32_t seq, Op op) {
    return {Tag::Kind::comm, static_cast<std::uint32_t>(id), seq, op};
}

class HostCommLibrary final : public CommLibrary {
public:
    explicit HostCommLibrary(Transport& net) : net_(net) {}

    std::string name() const override { return "host communicators"; }

    Bytes unique_id() override {
        static std::atomic<std::uint64_t> next{1};
        Bytes b;
        append_value(b, next.fetch_add(1));
        append_value(b, static_cast<std::uint64_t>(net_.rank()));
        return b;
    }

    Communicator init(const Bytes& unique_id, std::span<const std::size_t> members, std::size_t rank,
                      DeviceOps&) override {
        if (rank >= members.size() || members[rank] != net_.rank())
            throw RuntimeError(fmt::format("{}: rank {} is not transport rank {}", name(), rank, net_.rank()));
        return {this, comm_id(unique_id), rank, {members.begin(), members.end()}};
    }

    Communicator split(const Communicator& parent, int colour, int key) override {
        // As NCCL: every member tells every other its colour and key.
        const std::uint32_t seq = splits_[parent.id]++;
        const std::vector<float> mine{static_cast<float>(colour), static_cast<float>(key)};
        std::vector<float> all(2 * parent.members.size());
        group_allgather(net_, parent.members, comm_tag(parent.id, seq, split_op), mine, all);
        if (colour < 0) return {};
        std::vector<std::pair<int, std::size_t>> chosen;  // (key, parent rank)
        for (std::size_t r = 0; r < parent.members.size(); ++r)
            if (static_cast<int>(all[2 * r]) == colour) chosen.emplace_back(static_cast<int>(all[2 * r + 1]), r);
        std::sort(chosen.begin(), chosen.end());
        Communicator c;
        c.handle = this;
        const std::vector<std::int64_t> salt{seq, colour};
        c.id = comm_id(parent.id, salt);
        for (std::size_t k = 0; k < chosen.size(); ++k) {
            if (chosen[k].second == parent.rank) c.rank = k;
            c.members.push_back(parent.members[chosen[k].second]);
        }
        return c;
    }

    Communicator shrink(const Communicator& parent, std::span<const int> excluded) override {
        Communicator c;
        c.handle = this;
        std::vector<std::int64_t> salt{-1};
        for (int e : excluded) salt.push_back(e);
        c.id = comm_id(parent.id, salt);
        for (std::size_t r = 0; r < parent.members.size(); ++r) {
            if (std::find(excluded.begin(), excluded.end(), static_cast<int>(r)) != excluded.end()) {
                if (r == parent.rank) throw RuntimeError(fmt::format("{}: an excluded rank shrinks", name()));
                continue;
            }
            if (r == parent.rank) c.rank = c.members.size();
            c.members.push_back(parent.members[r]);
        }
        return c;
    }

    void destroy(Communicator& c, bool) noexcept override { c = {}; }
    void abort_all() noexcept override {}  // its waits are the transport's, which the executor aborts

    void send(const Communicator& c, std::size_t peer, const Tag& tag, DeviceBuffer data, DeviceOps& ops) override {
        const std::uint32_t seq = sent_[{c.id, peer}]++;
        std::vector<float> values(data.count());
        ops.download(data.span(), values);
        Bytes msg;
        append_value(msg, static_cast<std::uint8_t>(tag.kind));
        append_value(msg, tag.iteration);
        append_value(msg, tag.microbatch);
        append_value(msg, tag.index);
        append_value(msg, static_cast<std::uint8_t>(data.span().elem));
        append_value(msg, static_cast<std::uint64_t>(values.size()));
        append(msg, std::span<const float>(values));
        net_.send(c.members.at(peer), comm_tag(c.id, seq, p2p_op), std::move(msg));
    }

    void recv(const Communicator& c, std::size_t peer, const Tag& tag, DeviceSpan into, DeviceOps& ops) override {
        const std::uint32_t seq = received_[{c.id, peer}]++;
        const std::size_t src = c.members.at(peer);
        const Bytes msg = net_.recv(src, comm_tag(c.id, seq, p2p_op));
        Reader in(msg);
        Tag sent;
        sent.kind = static_cast<Tag::Kind>(in.value<std::uint8_t>());
        sent.iteration = in.value<std::uint32_t>();
        sent.microbatch = in.value<std::uint32_t>();
        sent.index = in.value<std::uint32_t>();
        const auto elem = static_cast<Elem>(in.value<std::uint8_t>());
        const auto count = in.value<std::uint64_t>();
        // NCCL would deliver whatever was posted next, whatever it was meant to be.
        if (!(sent == tag))
            throw RuntimeError(fmt::format("device message {} from worker {} is {}, but the receiver posted {}: the "
                                           "two ends post in different orders",
                                           seq, src, describe(sent), describe(tag)));
        if (elem != into.elem || count != into.count)
            throw RuntimeError(fmt::format("{} from worker {}: {} {} values sent into a buffer of {} {}", describe(tag),
                                           src, count, to_string(elem), into.count, to_string(into.elem)));
        std::vector<float> values(count);
        in.read_into(std::span<float>(values));
        ops.upload(values, into);
    }

    void allreduce_sum(const Communicator& c, DeviceSpan data, DeviceOps& ops) override {
        if (data.elem == Elem::i32) throw RuntimeError(fmt::format("{}: sums are of floats", name()));
        const std::uint32_t seq = sums_[c.id]++;
        std::vector<float> values(data.count);
        ops.download(data, values);
        group_allreduce_sum(net_, c.members, comm_tag(c.id, seq, sum_op), values);
        ops.upload(values, data);
    }

    void allgather(const Communicator& c, DeviceSpan mine, DeviceSpan all, DeviceOps& ops) override {
        if (all.count != mine.count * c.members.size() || all.elem != mine.elem)
            throw RuntimeError(fmt::format("{}: an all-gather of {} values per rank into {}", name(), mine.count, all.count));
        const std::uint32_t seq = sums_[c.id]++;
        std::vector<float> m(mine.count), a(all.count);
        ops.download(mine, m);
        group_allgather(net_, c.members, comm_tag(c.id, seq, gather_op), m, a);
        ops.upload(a, all);
    }

    void reduce_scatter_sum(const Communicator& c, DeviceSpan data, DeviceSpan out, DeviceOps& ops) override {
        if (data.elem != Elem::f32 || out.elem != Elem::f32 || data.count != out.count * c.members.size())
            throw RuntimeError(fmt::format("{}: a reduce-scatter of {} values into {} per rank", name(), data.count, out.count));
        const std::uint32_t seq = sums_[c.id]++;
        std::vector<float> values(data.count);
        ops.download(data, values);
        // Equal parts: member k's is [k n, (k + 1) n), summed in rank order.
        group_reduce_scatter_sum(net_, c.members, comm_tag(c.id, seq, scatter_op), values);
        ops.upload(std::span<const float>(values).subspan(c.rank * out.count, out.count), out);
    }

private:
    Transport& net_;
    std::map<std::uint64_t, std::uint32_t> splits_, sums_;
    std::map<std::pair<std::uint64_t, std::size_t>, std::uint32_t> sent_, received_;
};

}  // namespace

std::unique_ptr<CommLibrary> make_host_comm_library(Transport& net) { return std::make_unique<HostCommLibrary>(net); }

}  // namespace dpart::rt
