#pragma once
// Links between hosts, under mpirun: rank 0 ping-pongs with the first rank of every other host
// over the transport dpart run's ranks use, so that cluster.toml's inter-node figures are
// measured instead of guessed.
#include <cstddef>
#include <optional>
#include <string>
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

/// Every rank calls it with its host name (collective over all of t's ranks). Rank 0 learns
/// every rank's host and measures, one after another, its link to the first rank of each other
/// host; those ranks answer; the rest only send their host name. Returns the links on rank 0
/// (none with one host), nothing on the others. Every wait has the transport's timeout.
[[nodiscard]] std::vector<HostLink> measure_host_links(rt::Transport& t, const std::string& host,
                                                       const HostLinkSettings& s = {});

/// The inter-node link cluster.toml gets from them: the slowest bandwidth and the largest
/// latency (a ring runs at its slowest hop), with a comment naming the pairs; none when empty.
[[nodiscard]] std::optional<Link> inter_node_link(const std::vector<HostLink>& links);

}  // namespace dpart::profile
