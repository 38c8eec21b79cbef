#pragma once
// What happens to a cluster while a plan runs: slowdowns, recoveries, failures and link
// degradations at given iterations. `dpart replay` and `dpart run` read the same file.
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "dpart/cluster/cluster.hpp"
#include "dpart/core/error.hpp"

namespace dpart {

enum class EventKind { slowdown, recover, fail, link };
[[nodiscard]] std::string_view to_string(EventKind k) noexcept;

struct ScenarioEvent {
    std::uint64_t iteration = 0;  ///< takes effect at the start of this iteration
    EventKind kind = EventKind::slowdown;
    std::size_t device = 0;       ///< slowdown, recover, fail
    std::size_t a = 0, b = 0;     ///< link
    double factor = 1;            ///< slowdown: work takes factor x as long; link: bandwidth / factor
    SourceLocation where;
};

/// The range of an event's factor (docs/LIMITS.md): a device a million times slower has in effect
/// failed (kind = "fail" says so), and within the range every time stays finite.
inline constexpr double min_event_factor = 1e-6;
inline constexpr double max_event_factor = 1e6;

/// Events in the order they take effect (by iteration, then file order).
struct Scenario {
    std::vector<ScenarioEvent> events;
};

/// The cluster's condition at some iteration: the events up to it applied in order.
struct Conditions {
    std::vector<double> slowdown;   ///< per device, 1 = nominal
    std::vector<bool> failed;       ///< per device
    std::map<std::pair<std::size_t, std::size_t>, double> link_factor;  ///< (smaller, larger) device pair

    explicit Conditions(std::size_t devices) : slowdown(devices, 1.0), failed(devices, false) {}
    void apply(const ScenarioEvent& e);
    /// The bandwidth divisor of the link between two devices (1 when not degraded).
    [[nodiscard]] double link(std::size_t a, std::size_t b) const;
};

/// "slowdown gpu1 x3", "fail gpu2", "link gpu0-gpu1 x4": an event as trace files name it.
[[nodiscard]] std::string describe(const ScenarioEvent& e, const Cluster& cluster);

/// The conditions at the start of `iteration`.
[[nodiscard]] Conditions conditions_at(const Scenario& scenario, std::size_t devices, std::uint64_t iteration);

/// Reads scenario.toml for `cluster` (device names resolved). Throws InputError at file:line:col.
[[nodiscard]] Scenario load_scenario(const std::string& path, const Cluster& cluster);
[[nodiscard]] Scenario parse_scenario(std::string_view text, const std::string& path, const Cluster& cluster);

}  // namespace dpart
