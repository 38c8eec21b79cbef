// Every bundled file in plans/ loads, and the bundled models have their published sizes.
#include <doctest/doctest.h>

#include <algorithm>
#include <filesystem>
#include <set>

#include "dpart/io/cluster_toml.hpp"
#include "dpart/io/model_toml.hpp"

using namespace dpart;
namespace fs = std::filesystem;

namespace {

const fs::path plans = fs::path(DPART_SOURCE_DIR) / "plans";

std::vector<fs::path> toml_files(const fs::path& dir) {
    std::vector<fs::path> files;
    for (const auto& entry : fs::recursive_directory_iterator(dir))
        if (entry.is_regular_file() && entry.path().extension() == ".toml") files.push_back(entry.path());
    std::sort(files.begin(), files.end());
    return files;
}

}  // namespace

TEST_CASE("every model in plans/models loads") {
    const auto files = toml_files(plans / "models");
    REQUIRE(files.size() >= 5);
    for (const auto& f : files) {
        CAPTURE(f.string());
        const Model m = load_model(f.string());
        CHECK(!m.layers.empty());
        CHECK(m.total().params > 0);
    }
}

TEST_CASE("every cluster in plans/clusters loads") {
    const auto files = toml_files(plans / "clusters");
    REQUIRE(files.size() >= 5);
    for (const auto& f : files) {
        CAPTURE(f.string());
        const Cluster c = load_cluster(f.string());
        CHECK(!c.devices.empty());
        for (std::size_t i = 1; i < c.devices.size(); ++i) CHECK(c.link(0, i).gbs > 0);
    }
}

TEST_CASE("bundled models have their published parameter counts") {
    CHECK(load_model((plans / "models/seed-mlp.toml").string()).total().params == 5560);
    CHECK(load_model((plans / "models/gpt2-small.toml").string()).total().params == 124439808ull);
    CHECK(load_model((plans / "models/llama3-8b.toml").string()).total().params == 8030261248ull);
    CHECK(load_model((plans / "models/llama3-70b.toml").string()).total().params == 70553706496ull);
    CHECK(load_model((plans / "models/vgg16.toml").string()).total().params == 138357544ull);
}

TEST_CASE("bundled clusters have the shapes their names promise") {
    CHECK(load_cluster((plans / "clusters/h100x1.toml").string()).devices.size() == 1);
    const Cluster dgx = load_cluster((plans / "clusters/dgx-h100.toml").string());
    CHECK(dgx.devices.size() == 8);
    CHECK(dgx.link(0, 7).gbs == 370);
    const Cluster pod = load_cluster((plans / "clusters/h100-4x8.toml").string());
    CHECK(pod.devices.size() == 32);
    CHECK(pod.link(0, 8).gbs == 50);  // 400 Gb/s between nodes
    const Cluster mixed = load_cluster((plans / "clusters/hetero-3kinds.toml").string());
    std::set<std::string> kinds;
    for (const auto& d : mixed.devices) kinds.insert(d.kind);
    CHECK(kinds.size() >= 3);
}
