#include "dpart/profile/host_links.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <span>

#include "dpart/core/error.hpp"

namespace dpart::profile {
namespace {

using Clock = std::chrono::steady_clock;
// Tags of the exchange (Kind::control, iteration 0): the host names, the instruction, the
// ping-pong's messages.
constexpr rt::Tag host_tag{rt::Tag::Kind::control, 0, 0, 0x70000001u};
constexpr rt::Tag order_tag{rt::Tag::Kind::control, 0, 0, 0x70000002u};
constexpr rt::Tag ping_tag{rt::Tag::Kind::control, 0, 0, 0x70000003u};
constexpr rt::Tag report_tag{rt::Tag::Kind::control, 0, 0, 0x70000004u};

struct Order {
    std::uint8_t measure = 0;  ///< 1: this rank leads its host
    std::uint64_t bytes = 0;
    std::int32_t latency_rounds = 0;
    std::int32_t repeats = 0;
    std::vector<std::uint64_t> leaders;  ///< every host's first rank, in rank order
};

rt::Bytes encode_order(const Order& o) {
    rt::Bytes b;
    rt::append_value(b, o.measure);
    rt::append_value(b, o.bytes);
    rt::append_value(b, o.latency_rounds);
    rt::append_value(b, o.repeats);
    rt::append_value(b, static_cast<std::uint64_t>(o.leaders.size()));
    rt::append(b, std::span<const std::uint64_t>(o.leaders));
    return b;
}
Order decode_order(const rt::Bytes& b) {
    rt::Reader r(b);
    Order o;
    o.measure = r.value<std::uint8_t>();
    o.bytes = r.value<std::uint64_t>();
    o.latency_rounds = r.value<std::int32_t>();
    o.repeats = r.value<std::int32_t>();
    const auto n = r.value<std::uint64_t>();
    if (n > (std::uint64_t{1} << 24)) throw RuntimeError("profile: the host-link instruction names too many hosts");
    o.leaders.resize(n);
    r.read_into(std::span<std::uint64_t>(o.leaders));
    if (!r.done()) throw RuntimeError("profile: the host-link instruction from rank 0 is longer than expected");
    return o;
}

/// The links a leader measured, for rank 0 (hosts filled in there).
rt::Bytes encode_links(const std::vector<HostLink>& links) {
    rt::Bytes b;
    rt::append_value(b, static_cast<std::uint64_t>(links.size()));
    for (const HostLink& l : links) {
        rt::append_value(b, static_cast<std::uint64_t>(l.rank_a));
        rt::append_value(b, static_cast<std::uint64_t>(l.rank_b));
        rt::append_value(b, l.latency_us);
        rt::append_value(b, l.gbs);
    }
    return b;
}
std::vector<HostLink> decode_links(const rt::Bytes& b, std::size_t ranks) {
    rt::Reader r(b);
    const auto n = r.value<std::uint64_t>();
    if (n > ranks) throw RuntimeError("profile: a leader reported more host links than there are ranks");
    std::vector<HostLink> links(n);
    for (HostLink& l : links) {
        l.rank_a = r.value<std::uint64_t>();
        l.rank_b = r.value<std::uint64_t>();
        l.latency_us = r.value<double>();
        l.gbs = r.value<double>();
        if (l.rank_a >= ranks || l.rank_b >= ranks) throw RuntimeError("profile: a host link names an unknown rank");
    }
    if (!r.done()) throw RuntimeError("profile: a leader's host-link report is longer than expected");
    return links;
}

/// The sequence of messages both sides go through: per figure, one warm-up then `repeats`
/// timed samples of `rounds` round trips of `size` bytes.
std::vector<std::pair<std::size_t, int>> schedule(const Order& o) {
    return {{1, o.latency_rounds}, {static_cast<std::size_t>(o.bytes), 2}};
}

/// The answering side: echoes every message from `peer` back.
void answer(rt::Transport& t, std::size_t peer, const Order& o) {
    for (const auto& [size, rounds] : schedule(o))
        for (int s = 0; s <= o.repeats; ++s)
            for (int i = 0; i < rounds; ++i) {
                rt::Bytes m = t.recv(peer, ping_tag);
                if (m.size() != size)
                    throw RuntimeError(fmt::format("profile: a host-link message of {} bytes where {} were expected",
                                                   m.size(), size));
                t.send(peer, ping_tag, std::move(m));
            }
    t.flush();
}

/// The pinging side with `peer`: the median one-way time of each schedule entry.
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

/// A leader's part: in each round, the pair it is in (if any), pinging when it is the smaller
/// rank; returns the links it pinged.
std::vector<HostLink> lead(rt::Transport& t, const Order& o) {
    std::vector<HostLink> links;
    const std::size_t me = t.rank();
    std::size_t mine = o.leaders.size();
    for (std::size_t i = 0; i < o.leaders.size(); ++i)
        if (o.leaders[i] == me) mine = i;
    if (mine == o.leaders.size()) throw RuntimeError("profile: told to lead a host-link measurement it is not part of");
    for (const auto& round : round_robin(o.leaders.size()))
        for (const auto& [a, b] : round) {
            if (a != mine && b != mine) continue;
            const std::size_t peer = o.leaders[a == mine ? b : a];
            if (a != mine) {
                answer(t, peer, o);
                continue;
            }
            const std::vector<double> one_way = ping(t, peer, o);
            HostLink l;
            l.rank_a = me;
            l.rank_b = peer;
            l.latency_us = one_way[0] * 1e6;
            // The message's time beyond the latency; at least half its time, so that a latency
            // sample inflated by a busy host cannot make the bandwidth absurd.
            const double transfer = std::max({one_way[1] - one_way[0], 0.5 * one_way[1], 1e-12});
            l.gbs = static_cast<double>(o.bytes) / transfer / 1e9;
            links.push_back(l);
        }
    return links;
}

}  // namespace

std::vector<std::vector<std::pair<std::size_t, std::size_t>>> round_robin(std::size_t n) {
    std::vector<std::vector<std::pair<std::size_t, std::size_t>>> rounds;
    if (n < 2) return rounds;
    // Circle method: member 0 (or the bye, for an odd n) stays, the others turn one place a round.
    const std::size_t m = n % 2 == 0 ? n : n + 1;  // m - 1 stands for the bye when n is odd
    std::vector<std::size_t> ring(m - 1);
    for (std::size_t i = 0; i < ring.size(); ++i) ring[i] = i + 1;
    for (std::size_t r = 0; r + 1 < m; ++r) {
        std::vector<std::pair<std::size_t, std::size_t>> round;
        const auto add = [&](std::size_t a, std::size_t b) {
            if (a < n && b < n) round.emplace_back(std::min(a, b), std::max(a, b));
        };
        // Slot 0 is member 0 (its partner: the ring's first); slot k pairs with slot m - 1 - k.
        const auto at = [&](std::size_t slot) { return slot == 0 ? std::size_t{0} : ring[(slot - 1 + r) % ring.size()]; };
        for (std::size_t k = 0; k < m / 2; ++k) add(at(k), at(m - 1 - k));
        rounds.push_back(std::move(round));
    }
    return rounds;
}

std::vector<HostLink> measure_host_links(rt::Transport& t, const std::string& host, const HostLinkSettings& s) {
    if (t.size() <= 1) return {};
    if (t.rank() != 0) {
        rt::Bytes name(reinterpret_cast<const std::byte*>(host.data()),
                       reinterpret_cast<const std::byte*>(host.data()) + host.size());
        t.send(0, host_tag, std::move(name));
        const Order o = decode_order(t.recv(0, order_tag));
        if (o.measure != 0) t.send(0, report_tag, encode_links(lead(t, o)));
        t.flush();
        return {};
    }
    std::vector<std::string> hosts(t.size());
    hosts[0] = host;
    for (std::size_t r = 1; r < t.size(); ++r) {
        const rt::Bytes b = t.recv(r, host_tag);
        hosts[r].assign(reinterpret_cast<const char*>(b.data()), b.size());
    }
    // The first rank of each host (rank 0 leads its own).
    Order o{1, s.bytes, s.latency_rounds, s.repeats, {}};
    for (std::size_t r = 0; r < t.size(); ++r)
        if (std::find(hosts.begin(), hosts.begin() + static_cast<std::ptrdiff_t>(r), hosts[r]) ==
            hosts.begin() + static_cast<std::ptrdiff_t>(r))
            o.leaders.push_back(r);
    const bool measure = o.leaders.size() > 1;
    for (std::size_t r = 1; r < t.size(); ++r) {
        const bool leads = measure && std::find(o.leaders.begin(), o.leaders.end(), r) != o.leaders.end();
        t.send(r, order_tag, encode_order(leads ? o : Order{}));
    }
    std::vector<HostLink> links;
    if (measure) {
        links = lead(t, o);
        for (std::size_t i = 1; i < o.leaders.size(); ++i) {
            const auto theirs = decode_links(t.recv(o.leaders[i], report_tag), t.size());
            links.insert(links.end(), theirs.begin(), theirs.end());
        }
        for (HostLink& l : links) {
            l.host_a = hosts[l.rank_a];
            l.host_b = hosts[l.rank_b];
        }
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

std::vector<NodeLink> node_links(const std::vector<HostLink>& links) {
    std::vector<NodeLink> out;
    for (const HostLink& l : links)
        out.push_back({l.host_a, l.host_b,
                       Link{l.gbs, l.latency_us,
                            fmt::format("measured: ping-pong between ranks {} and {} over MPI", l.rank_a, l.rank_b)}});
    return out;
}

}  // namespace dpart::profile
