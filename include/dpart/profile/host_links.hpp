#pragma once
// Links between hosts, under mpirun: the first ranks of every two hosts ping-pong over the
// transport dpart run's ranks use, so that cluster.toml's inter-node figures are measured
// instead of guessed.
#include <cstddef>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "dpart/profile/gpu.hpp"
#include "dpart/runtime/transport.hpp"

namespace dpart::profile {

/// One measured link between two hosts.
struct HostLink {
    std::size_t rank_a = 0, rank_b = 0;
    std::string host_a, host_b;
    double latency_us = 0;  ///< one way: the median round trip of a 1-byte message / 2
    double gbs = 0;         ///< bytes / (one-way time of a `bytes` message - latency)
};

struct HostLinkSettings {
    std::size_t bytes = std::size_t{64} << 20;  ///< the bandwidth message
    int latency_rounds = 200;                   ///< round trips per latency sample
    int repeats = 5;                            ///< samples per figure (median)
};

/// Rounds in which each pair of n members meets once and each member is in at most one pair
/// per round (the circle method: n - 1 rounds for an even n, n for an odd one). A pair is
/// (smaller, larger) member index.
[[nodiscard]] std::vector<std::vector<std::pair<std::size_t, std::size_t>>> round_robin(std::size_t n);

/// Every rank calls it with its host name (collective over all of t's ranks). Rank 0 learns
/// every rank's host and names each host's first rank its leader; the leaders measure every
/// pair of hosts in round_robin's rounds (a round's pairs at once: they share no host), the
/// pair's smaller rank pinging, and report to rank 0; the other ranks only send their host
/// name. Returns every pair's link on rank 0 (none with one host), in round order, nothing on
/// the others. Every wait has the transport's timeout.
[[nodiscard]] std::vector<HostLink> measure_host_links(rt::Transport& t, const std::string& host,
                                                       const HostLinkSettings& s = {});

/// The inter-node link cluster.toml gets from them: the slowest bandwidth and the largest
/// latency (a ring runs at its slowest hop), with a comment naming the pairs; none when empty.
[[nodiscard]] std::optional<Link> inter_node_link(const std::vector<HostLink>& links);
/// Each pair as a link between the hosts' nodes (merged_cluster_toml's node_links).
[[nodiscard]] std::vector<NodeLink> node_links(const std::vector<HostLink>& links);

}  // namespace dpart::profile
