#pragma once
// dpart import pipedream: PipeDream's profile format (graph.txt, written by its profiler: node
// lines "nodeN -- <module> -- forward_compute_time=<ms>, backward_compute_time=<ms>,
// activation_size=<bytes>, parameter_size=<bytes>", then edge lines "\tnodeA -- nodeB") becomes a
// model.toml of measured custom layers (docs/FORMATS.md, "Imported models").
#include <cstdint>
#include <string>
#include <string_view>

#include "dpart/graph/dtype.hpp"
#include "dpart/graph/model.hpp"
#include "dpart/io/meta.hpp"

namespace dpart {

struct PipeDreamImportOptions {
    /// Samples in the minibatch the profile was measured with (the format does not record it).
    /// Times and sizes are for that minibatch; per-sample sizes are the minibatch's / batch.
    /// 1 keeps every size exactly as profiled.
    std::uint64_t batch = 1;
    DType dtype = DType::fp32;                 ///< parameter bytes per parameter: PipeDream profiles fp32
    std::string device = "pipedream-profile";  ///< the reference device, free text
    double tflops = 0;                         ///< its matmul TFLOP/s; 0 = unknown (times unscaled)
    std::string name;                          ///< [model] name; empty = the file's stem
};

struct PipeDreamImport {
    std::string toml;         ///< model.toml, [meta] first
    Model model;              ///< that text, loaded
    std::size_t nodes = 0;    ///< node lines in the profile
    std::size_t dropped = 0;  ///< Input sources and __getitem__ sinks left out, as PipeDream's optimizer does
};

/// Throws InputError at file:line:col for a malformed line, an edge naming no node, a cycle, a
/// value that is negative or not a number, a parameter size that is not whole parameters.
[[nodiscard]] PipeDreamImport import_pipedream(const std::string& path, const PipeDreamImportOptions& options,
                                               const Meta& meta);
[[nodiscard]] PipeDreamImport import_pipedream_text(std::string_view text, const std::string& path,
                                                    const PipeDreamImportOptions& options, const Meta& meta);

}  // namespace dpart
