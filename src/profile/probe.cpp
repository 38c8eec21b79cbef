#include "dpart/profile/probe.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <exception>

#include "dpart/core/error.hpp"
#include "dpart/core/strings.hpp"

namespace dpart::profile {

const Figure* ProbeResult::find(const std::string& name) const {
    for (const Figure& f : figures)
        if (f.name == name) return &f;
    return nullptr;
}

const Label* ProbeResult::label(const std::string& name) const {
    for (const Label& l : labels)
        if (l.name == name) return &l;
    return nullptr;
}

std::string to_string(ProbeResult::Status s) {
    switch (s) {
        case ProbeResult::Status::ok: return "ok";
        case ProbeResult::Status::waived: return "waived";
        case ProbeResult::Status::failed: return "failed";
    }
    return "?";
}

std::vector<Probe> select_probes(const std::vector<Probe>& probes, const std::vector<std::string>& keys,
                                 const std::vector<std::string>& prefixes) {
    if (keys.empty() && prefixes.empty()) return probes;
    std::vector<std::string> names;
    for (const Probe& p : probes) names.push_back(p.key);
    for (const std::string& k : keys)
        if (std::find(names.begin(), names.end(), k) == names.end())
            throw InputError(fmt::format("-t {}: no such probe{} (dpart profile --list shows them)", k,
                                         did_you_mean(k, names)));
    std::vector<Probe> out;
    for (const std::string& prefix : prefixes)
        if (std::none_of(names.begin(), names.end(), [&](const std::string& n) { return n.starts_with(prefix); }))
            throw InputError(fmt::format("-p {}: selects no probe (dpart profile --list shows them)", prefix));
    for (const Probe& p : probes) {
        const bool by_key = std::find(keys.begin(), keys.end(), p.key) != keys.end();
        const bool by_prefix =
            std::any_of(prefixes.begin(), prefixes.end(), [&](const std::string& x) { return p.key.starts_with(x); });
        if (by_key || by_prefix) out.push_back(p);
    }
    return out;
}

ProbeResult run_probe(const Probe& probe) {
    ProbeResult r;
    try {
        r = probe.run();
    } catch (const Waived& w) {
        r.status = ProbeResult::Status::waived;
        r.reason = w.reason;
    } catch (const std::exception& e) {
        r.status = ProbeResult::Status::failed;
        r.reason = e.what();
    }
    r.key = probe.key;
    return r;
}

double median_seconds(int repeats, const std::function<void()>& f) {
    f();  // warm-up: page faults, caches, thread pools
    std::vector<double> t;
    for (int i = 0; i < std::max(1, repeats); ++i) {
        const auto start = std::chrono::steady_clock::now();
        f();
        t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
    std::nth_element(t.begin(), t.begin() + static_cast<std::ptrdiff_t>(t.size() / 2), t.end());
    return t[t.size() / 2];
}

}  // namespace dpart::profile
