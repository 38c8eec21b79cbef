#include "dpart/profile/host_links.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdint>

#include "dpart/core/error.hpp"

namespace dpart::profile {
namespace {

using Clock = std::chrono::steady_clock;
// Tags of the exchange (Kind::control, iteration 0): the host names, the instruction, the
// ping-pong's messages.
constexpr rt::Tag host_tag{rt::Tag::Kind::control, 0, 0, 0x70000001u};
constexpr rt::Tag order_tag{rt::Tag::Kind::control, 0, 0, 0x70000002u};
constexpr rt::Tag ping_tag{rt::Tag::Kind::control, 0, 0, 0x70000003u};

struct Order {
    std::uint8_t measure = 0;  ///< 1: answer rank 0's ping-pong
    std::uint64_t bytes = 0;
    std::int32_t latency_rounds = 0;
    std::int32_t repeats = 0;
};

rt::Bytes encode_order(const Order& o) {
    rt::Bytes b;
    rt::append_value(b, o.measure);
    rt::append_value(b, o.bytes);
    rt::append_value(b, o.latency_rounds);
    rt::append_value(b, o.repeats);
    return b;
}
Order decode_order(const rt::Bytes& b) {
    rt::Reader r(b);
    Order o;
    o.measure = r.value<std::uint8_t>();
    o.bytes = r.value<std::uint64_t>();
    o.latency_rounds = r.value<std::int32_t>();
    o.repeats = r.value<std::int32_t>();
    if (!r.done()) throw RuntimeError("profile: the host-link instruction from rank 0 is longer than expected");
    return o;
}

/// The sequence of messages both sides go through: per figure, one warm-up then `repeats`
/// timed samples of `rounds` round trips of `size` bytes.
std::vector<std::pair<std::size_t, int>> schedule(const Order& o) {
    return {{1, o.latency_rounds}, {static_cast<std::size_t>(o.bytes), 2}};
}

/// The answering side: echoes every message back.
void answer(rt::Transport& t, const Order& o) {
    for (const auto& [size, rounds] : schedule(o))
        for (int s = 0; s <= o.repeats; ++s)
            for (int i = 0; i < rounds; ++i) {
                rt::Bytes m = t.recv(0, ping_tag);
                if (m.size() != size)
                    throw RuntimeError(fmt::format("profile: a host-link message of {} bytes where {} were expected",
                                                   m.size(), size));
                t.send(0, ping_tag, std::move(m));
            }
    t.flush();
}

/// Rank 0's side with `peer`: the median one-way time of each schedule entry.
std::vector<double> ping(rt::Transport& t, std::size_t peer, const Order& o) {
    std::vector<double> one_way;
    for (const auto& [size, rounds] : schedule(o)) {
        const rt::Bytes payload(size, std::byte{1});
        std::vector<double> samples;
        for (int s = 0; s <= o.repeats; ++s) {  // s = 0: the warm-up
            const auto t0 = Clock::now();
            for (int i = 0; i < rounds; ++i) {
                t.send(peer, ping_tag, payload);
                (void)t.recv(peer, ping_tag);
            }
            const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
            if (s > 0) samples.push_back(seconds / (2.0 * rounds));
        }
        one_way.push_back(stats_of(std::move(samples)).median);
    }
    return one_way;
}

}  // namespace

std::vector<HostLink> measure_host_links(rt::Transport& t, const std::string& host, const HostLinkSettings& s) {
    if (t.size() <= 1) return {};
    if (t.rank() != 0) {
        rt::Bytes name(reinterpret_cast<const std::byte*>(host.data()),
                       reinterpret_cast<const std::byte*>(host.data()) + host.size());
        t.send(0, host_tag, std::move(name));
        const Order o = decode_order(t.recv(0, order_tag));
        if (o.measure != 0) answer(t, o);
        t.flush();
        return {};
    }
    std::vector<std::string> hosts(t.size());
    hosts[0] = host;
    for (std::size_t r = 1; r < t.size(); ++r) {
        const rt::Bytes b = t.recv(r, host_tag);
        hosts[r].assign(reinterpret_cast<const char*>(b.data()), b.size());
    }
    // The first rank of each host other than rank 0's.
    std::vector<std::size_t> leaders;
    for (std::size_t r = 1; r < t.size(); ++r) {
        const bool first = std::find(hosts.begin(), hosts.begin() + static_cast<std::ptrdiff_t>(r), hosts[r]) ==
                           hosts.begin() + static_cast<std::ptrdiff_t>(r);
        if (first && hosts[r] != host) leaders.push_back(r);
    }
    Order measure{1, s.bytes, s.latency_rounds, s.repeats};
    for (std::size_t r = 1; r < t.size(); ++r)
        if (std::find(leaders.begin(), leaders.end(), r) == leaders.end()) t.send(r, order_tag, encode_order(Order{}));
    std::vector<HostLink> links;
    for (std::size_t r : leaders) {
        t.send(r, order_tag, encode_order(measure));
        const std::vector<double> one_way = ping(t, r, measure);
        HostLink l;
        l.rank_a = 0;
        l.rank_b = r;
        l.host_a = host;
        l.host_b = hosts[r];
        l.latency_us = one_way[0] * 1e6;
        l.gbs = static_cast<double>(s.bytes) / std::max(1e-12, one_way[1] - one_way[0]) / 1e9;
        links.push_back(std::move(l));
    }
    t.flush();
    return links;
}

std::optional<Link> inter_node_link(const std::vector<HostLink>& links) {
    if (links.empty()) return std::nullopt;
    Link out{links.front().gbs, links.front().latency_us, ""};
    std::string pairs;
    for (const HostLink& l : links) {
        out.gbs = std::min(out.gbs, l.gbs);
        out.latency_us = std::max(out.latency_us, l.latency_us);
        pairs += fmt::format("{}{} - {}", pairs.empty() ? "" : ", ", l.host_a, l.host_b);
    }
    out.source = fmt::format("measured: ping-pong between ranks over MPI, the slowest of {} ({})",
                             links.size() == 1 ? std::string("1 pair") : fmt::format("{} pairs", links.size()), pairs);
    return out;
}

}  // namespace dpart::profile
