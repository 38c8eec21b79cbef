#pragma once
// The cluster of the C++ GPU checks: one whole GPU (CUDA device 0), its figures unused.
#include "dpart/io/cluster_toml.hpp"

namespace dpart::rt {

inline Cluster one_gpu_cluster() {
    return parse_cluster(R"([cluster]
name = "one-gpu"
[network]
intra_node_gbs = 100.0
intra_node_latency_us = 5.0
[[device]]
name = "gpu0"
node = "n0"
kind = "gpu"
tflops = 100.0
mem_gib = 1.0
mem_bw_gbs = 1000.0
)",
                         "one-gpu.toml");
}

}  // namespace dpart::rt
