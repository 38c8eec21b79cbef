#pragma once
// Shared by the libFuzzer harnesses (tests/fuzz/README.md). A harness feeds arbitrary bytes to a
// loader as if they were a file's text. Bad input must end in dpart::InputError (exit code 2 in
// the binary); anything else escaping (std::out_of_range, std::length_error, std::bad_alloc, an
// OverflowError that no loader turned into bad input), a sanitizer report, a hang or a blow-up of
// memory is a finding: libFuzzer stops and saves the input.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "dpart/cluster/cluster.hpp"
#include "dpart/core/error.hpp"
#include "dpart/graph/model.hpp"
#include "dpart/io/cluster_toml.hpp"
#include "dpart/io/model_toml.hpp"
#include "dpart/io/toml.hpp"

namespace dpart::fuzz {

/// The name the fuzzed text is parsed under; every located error must name it.
inline const std::string input_name = "fuzz.toml";

[[noreturn]] inline void finding(const std::string& what) {
    std::fprintf(stderr, "dpart fuzz finding: %s\n", what.c_str());
    std::abort();
}

/// Runs `parse` on the input; an InputError is the expected outcome of bad input, and must name
/// the fuzzed file (or nothing) and carry a message.
template <class F>
void expect_input_errors(F&& parse) {
    try {
        parse();
    } catch (const InputError& e) {
        if (std::string_view(e.what()).empty()) finding("an InputError without a message");
        if (!e.where().file.empty() && e.where().file != input_name)
            finding("an InputError naming another file: " + e.where().file);
    }
}

inline std::string text_of(const std::uint8_t* data, std::size_t size) {
    return std::string(reinterpret_cast<const char*>(data), size);
}

/// Whether the text asks for a model or cluster so large that loading it takes seconds (a
/// [transformer] of over 10,000 blocks, a [[device_group]] of over 100,000 devices): loading is
/// linear, within the limits of docs/LIMITS.md, and measured by tests/cli/limits.sh; here such
/// inputs would only be reported as slow (-timeout) or too large (-rss_limit_mb) under ASan.
inline bool too_large_to_fuzz(std::string_view text) {
    toml::table root;
    try {
        root = toml::parse(text, input_name);
    } catch (const toml::parse_error&) {
        return false;
    }
    auto count = [](const toml::node* n) -> double {
        if (n == nullptr) return 0;
        if (const auto* i = n->as_integer()) return static_cast<double>(i->get());
        if (const auto* f = n->as_floating_point()) return f->get();
        return 0;
    };
    if (count(root.at_path("transformer.layers").node()) > 10000) return true;
    double devices = 0;
    if (const auto* groups = root["device_group"].as_array())
        for (const toml::node& g : *groups)
            if (const auto* t = g.as_table()) devices += count(t->get("nodes")) * count(t->get("devices_per_node"));
    return devices > 100000;
}

/// Bundled files the plan and scenario harnesses check their input against (DPART_SOURCE_DIR is
/// the source tree, set by tests/fuzz/CMakeLists.txt).
inline const Model& fixture_model() {
    static const Model m = load_model(std::string(DPART_SOURCE_DIR) + "/plans/models/gpt2-small.toml");
    return m;
}
inline const Cluster& fixture_cluster() {
    static const Cluster c = load_cluster(std::string(DPART_SOURCE_DIR) + "/plans/clusters/h100-4x8.toml");
    return c;
}

}  // namespace dpart::fuzz
