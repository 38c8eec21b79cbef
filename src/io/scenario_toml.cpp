#include <fmt/format.h>

#include <algorithm>
#include <unordered_map>

#include "dpart/core/strings.hpp"
#include "dpart/io/toml_reader.hpp"
#include "dpart/sim/scenario.hpp"

namespace dpart {
namespace {

Scenario read_scenario(const toml::table& root, const std::string& path, const Cluster& cluster) {
    TableReader top(root, path, "");
    const toml::array* events = top.optional_table_array("event");
    top.finish();
    Scenario sc;
    if (events == nullptr) return sc;  // an empty scenario: nothing happens

    std::unordered_map<std::string, std::size_t> index;
    for (std::size_t d = 0; d < cluster.devices.size(); ++d) index.emplace(cluster.devices[d].name, d);
    auto device = [&](TableReader& r, std::string_view key) {
        const std::string name = r.required_string(key);
        auto it = index.find(name);
        if (it == index.end()) {
            std::vector<std::string> names;
            if (cluster.devices.size() <= 4096)
                for (const auto& d : cluster.devices) names.push_back(d.name);
            r.fail(key, fmt::format("device \"{}\" is not in cluster \"{}\"{}", name, cluster.name,
                                    did_you_mean(name, names)));
        }
        return it->second;
    };
    for (std::size_t i = 0; i < events->size(); ++i) {
        TableReader r(*events->get(i)->as_table(), path, fmt::format("[[event]] #{}", i + 1));
        ScenarioEvent e;
        e.where = r.where();
        e.iteration = r.optional_count("iteration", 0, true);
        if (!r.has("iteration")) r.missing("iteration");
        const std::string kind = r.choice("kind", {"slowdown", "recover", "fail", "link"}, "");
        if (kind == "link") {
            r.expect({"a", "b", "factor"});
            if (r.has("device"))
                r.fail("device", "a link event names its two devices \"a\" and \"b\", not \"device\"");
            e.kind = EventKind::link;
            e.a = device(r, "a");
            e.b = device(r, "b");
            if (e.a == e.b) r.fail("b", "a link joins two different devices");
            e.factor = r.required_positive("factor");
            r.check_within("factor", e.factor, min_event_factor, max_event_factor, "");
        } else {
            r.expect({"device"});
            if (kind == "slowdown") r.expect({"factor"});
            e.kind = kind == "slowdown" ? EventKind::slowdown : kind == "recover" ? EventKind::recover : EventKind::fail;
            e.device = device(r, "device");
            if (e.kind == EventKind::slowdown) {
                e.factor = r.required_positive("factor");
                r.check_within("factor", e.factor, min_event_factor, max_event_factor, "");
            }
        }
        r.finish();
        sc.events.push_back(e);
    }
    std::stable_sort(sc.events.begin(), sc.events.end(),
                     [](const ScenarioEvent& x, const ScenarioEvent& y) { return x.iteration < y.iteration; });
    return sc;
}

}  // namespace

Scenario load_scenario(const std::string& path, const Cluster& cluster) {
    return read_scenario(parse_toml_file(path), path, cluster);
}

Scenario parse_scenario(std::string_view text, const std::string& path, const Cluster& cluster) {
    return read_scenario(parse_toml_text(text, path), path, cluster);
}

}  // namespace dpart
