// The registry: every probe this build has.
#include "dpart/profile/gpu.hpp"
#include "dpart/profile/probe.hpp"

namespace dpart::profile {

std::vector<Probe> all_probes(const ProbeSettings& settings) {
    std::vector<Probe> probes = cpu_probes(settings);
    probes.push_back(gpu_facts_probe(settings));
    for (Probe& p : gpu_probes(settings)) probes.push_back(std::move(p));
    return probes;
}

}  // namespace dpart::profile
