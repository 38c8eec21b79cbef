// cluster.toml: parse_cluster on arbitrary text ([[device]], [[device_group]], [[node]],
// [[link]], the [network] defaults), then every device's link to the first one resolved.
#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    using namespace dpart;
    const std::string text = fuzz::text_of(data, size);
    if (fuzz::too_large_to_fuzz(text)) return 0;
    fuzz::expect_input_errors([&] {
        const Cluster c = parse_cluster(text, fuzz::input_name);
        if (c.devices.empty()) fuzz::finding("a cluster without devices was accepted");
        if (c.devices.size() > max_cluster_devices) fuzz::finding("a cluster over the device limit was accepted");
        // A cluster that loads has a link between any two of its devices.
        const std::size_t n = std::min<std::size_t>(c.devices.size(), 64);
        for (std::size_t d = 1; d < n; ++d) (void)c.link(0, d);
    });
    return 0;
}
