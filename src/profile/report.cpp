// Probe results as CSV rows, and the cluster.toml the CPU probes measure.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "dpart/core/error.hpp"
#include "dpart/profile/probe.hpp"

namespace dpart::profile {

const std::vector<std::string>& result_columns() {
    static const std::vector<std::string> c{"key", "status", "figure", "value", "unit", "reason"};
    return c;
}

void add_result_rows(CsvTable& table, const ProbeResult& r) {
    const std::string status = to_string(r.status);
    if (r.figures.empty()) table.add_row({r.key, status, r.text.empty() ? "" : "text", r.text, "", r.reason});
    for (const Figure& f : r.figures) table.add_row({r.key, status, f.name, fmt::format("{:.6g}", f.value), f.unit, r.reason});
    for (const Label& l : r.labels) table.add_row({r.key, status, l.name, l.text, "", r.reason});
}

namespace {
double figure(const std::vector<ProbeResult>& results, const std::string& key, const std::string& name) {
    for (const ProbeResult& r : results)
        if (r.key == key && r.status == ProbeResult::Status::ok)
            if (const Figure* f = r.find(name)) return f->value;
    throw RuntimeError(fmt::format("a cluster file needs probe {} ({}), which did not run", key, name));
}
}  // namespace

std::string cpu_cluster_toml(const std::vector<ProbeResult>& results, const std::string& name, const std::string& host,
                             const Meta& meta) {
    const auto cores = static_cast<unsigned>(figure(results, "cpu.facts", "cores"));
    const double memory_gib = figure(results, "cpu.facts", "memory_gib");
    const double gflops = figure(results, "cpu.gemm_fp32", "gflops_per_core_all_busy");
    const double gbs = figure(results, "cpu.memory_bw", "gbs_per_core_all_busy");
    const double link_gbs = figure(results, "cpu.worker_link", "gbs");
    const double link_us = figure(results, "cpu.worker_link", "latency_us");
    std::string kind;
    for (const ProbeResult& r : results)
        if (r.key == "cpu.facts") kind = r.text;
    std::string out = meta_toml(meta);
    out += "# Measured by dpart profile: one device per core, each with what a core achieves while\n"
           "# every core works (fp32 GEMM through OpenBLAS; memory copy, bytes read + written). A core\n"
           "# does not overlap a layer's memory traffic with its arithmetic (overlaps_memory).\n\n";
    out += fmt::format("[cluster]\nname = {}\n\n", toml_string(name));
    out += fmt::format("[network]\nintra_node_gbs = {:.4g}\nintra_node_latency_us = {:.4g}\n", link_gbs, link_us);
    out += "inter_node_gbs = 1.0            # not measured: a guess for loopback TCP between hosts\n"
           "inter_node_latency_us = 50.0\n";
    for (unsigned c = 0; c < cores; ++c) {
        out += fmt::format("\n[[device]]\nname = \"cpu{}\"\nnode = {}\nkind = {}\n", c, toml_string(host), toml_string(kind));
        out += fmt::format("tflops = {:.4g}\nmem_gib = {:.3g}\nmem_bw_gbs = {:.4g}\noverlaps_memory = false\n",
                           gflops / 1e3, std::floor(memory_gib / cores * 10) / 10, gbs);
    }
    return out;
}

}  // namespace dpart::profile
