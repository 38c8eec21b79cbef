#include "dpart/sim/scenario.hpp"

#include <fmt/format.h>

#include <algorithm>

namespace dpart {

std::string_view to_string(EventKind k) noexcept {
    switch (k) {
        case EventKind::slowdown: return "slowdown";
        case EventKind::recover: return "recover";
        case EventKind::fail: return "fail";
        case EventKind::link: return "link";
    }
    return "?";
}

void Conditions::apply(const ScenarioEvent& e) {
    switch (e.kind) {
        case EventKind::slowdown: slowdown.at(e.device) = e.factor; break;
        case EventKind::recover:
            slowdown.at(e.device) = 1.0;
            failed.at(e.device) = false;
            break;
        case EventKind::fail: failed.at(e.device) = true; break;
        case EventKind::link: link_factor[{std::min(e.a, e.b), std::max(e.a, e.b)}] = e.factor; break;
    }
}

double Conditions::link(std::size_t a, std::size_t b) const {
    if (link_factor.empty()) return 1.0;
    auto it = link_factor.find({std::min(a, b), std::max(a, b)});
    return it == link_factor.end() ? 1.0 : it->second;
}

std::string describe(const ScenarioEvent& e, const Cluster& cluster) {
    switch (e.kind) {
        case EventKind::link:
            return fmt::format("link {}-{} x{:g}", cluster.devices[e.a].name, cluster.devices[e.b].name, e.factor);
        case EventKind::slowdown: return fmt::format("slowdown {} x{:g}", cluster.devices[e.device].name, e.factor);
        case EventKind::recover:
        case EventKind::fail: break;
    }
    return fmt::format("{} {}", to_string(e.kind), cluster.devices[e.device].name);
}

Conditions conditions_at(const Scenario& scenario, std::size_t devices, std::uint64_t iteration) {
    Conditions c(devices);
    for (const ScenarioEvent& e : scenario.events) {
        if (e.iteration > iteration) break;
        c.apply(e);
    }
    return c;
}

}  // namespace dpart
