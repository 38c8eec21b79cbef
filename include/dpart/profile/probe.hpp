#pragma once
// Named measurements of the machine: each probe has a stable key and a one-line description,
// runs on its own (one failing never stops the others), and is waived with a reason where it
// cannot run here. Results are figures with units; GB = 1e9 bytes.
#include <functional>
#include <string>
#include <vector>

namespace dpart::profile {

struct Figure {
    std::string name;  ///< e.g. "gflops"
    double value = 0;
    std::string unit;  ///< e.g. "GFLOP/s"
};

/// A named fact that is not a number (a GPU's name, its PCI bus, a cuDNN algorithm).
struct Label {
    std::string name;  ///< e.g. "gpu0.name"
    std::string text;
};

struct ProbeResult {
    enum class Status { ok, waived, failed };
    std::string key;
    Status status = Status::ok;
    std::string reason;  ///< why waived or failed
    std::vector<Figure> figures;
    std::string text;  ///< facts that are not numbers (a CPU model name)
    std::vector<Label> labels;

    [[nodiscard]] const Figure* find(const std::string& name) const;
    [[nodiscard]] const Label* label(const std::string& name) const;
};
[[nodiscard]] std::string to_string(ProbeResult::Status s);

/// Thrown by a probe that cannot run on this machine.
struct Waived {
    std::string reason;
};

struct Probe {
    std::string key;
    std::string description;
    std::function<ProbeResult()> run;
};

struct ProbeSettings {
    int repeats = 5;     ///< timed repeats after one warm-up; the median is reported
    double scale = 1.0;  ///< problem sizes relative to the defaults (tests use small ones)
    /// The GPUs this process measures: those whose CUDA index d has d % gpu_stride ==
    /// gpu_offset (several ranks of one host under mpirun share its GPUs out that way).
    int gpu_stride = 1;
    int gpu_offset = 0;
};

/// Every probe this build has, in a stable order.
[[nodiscard]] std::vector<Probe> all_probes(const ProbeSettings& settings);

/// The probes selected by exact keys and key prefixes (both empty: all). Throws InputError
/// naming an unknown key or a prefix that selects nothing.
[[nodiscard]] std::vector<Probe> select_probes(const std::vector<Probe>& probes, const std::vector<std::string>& keys,
                                               const std::vector<std::string>& prefixes);

/// Runs each probe, catching its failure or waiver into its result.
[[nodiscard]] ProbeResult run_probe(const Probe& probe);

/// The median of `repeats` timings (seconds) of `f`, after one untimed warm-up call.
[[nodiscard]] double median_seconds(int repeats, const std::function<void()>& f);

}  // namespace dpart::profile

namespace dpart::profile {
/// The CPU's probes (cpu.*).
[[nodiscard]] std::vector<Probe> cpu_probes(const ProbeSettings& settings);
}  // namespace dpart::profile

#include "dpart/io/csv.hpp"
#include "dpart/io/meta.hpp"

namespace dpart::profile {
/// key,status,figure,value,unit,reason: one row per figure (one row for a probe without), then
/// one per label (its text as the value, no unit).
[[nodiscard]] const std::vector<std::string>& result_columns();
void add_result_rows(CsvTable& table, const ProbeResult& r);

/// A cluster.toml made from the CPU probes: one device per core of this host, with the GEMM
/// rate and memory bandwidth each core sees while every core works, the host's memory shared
/// equally, and the worker link measured between two workers. Throws RuntimeError when the
/// CPU probes it needs did not run.
[[nodiscard]] std::string cpu_cluster_toml(const std::vector<ProbeResult>& results, const std::string& name,
                                           const std::string& host, const Meta& meta);
}  // namespace dpart::profile
