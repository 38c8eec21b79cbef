#pragma once
// The GPU and NCCL probes, and the plain arithmetic around them: medians, rates, nccl-tests'
// sizes and bus bandwidth, and the cluster.toml made from one or several ranks' results. The
// measurements themselves are behind dpart/profile/gpu_measure.hpp (CUDA, or a stand-in).
#include <cstddef>
#include <optional>
#include <string>
#include <vector>

#include "dpart/profile/gpu_measure.hpp"
#include "dpart/profile/probe.hpp"
#include "dpart/runtime/transport.hpp"

namespace dpart::profile {

// --- Statistics of timed samples ------------------------------------------------------------
struct Stats {
    double median = 0;  ///< the middle sample; the mean of the two middle ones for an even count
    double min = 0;
    double max = 0;
    std::size_t n = 0;
};
/// Throws RuntimeError on no samples, or on a negative or non-finite one.
[[nodiscard]] Stats stats_of(std::vector<double> samples);

// --- Rates ----------------------------------------------------------------------------------
/// TFLOP/s of an m x n x k matrix product (2 m n k floating-point operations) taking `seconds`.
[[nodiscard]] double gemm_tflops(double m, double n, double k, double seconds);
/// TFLOP/s of a convolution forward pass: 2 N K P Q C R S operations (P x Q the output).
[[nodiscard]] double conv_tflops(const gpu::ConvShape& s, int out_h, int out_w, double seconds);
/// GB/s (GB = 1e9 bytes) of `bytes` in `seconds`.
[[nodiscard]] double gbs(double bytes, double seconds);

// --- NCCL collectives as nccl-tests measures them -------------------------------------------
using gpu::Collective;
[[nodiscard]] std::string to_string(Collective c);  ///< "all_reduce", ...
/// nccl-tests' bus bandwidth factor for `ranks` ranks: 2(n-1)/n for all_reduce, (n-1)/n for
/// all_gather and reduce_scatter, 1 for sendrecv (so 0 for the first three with one rank).
[[nodiscard]] double busbw_factor(Collective c, int ranks);
/// min, min*factor, min*factor^2 ... up to max, and max itself when the progression misses it.
[[nodiscard]] std::vector<std::size_t> collective_sizes(std::size_t min_bytes, std::size_t max_bytes,
                                                        std::size_t factor);
/// The element count per rank nccl-tests passes to NCCL for a "size" of `bytes` (elements of
/// `elem` bytes): the whole buffer for all_reduce and sendrecv; size / ranks for all_gather's
/// send count and reduce_scatter's receive count (nccl-tests' size is the total buffer).
[[nodiscard]] std::size_t collective_count(Collective c, std::size_t bytes, int ranks, std::size_t elem);
/// The size nccl-tests reports for that count: count x elem, x ranks for all_gather and
/// reduce_scatter (the size rounded down to what the ranks divide).
[[nodiscard]] std::size_t collective_bytes(Collective c, std::size_t count, int ranks, std::size_t elem);
struct CollectivePoint {
    std::size_t bytes = 0;  ///< nccl-tests' size
    double seconds = 0;     ///< per collective
    double algbw_gbs = 0;   ///< bytes / seconds / 1e9
    double busbw_gbs = 0;   ///< algbw x busbw_factor
};
[[nodiscard]] CollectivePoint collective_point(Collective c, std::size_t bytes, int ranks, double seconds);
/// The sizes a collective probe measures, 8 B to `max_bytes` by x4 (what `ranks` can divide,
/// without repeats), and the element count per rank nccl-tests passes for each (floats).
struct CollectiveSizes {
    std::vector<std::size_t> bytes, counts;
};
[[nodiscard]] CollectiveSizes collective_plan(Collective c, std::size_t max_bytes, int ranks);

/// A collective probe's figures: ranks, peak algbw and busbw, then each size's time, algbw and
/// busbw; and its text (the NCCL version, the ranks, why busbw is 0 with one rank).
void add_collective_figures(ProbeResult& r, Collective c, int ranks, const std::vector<CollectivePoint>& points,
                            const std::string& version);

// --- The probes -----------------------------------------------------------------------------
/// gpu.gemm_*, gpu.conv, gpu.memory_bw, gpu.h2d_*, gpu.d2h_*, gpu.peer, gpu.latency and nccl.*,
/// each waived with the reason where no GPU is visible. Per-device figures are named
/// "gpu<K>.<figure>" (K the CUDA index in this process), peer figures "gpu<A>-gpu<B>.<figure>",
/// collective figures "<bytes>B.<figure>".
[[nodiscard]] std::vector<Probe> gpu_probes(const ProbeSettings& settings);
/// gpu.facts: versions, and each device's name, SMs, memory and clocks.
[[nodiscard]] Probe gpu_facts_probe(const ProbeSettings& settings);
/// The CUDA indices this process measures (ProbeSettings' stride and offset over `count`).
[[nodiscard]] std::vector<int> measured_gpus(const ProbeSettings& settings, int count);

// --- cluster.toml from one or several ranks --------------------------------------------------
/// What one process measured (under mpirun, one rank).
struct RankResults {
    std::size_t rank = 0;
    std::string host;
    std::vector<ProbeResult> results;
};
/// The bytes a rank sends to rank 0, and back; decoding a short or corrupt message throws
/// RuntimeError.
[[nodiscard]] rt::Bytes encode(const RankResults& r);
[[nodiscard]] RankResults decode_rank_results(const rt::Bytes& b);

struct Link {
    double gbs = 0;
    double latency_us = 0;
    std::string source;  ///< how it was measured, for a comment in the file
};
/// A measured link between two hosts (cluster.toml's nodes).
struct NodeLink {
    std::string a, b;
    Link link;
};
/// One GPU's figures for cluster.toml, from the probes of its process.
struct GpuFigures {
    int index = 0;        ///< CUDA index in its process
    std::string kind;     ///< device name
    std::string pci_bus;  ///< identifies the GPU across ranks of a host ("" when unknown)
    double mem_gib = 0;
    double mem_bw_gbs = 0;  ///< bytes read + written by a device-to-device copy, / s
    std::optional<double> tflops_fp32, tflops_tf32, tflops_bf16, tflops_fp16;
    /// `tflops`: bf16, else fp16, else tf32, else fp32.
    [[nodiscard]] double tflops() const;
};
/// The GPUs one process measured and the intra-node link its peer copies (else its NCCL
/// all-reduce with 2 or more ranks) measured. No GPU figures: an empty list. Throws RuntimeError
/// when a GPU has a GEMM rate but not the facts or memory bandwidth a device needs.
struct NodeFigures {
    std::vector<GpuFigures> gpus;
    std::optional<Link> intra;
};
[[nodiscard]] NodeFigures node_figures(const std::vector<ProbeResult>& results);

/// One cluster.toml from every rank's results: one [[node]] per host (ranks of one host merged,
/// a GPU measured by two of them counted once, by PCI bus), its GPUs named "<host>.gpu<K>" in
/// PCI bus order, or where a host measured no GPU, its CPU cores as "<host>.cpu<K>" (the figures
/// of cpu_cluster_toml). Throws RuntimeError when a host has neither.
/// `inter`: the link between hosts measured under mpirun (host_links.hpp); without it the file
/// gives a marked guess. `node_links`: each measured pair of hosts, written as a [[link]]
/// between their nodes when there are several (one pair is `inter` itself).
[[nodiscard]] std::string merged_cluster_toml(const std::vector<RankResults>& ranks, const std::string& name,
                                              const Meta& meta, const std::optional<Link>& inter = std::nullopt,
                                              const std::vector<NodeLink>& node_links = {});
/// Whether these results hold a GPU GEMM rate (then --out writes the GPU cluster).
[[nodiscard]] bool has_gpu_figures(const std::vector<ProbeResult>& results);

}  // namespace dpart::profile
