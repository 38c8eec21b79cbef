// Several ranks' probe results into one cluster.toml: the message a rank sends to rank 0, the
// figures of each GPU, and the file with one [[node]] per host.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "dpart/core/error.hpp"
#include "dpart/profile/gpu.hpp"

namespace dpart::profile {
namespace {

// --- The message -----------------------------------------------------------------------------
void put_string(rt::Bytes& out, const std::string& s) {
    rt::append_value(out, static_cast<std::uint64_t>(s.size()));
    rt::append(out, std::span<const char>(s.data(), s.size()));
}

std::uint64_t get_count(rt::Reader& in, const rt::Bytes& b) {
    const auto n = in.value<std::uint64_t>();
    if (n > b.size()) throw RuntimeError(fmt::format("a profile message claims {} entries in {} bytes", n, b.size()));
    return n;
}

std::string get_string(rt::Reader& in, const rt::Bytes& b) {
    std::string s(get_count(in, b), '\0');
    in.read_into(std::span<char>(s.data(), s.size()));
    return s;
}

constexpr std::uint64_t message_magic = 0x31464f5250;  // "PROF1"

// --- Figures from results ----------------------------------------------------------------------
const ProbeResult* ok_result(const std::vector<ProbeResult>& results, const std::string& key) {
    for (const ProbeResult& r : results)
        if (r.key == key && r.status == ProbeResult::Status::ok) return &r;
    return nullptr;
}

std::optional<double> figure(const std::vector<ProbeResult>& results, const std::string& key, const std::string& name) {
    if (const ProbeResult* r = ok_result(results, key))
        if (const Figure* f = r->find(name)) return f->value;
    return std::nullopt;
}

double median_of(std::vector<double> v) { return stats_of(std::move(v)).median; }

/// The GPU indices with a GEMM rate in any dtype.
std::vector<int> gemm_gpus(const std::vector<ProbeResult>& results) {
    std::vector<int> out;
    for (const char* key : {"gpu.gemm_fp32", "gpu.gemm_tf32", "gpu.gemm_bf16", "gpu.gemm_fp16"})
        if (const ProbeResult* r = ok_result(results, key))
            for (const Figure& f : r->figures) {
                int d = -1;
                char rest[16] = {};
                if (std::sscanf(f.name.c_str(), "gpu%d.%15s", &d, rest) == 2 && std::string(rest) == "tflops" &&
                    std::find(out.begin(), out.end(), d) == out.end())
                    out.push_back(d);
            }
    std::sort(out.begin(), out.end());
    return out;
}

/// The intra-node link: peer copies (median over ordered pairs), else NCCL with 2+ ranks.
std::optional<Link> intra_link(const std::vector<ProbeResult>& results) {
    if (const ProbeResult* r = ok_result(results, "gpu.peer")) {
        std::vector<double> bw, lat;
        for (const Figure& f : r->figures) {
            if (f.name.ends_with(".gbs")) bw.push_back(f.value);
            if (f.name.ends_with(".latency_us")) lat.push_back(f.value);
        }
        if (!bw.empty() && !lat.empty())
            return Link{median_of(bw), median_of(lat),
                        fmt::format("gpu.peer: median over {} ordered pairs of cudaMemcpyPeer", bw.size())};
    }
    const ProbeResult* ar = ok_result(results, "nccl.all_reduce");
    const auto ranks = figure(results, "nccl.all_reduce", "ranks");
    if (ar == nullptr || !ranks || *ranks < 2) return std::nullopt;
    // The busbw of the largest size, and the time of the smallest message (sendrecv's if run).
    auto points = [](const ProbeResult& r, const std::string& suffix) {
        std::vector<std::pair<std::size_t, double>> out;
        for (const Figure& f : r.figures)
            if (f.name.ends_with(suffix)) out.emplace_back(std::stoull(f.name), f.value);
        std::sort(out.begin(), out.end());
        return out;
    };
    const auto busbw = points(*ar, "B.busbw_gbs");
    const ProbeResult* sr = ok_result(results, "nccl.sendrecv");
    const auto times = points(sr != nullptr ? *sr : *ar, "B.time_us");
    if (busbw.empty() || times.empty()) return std::nullopt;
    return Link{busbw.back().second, times.front().second,
                fmt::format("nccl.all_reduce busbw at {} bytes over {} ranks; latency: nccl.{} of {} bytes",
                            busbw.back().first, *ranks, sr != nullptr ? "sendrecv" : "all_reduce",
                            times.front().first)};
}

std::string label_text(const std::vector<ProbeResult>& results, const std::string& key, const std::string& name) {
    if (const ProbeResult* r = ok_result(results, key))
        if (const Label* l = r->label(name)) return l->text;
    return "";
}

std::string num(double v) { return fmt::format("{:.4g}", v); }

struct Host {
    std::string name;
    std::vector<std::size_t> ranks;
    std::vector<GpuFigures> gpus;
    std::optional<Link> intra;
    const std::vector<ProbeResult>* cpu = nullptr;  ///< the first rank's results, for CPU figures
};

void write_gpu(std::string& out, const Host& h, std::size_t k, const GpuFigures& g) {
    out += fmt::format("\n[[device]]\nname = {}\nnode = {}\n", toml_string(fmt::format("{}.gpu{}", h.name, k)),
                       toml_string(h.name));
    if (!g.kind.empty()) out += fmt::format("kind = {}\n", toml_string(g.kind));
    out += fmt::format("tflops = {}\n", num(g.tflops()));
    for (auto [field, v] : {std::pair{"tflops_fp32", g.tflops_fp32}, std::pair{"tflops_tf32", g.tflops_tf32},
                            std::pair{"tflops_bf16", g.tflops_bf16}, std::pair{"tflops_fp16", g.tflops_fp16}})
        if (v) out += fmt::format("{} = {}\n", field, num(*v));
    out += fmt::format("mem_gib = {}\nmem_bw_gbs = {}\n", fmt::format("{:.1f}", std::floor(g.mem_gib * 10) / 10),
                       num(g.mem_bw_gbs));
}

/// A host without GPU figures: one device per core, as cpu_cluster_toml makes them.
std::size_t write_cpus(std::string& out, const Host& h) {
    const auto& r = *h.cpu;
    const auto cores = figure(r, "cpu.facts", "cores");
    const auto memory = figure(r, "cpu.facts", "memory_gib");
    const auto gflops = figure(r, "cpu.gemm_fp32", "gflops_per_core_all_busy");
    const auto bw = figure(r, "cpu.memory_bw", "gbs_per_core_all_busy");
    if (!cores || !memory || !gflops || !bw)
        throw RuntimeError(fmt::format("host {} (rank {}) measured no GPU and not the CPU probes a device needs "
                                       "(cpu.facts, cpu.gemm_fp32, cpu.memory_bw)",
                                       h.name, h.ranks.front()));
    const auto n = static_cast<std::size_t>(*cores);
    for (std::size_t c = 0; c < n; ++c) {
        out += fmt::format("\n[[device]]\nname = {}\nnode = {}\n", toml_string(fmt::format("{}.cpu{}", h.name, c)),
                           toml_string(h.name));
        const std::string kind = ok_result(r, "cpu.facts") != nullptr ? ok_result(r, "cpu.facts")->text : "";
        if (!kind.empty()) out += fmt::format("kind = {}\n", toml_string(kind));
        out += fmt::format("tflops = {}\nmem_gib = {:.3g}\nmem_bw_gbs = {}\noverlaps_memory = false\n",
                           num(*gflops / 1e3), std::floor(*memory / static_cast<double>(n) * 10) / 10, num(*bw));
    }
    return n;
}

}  // namespace

double GpuFigures::tflops() const {
    for (const auto& v : {tflops_bf16, tflops_fp16, tflops_tf32, tflops_fp32})
        if (v) return *v;
    throw RuntimeError(fmt::format("gpu{} has no GEMM rate", index));
}

rt::Bytes encode(const RankResults& r) {
    rt::Bytes out;
    rt::append_value(out, message_magic);
    rt::append_value(out, static_cast<std::uint64_t>(r.rank));
    put_string(out, r.host);
    rt::append_value(out, static_cast<std::uint64_t>(r.results.size()));
    for (const ProbeResult& p : r.results) {
        put_string(out, p.key);
        rt::append_value(out, static_cast<std::uint8_t>(p.status));
        put_string(out, p.reason);
        put_string(out, p.text);
        rt::append_value(out, static_cast<std::uint64_t>(p.figures.size()));
        for (const Figure& f : p.figures) {
            put_string(out, f.name);
            rt::append_value(out, f.value);
            put_string(out, f.unit);
        }
        rt::append_value(out, static_cast<std::uint64_t>(p.labels.size()));
        for (const Label& l : p.labels) {
            put_string(out, l.name);
            put_string(out, l.text);
        }
    }
    return out;
}

RankResults decode_rank_results(const rt::Bytes& b) {
    rt::Reader in(b);
    if (in.value<std::uint64_t>() != message_magic) throw RuntimeError("a profile message does not start as one");
    RankResults r;
    r.rank = static_cast<std::size_t>(in.value<std::uint64_t>());
    r.host = get_string(in, b);
    const std::uint64_t n = get_count(in, b);
    for (std::uint64_t i = 0; i < n; ++i) {
        ProbeResult p;
        p.key = get_string(in, b);
        const auto status = in.value<std::uint8_t>();
        if (status > static_cast<std::uint8_t>(ProbeResult::Status::failed))
            throw RuntimeError(fmt::format("a profile message has status {}", status));
        p.status = static_cast<ProbeResult::Status>(status);
        p.reason = get_string(in, b);
        p.text = get_string(in, b);
        const std::uint64_t figures = get_count(in, b);
        for (std::uint64_t j = 0; j < figures; ++j) {
            Figure f;
            f.name = get_string(in, b);
            f.value = in.value<double>();
            f.unit = get_string(in, b);
            p.figures.push_back(std::move(f));
        }
        const std::uint64_t labels = get_count(in, b);
        for (std::uint64_t j = 0; j < labels; ++j) {
            Label l;
            l.name = get_string(in, b);
            l.text = get_string(in, b);
            p.labels.push_back(std::move(l));
        }
        r.results.push_back(std::move(p));
    }
    if (!in.done()) throw RuntimeError("a profile message has bytes after its end");
    return r;
}

bool has_gpu_figures(const std::vector<ProbeResult>& results) { return !gemm_gpus(results).empty(); }

NodeFigures node_figures(const std::vector<ProbeResult>& results) {
    NodeFigures node;
    for (int d : gemm_gpus(results)) {
        const std::string prefix = fmt::format("gpu{}.", d);
        GpuFigures g;
        g.index = d;
        g.kind = label_text(results, "gpu.facts", prefix + "name");
        g.pci_bus = label_text(results, "gpu.facts", prefix + "pci_bus");
        const auto mem = figure(results, "gpu.facts", prefix + "mem_gib");
        if (!mem) throw RuntimeError(fmt::format("gpu{} has a GEMM rate but no memory size: run gpu.facts too", d));
        g.mem_gib = *mem;
        const auto bw = figure(results, "gpu.memory_bw", prefix + "gbs_read_written");
        if (!bw)
            throw RuntimeError(fmt::format("gpu{} has a GEMM rate but no memory bandwidth: run gpu.memory_bw too", d));
        g.mem_bw_gbs = *bw;
        g.tflops_fp32 = figure(results, "gpu.gemm_fp32", prefix + "tflops");
        g.tflops_tf32 = figure(results, "gpu.gemm_tf32", prefix + "tflops");
        g.tflops_bf16 = figure(results, "gpu.gemm_bf16", prefix + "tflops");
        g.tflops_fp16 = figure(results, "gpu.gemm_fp16", prefix + "tflops");
        node.gpus.push_back(std::move(g));
    }
    if (!node.gpus.empty()) node.intra = intra_link(results);
    return node;
}

std::string merged_cluster_toml(const std::vector<RankResults>& ranks, const std::string& name, const Meta& meta,
                                const std::optional<Link>& inter, const std::vector<NodeLink>& node_links) {
    if (ranks.empty()) throw RuntimeError("no rank's results to merge");
    // Hosts in the order of their first rank; ranks of one host merged.
    std::vector<RankResults const*> sorted;
    for (const RankResults& r : ranks) sorted.push_back(&r);
    std::stable_sort(sorted.begin(), sorted.end(), [](auto* a, auto* b) { return a->rank < b->rank; });
    std::vector<Host> hosts;
    for (const RankResults* r : sorted) {
        auto it = std::find_if(hosts.begin(), hosts.end(), [&](const Host& h) { return h.name == r->host; });
        if (it == hosts.end()) {
            hosts.push_back({r->host, {}, {}, std::nullopt, &r->results});
            it = hosts.end() - 1;
        }
        it->ranks.push_back(r->rank);
        NodeFigures f = node_figures(r->results);
        for (GpuFigures& g : f.gpus) {
            const bool seen = !g.pci_bus.empty() && std::any_of(it->gpus.begin(), it->gpus.end(), [&](const auto& x) {
                return x.pci_bus == g.pci_bus;
            });
            if (!seen) it->gpus.push_back(std::move(g));  // a GPU two ranks measured: the first's figures
        }
        if (!it->intra && f.intra) it->intra = f.intra;
    }
    for (Host& h : hosts) {
        // PCI bus order; the ranks' order where a bus is unknown.
        if (std::none_of(h.gpus.begin(), h.gpus.end(), [](const auto& g) { return g.pci_bus.empty(); }))
            std::stable_sort(h.gpus.begin(), h.gpus.end(),
                             [](const auto& a, const auto& b) { return a.pci_bus < b.pci_bus; });
    }

    std::string out = meta_toml(meta);
    out += fmt::format("# Measured by dpart profile on {} host{} ({} rank{}). Per GPU: tflops is the bf16 cuBLAS GEMM\n"
                       "# rate (else fp16, tf32, fp32), tflops_<dtype> each dtype's; mem_bw_gbs is the bytes read +\n"
                       "# written per second by a device-to-device copy. A host without a GPU gives one device per\n"
                       "# core (cpu_cluster_toml's figures). docs/METHOD.md says how each figure is measured.\n\n",
                       hosts.size(), hosts.size() == 1 ? "" : "s", ranks.size(), ranks.size() == 1 ? "" : "s");
    out += fmt::format("[cluster]\nname = {}\n\n", toml_string(name));
    out += "[network]\n";
    // A multi-device host without a measured link (one GPU per rank and no NCCL across ranks):
    // a default is needed, and none was measured.
    const bool needs_intra_default = std::any_of(hosts.begin(), hosts.end(), [](const Host& h) {
        if (!h.gpus.empty()) return !h.intra && h.gpus.size() > 1;
        return !figure(*h.cpu, "cpu.worker_link", "gbs").has_value();
    });
    if (needs_intra_default)
        out += "intra_node_gbs = 16.0          # not measured: a guess (PCIe 4 x16) for hosts whose link no probe measured\n"
               "intra_node_latency_us = 10.0\n";
    if (inter)
        out += fmt::format("inter_node_gbs = {}           # {}\ninter_node_latency_us = {}\n", num(inter->gbs),
                           inter->source, num(inter->latency_us));
    else
        out += "inter_node_gbs = 12.5          # not measured: a guess (100 Gb/s Ethernet between hosts)\n"
               "inter_node_latency_us = 10.0\n";
    for (const Host& h : hosts) {
        out += fmt::format("\n[[node]]\nname = {}\n", toml_string(h.name));
        std::optional<Link> link = h.intra;
        if (h.gpus.empty()) {
            const auto gbs_ = figure(*h.cpu, "cpu.worker_link", "gbs");
            const auto us = figure(*h.cpu, "cpu.worker_link", "latency_us");
            if (gbs_ && us) link = Link{*gbs_, *us, "cpu.worker_link"};
        }
        if (link)
            out += fmt::format("intra_node_gbs = {}           # {}\nintra_node_latency_us = {}\n", num(link->gbs),
                               link->source, num(link->latency_us));
    }
    for (const Host& h : hosts) {
        if (h.gpus.empty()) {
            (void)write_cpus(out, h);
            continue;
        }
        for (std::size_t k = 0; k < h.gpus.size(); ++k) write_gpu(out, h, k, h.gpus[k]);
    }
    if (node_links.size() > 1) {
        out += "\n# Each pair of hosts as measured (the [network] inter-node default is the slowest of them).\n";
        for (const NodeLink& l : node_links)
            out += fmt::format("[[link]]\na = {}\nb = {}\ngbs = {}           # {}\nlatency_us = {}\n", toml_string(l.a),
                               toml_string(l.b), num(l.link.gbs), l.link.source, num(l.link.latency_us));
    }
    return out;
}

}  // namespace dpart::profile
