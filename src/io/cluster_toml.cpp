#include "dpart/io/cluster_toml.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <map>
#include <unordered_map>

#include "dpart/core/checked.hpp"
#include "dpart/core/strings.hpp"
#include "dpart/io/toml_reader.hpp"

namespace dpart {
namespace {

/// A `<prefix>_gbs` / `<prefix>_latency_us` pair: both or neither.
std::optional<LinkSpec> read_link_pair(TableReader& r, std::string_view prefix) {
    const std::string gbs_key = fmt::format("{}_gbs", prefix);
    const std::string latency_key = fmt::format("{}_latency_us", prefix);
    const auto gbs = r.optional_positive(gbs_key);
    const auto latency = r.optional_nonnegative(latency_key);
    if (gbs) r.check_within(gbs_key, *gbs, min_rate, max_rate, "GB/s");
    if (latency) r.check_within(latency_key, *latency, 0, max_latency_us, "us");
    if (gbs.has_value() != latency.has_value()) {
        const std::string& missing = gbs ? latency_key : gbs_key;
        r.reject_typo_of(missing);
        const std::string& given = gbs ? gbs_key : latency_key;
        r.fail(given, fmt::format("\"{}\" needs \"{}\" too", given, missing));
    }
    if (!gbs) return std::nullopt;
    return LinkSpec{*gbs, *latency};
}

/// The device figures shared by [[device]] and [[device_group]].
Device read_device_figures(TableReader& r) {
    r.expect({"kind", "tflops", "tflops_fp32", "tflops_bf16", "tflops_fp16", "tflops_tf32", "mem_gib", "mem_bw_gbs",
              "overlaps_memory"});
    Device d;
    d.kind = r.optional_string("kind").value_or("");
    d.tflops = r.required_positive("tflops");
    d.tflops_by_dtype[static_cast<std::size_t>(DType::fp32)] = r.optional_positive("tflops_fp32");
    d.tflops_by_dtype[static_cast<std::size_t>(DType::bf16)] = r.optional_positive("tflops_bf16");
    d.tflops_by_dtype[static_cast<std::size_t>(DType::fp16)] = r.optional_positive("tflops_fp16");
    d.tflops_tf32 = r.optional_positive("tflops_tf32");
    d.mem_gib = r.required_positive("mem_gib");
    d.mem_bw_gbs = r.required_positive("mem_bw_gbs");
    d.overlaps_memory = r.optional_bool("overlaps_memory", true);
    if (d.mem_gib >= 17179869184.0) r.fail("mem_gib", fmt::format("mem_gib {} overflows 64 bits of bytes", d.mem_gib));
    r.check_within("tflops", d.tflops, min_rate, max_rate, "TFLOP/s");
    for (DType t : {DType::fp32, DType::bf16, DType::fp16})
        if (const auto& v = d.tflops_by_dtype[static_cast<std::size_t>(t)])
            r.check_within(fmt::format("tflops_{}", to_string(t)), *v, min_rate, max_rate, "TFLOP/s");
    if (d.tflops_tf32) r.check_within("tflops_tf32", *d.tflops_tf32, min_rate, max_rate, "TFLOP/s");
    r.check_within("mem_bw_gbs", d.mem_bw_gbs, min_rate, max_rate, "GB/s");
    return d;
}

/// A [[device]]'s green-context partition: `sm` (with `gpu_sms`, and optionally `gpu` and
/// `sm_granularity`), or none when `sm` is absent.
std::optional<SmPartition> read_partition(TableReader& r) {
    constexpr std::uint64_t max_sms = 4096;
    if (!r.has("sm")) {
        for (std::string_view key : {"gpu_sms", "gpu", "sm_granularity"})
            if (r.has(key)) r.fail(key, fmt::format("\"{}\" describes a GPU partition: give \"sm\" too", key));
        return std::nullopt;
    }
    SmPartition p;
    const std::uint64_t sm = r.required_count("sm");
    if (!r.has("gpu_sms")) r.missing("gpu_sms", " (the SMs of the whole GPU the partition is part of)");
    const std::uint64_t gpu_sms = r.required_count("gpu_sms");
    const std::uint64_t gpu = r.optional_count("gpu", 0, true);
    const std::uint64_t step = r.optional_count("sm_granularity", 8);
    if (gpu_sms > max_sms) r.fail("gpu_sms", fmt::format("gpu_sms {} is more than the {} dpart accepts", gpu_sms, max_sms));
    if (gpu > 1023) r.fail("gpu", fmt::format("gpu {} is not a CUDA device index (0 to 1023)", gpu));
    if (step > gpu_sms) r.fail("sm_granularity", fmt::format("sm_granularity {} exceeds gpu_sms {}", step, gpu_sms));
    if (sm > gpu_sms) r.fail("sm", fmt::format("sm {} exceeds the GPU's gpu_sms {}", sm, gpu_sms));
    if (sm % step != 0)
        r.fail("sm", fmt::format("sm {} is not a multiple of {} (green contexts split a GPU in steps of {} SMs{}; "
                                 "set sm_granularity for another GPU)",
                                 sm, step, step, step == 8 ? " on Hopper" : ""));
    p.sm = static_cast<std::uint32_t>(sm);
    p.gpu_sms = static_cast<std::uint32_t>(gpu_sms);
    p.gpu = static_cast<std::uint32_t>(gpu);
    return p;
}

class ClusterBuilder {
public:
    ClusterBuilder(std::string path, bool nodes_declared) : path_(std::move(path)), nodes_declared_(nodes_declared) {}

    void declare_node(TableReader& r) {
        Node n;
        n.where = r.where();
        n.name = r.required_string("name");
        if (auto it = node_index_.find(n.name); it != node_index_.end())
            r.fail("name", fmt::format("duplicate node name \"{}\" (first declared at line {})", n.name,
                                       cluster_.nodes[it->second].where.line));
        r.set_context(fmt::format("node \"{}\"", n.name));
        n.intra = read_link_pair(r, "intra_node");
        r.finish();
        node_index_.emplace(n.name, cluster_.nodes.size());
        cluster_.nodes.push_back(std::move(n));
    }

    void add_device(Device d, const std::string& node_name, const TableReader& r, std::string_view node_key) {
        if (cluster_.devices.size() >= max_cluster_devices)
            r.fail(fmt::format("the cluster describes more than {} devices, the most dpart accepts",
                               max_cluster_devices));
        auto [it, inserted] = device_index_.emplace(d.name, cluster_.devices.size());
        if (!inserted)
            throw InputError(d.where, fmt::format("duplicate device name \"{}\" (first defined at line {})", d.name,
                                                  cluster_.devices[it->second].where.line));
        d.node = node_for(node_name, r, node_key);
        cluster_.nodes[d.node].devices.push_back(cluster_.devices.size());
        cluster_.devices.push_back(std::move(d));
    }

    /// A [[link]] between two devices, or between two nodes (every pair of their devices). A
    /// name is a device's when a device has it, else a node's.
    void add_link(TableReader& r) {
        const std::string a = r.required_string("a");
        const std::string b = r.required_string("b");
        r.set_context(fmt::format("link \"{}\" - \"{}\"", a, b));
        const bool nodes = !device_index_.contains(a) && node_index_.contains(a);
        if (nodes != (!device_index_.contains(b) && node_index_.contains(b)) && device_index_.contains(nodes ? b : a))
            r.fail("b", "a link joins two devices or two nodes, not a device and a node");
        const std::size_t ia = nodes ? node_index_.at(a) : device(a, r, "a");
        const std::size_t ib = nodes ? node(b, r, "b") : device(b, r, "b");
        if (ia == ib)
            r.fail("b", nodes ? "a link joins two different nodes (a node's own link is its intra_node_gbs)"
                              : "a link joins two different devices");
        LinkSpec link;
        link.gbs = r.required_positive("gbs");
        r.check_within("gbs", link.gbs, min_rate, max_rate, "GB/s");
        const auto latency = r.optional_nonnegative("latency_us");
        if (!latency) r.missing("latency_us");
        r.check_within("latency_us", *latency, 0, max_latency_us, "us");
        link.latency_us = *latency;
        r.finish();
        auto& lines = nodes ? node_link_lines_ : link_lines_;
        auto [it, inserted] = lines.emplace(Cluster::pair_key(ia, ib), r.where().line);
        if (!inserted) r.fail(fmt::format("this pair's link is given twice (first at line {})", it->second));
        (nodes ? cluster_.node_overrides : cluster_.overrides).emplace(Cluster::pair_key(ia, ib), link);
    }

    Cluster finish(const SourceLocation& network_where) {
        if (cluster_.devices.empty())
            throw InputError(cluster_.where, "the cluster has no devices: add [[device]] or [[device_group]] tables");
        std::size_t populated = 0;
        for (const Node& n : cluster_.nodes) {
            if (n.devices.empty()) continue;
            ++populated;
            if (n.devices.size() > 1 && !n.intra && !cluster_.intra_default)
                throw InputError(network_where, fmt::format("node \"{}\" has {} devices but gives no link between "
                                                            "them: add [network] intra_node_gbs and "
                                                            "intra_node_latency_us, or the node's own",
                                                            n.name, n.devices.size()));
        }
        check_partitions();
        // Links between nodes: the default, unless [[link]] gives every pair of populated nodes.
        std::size_t covered = 0;
        for (const auto& [key, link] : cluster_.node_overrides) {
            const auto na = static_cast<std::size_t>(key >> 32), nb = static_cast<std::size_t>(key & 0xffffffffu);
            covered += !cluster_.nodes.at(na).devices.empty() && !cluster_.nodes.at(nb).devices.empty();
        }
        if (populated > 1 && !cluster_.inter_default && covered < populated * (populated - 1) / 2)
            throw InputError(network_where, fmt::format("the cluster spans {} nodes but gives no inter-node link: "
                                                        "add [network] inter_node_gbs and inter_node_latency_us, or a [[link]] "
                                                        "between every two nodes",
                                                        populated));
        return std::move(cluster_);
    }

    Cluster& cluster() { return cluster_; }

    /// The partitions of one GPU (same node and `gpu`) agree on its SMs and fit in them.
    void check_partitions() const {
        std::map<std::pair<std::size_t, std::uint32_t>, std::vector<std::size_t>> gpus;
        for (std::size_t i = 0; i < cluster_.devices.size(); ++i)
            if (const auto& p = cluster_.devices[i].partition) gpus[{cluster_.devices[i].node, p->gpu}].push_back(i);
        for (const auto& [key, members] : gpus) {
            const Device& first = cluster_.devices[members.front()];
            std::uint64_t used = 0;
            for (std::size_t i : members) {
                const Device& d = cluster_.devices[i];
                if (d.partition->gpu_sms != first.partition->gpu_sms)
                    throw InputError(d.where, fmt::format("device \"{}\": gpu_sms {} differs from {} given by \"{}\" "
                                                          "for the same GPU {} of node \"{}\" (line {})",
                                                          d.name, d.partition->gpu_sms, first.partition->gpu_sms,
                                                          first.name, key.second, cluster_.nodes[key.first].name,
                                                          first.where.line));
                used += d.partition->sm;
                if (used > first.partition->gpu_sms)
                    throw InputError(d.where, fmt::format("device \"{}\": the partitions of GPU {} of node \"{}\" "
                                                          "take {} SMs up to here, more than its {}",
                                                          d.name, key.second, cluster_.nodes[key.first].name, used,
                                                          first.partition->gpu_sms));
            }
        }
    }

private:
    std::size_t node_for(const std::string& name, const TableReader& r, std::string_view key) {
        if (auto it = node_index_.find(name); it != node_index_.end()) return it->second;
        if (nodes_declared_) {
            std::vector<std::string> names;
            for (const Node& n : cluster_.nodes) names.push_back(n.name);
            r.fail(key, fmt::format("node \"{}\" is not declared by any [[node]] table{}", name, did_you_mean(name, names)));
        }
        Node n;
        n.name = name;
        n.where = r.where(key);
        node_index_.emplace(name, cluster_.nodes.size());
        cluster_.nodes.push_back(std::move(n));
        return cluster_.nodes.size() - 1;
    }

    std::size_t node(const std::string& name, const TableReader& r, std::string_view key) const {
        if (auto it = node_index_.find(name); it != node_index_.end()) return it->second;
        std::vector<std::string> names;
        for (const Node& n : cluster_.nodes) names.push_back(n.name);
        r.fail(key, fmt::format("node \"{}\" is not defined{}", name, did_you_mean(name, names)));
    }
    std::size_t device(const std::string& name, const TableReader& r, std::string_view key) const {
        if (auto it = device_index_.find(name); it != device_index_.end()) return it->second;
        std::vector<std::string> names;
        if (cluster_.devices.size() <= 4096)
            for (const Device& d : cluster_.devices) names.push_back(d.name);
        r.fail(key, fmt::format("device \"{}\" is not defined{}", name, did_you_mean(name, names)));
    }

    std::string path_;
    bool nodes_declared_;
    Cluster cluster_;
    std::unordered_map<std::string, std::size_t> node_index_;
    std::unordered_map<std::string, std::size_t> device_index_;
    std::unordered_map<std::uint64_t, std::uint32_t> link_lines_, node_link_lines_;
};

Cluster read_cluster(const toml::table& root, const std::string& path) {
    TableReader top(root, path, "");
    const toml::table* cluster = top.optional_table("cluster");
    const toml::table* network = top.optional_table("network");
    const toml::array* nodes = top.optional_table_array("node");
    const toml::array* devices = top.optional_table_array("device");
    const toml::array* groups = top.optional_table_array("device_group");
    const toml::array* links = top.optional_table_array("link");
    (void)top.optional_table("meta");  // provenance, as dpart profile writes it: not checked
    top.finish();
    if (cluster == nullptr) throw InputError(SourceLocation{path}, "missing the [cluster] table");

    ClusterBuilder builder(path, nodes != nullptr);
    Cluster& c = builder.cluster();
    TableReader head(*cluster, path, "[cluster]");
    c.where = head.where();
    c.name = head.required_string("name");
    head.finish();

    SourceLocation network_where = c.where;
    if (network != nullptr) {
        TableReader r(*network, path, "[network]");
        r.expect({"intra_node_gbs", "intra_node_latency_us", "inter_node_gbs", "inter_node_latency_us"});
        network_where = r.where();
        c.intra_default = read_link_pair(r, "intra_node");
        c.inter_default = read_link_pair(r, "inter_node");
        r.finish();
    }
    if (nodes != nullptr)
        for (const toml::node& n : *nodes) {
            TableReader r(*n.as_table(), path, "[[node]]");
            builder.declare_node(r);
        }
    // [[device]] and [[device_group]] tables are taken in file order, so that device indices and
    // "first defined at" messages follow what the user wrote.
    struct Entry {
        std::uint32_t line;
        bool group;
        std::size_t index;
    };
    std::vector<Entry> entries;
    if (devices != nullptr)
        for (std::size_t i = 0; i < devices->size(); ++i)
            entries.push_back({devices->get(i)->source().begin.line, false, i});
    if (groups != nullptr)
        for (std::size_t i = 0; i < groups->size(); ++i)
            entries.push_back({groups->get(i)->source().begin.line, true, i});
    std::stable_sort(entries.begin(), entries.end(), [](const Entry& x, const Entry& y) { return x.line < y.line; });
    for (const Entry& e : entries) {
        const std::size_t i = e.index;
        if (!e.group) {
            TableReader r(*devices->get(i)->as_table(), path, fmt::format("[[device]] #{}", i + 1));
            const std::string name = r.required_string("name");
            r.set_context(fmt::format("device \"{}\"", name));
            const auto node = r.optional_string("node");
            if (!node) r.missing("node", " (every device belongs to a node)");
            if (node->empty()) r.fail("node", "\"node\" must not be empty");
            r.expect({"gpu", "sm", "gpu_sms", "sm_granularity"});
            Device d = read_device_figures(r);
            d.name = name;
            d.where = r.where();
            d.partition = read_partition(r);
            r.finish();
            builder.add_device(std::move(d), *node, r, "node");
        } else {
            TableReader r(*groups->get(i)->as_table(), path, fmt::format("[[device_group]] #{}", i + 1));
            const std::uint64_t node_count = r.required_count("nodes");
            const std::uint64_t per_node = r.required_count("devices_per_node");
            const std::string node_prefix = r.optional_string("node_prefix").value_or("node");
            const std::uint64_t first_node = r.optional_count("first_node", 0, true);
            const std::string device_prefix = r.optional_string("device_prefix").value_or("gpu");
            const Device figures = read_device_figures(r);
            r.finish();
            std::uint64_t total = 0;
            try {
                total = checked_add(c.devices.size(), checked_mul(node_count, per_node));
                (void)checked_add(first_node, node_count);
            } catch (const OverflowError&) {
                r.fail("nodes", "nodes x devices_per_node overflows 64 bits");
            }
            if (total > max_cluster_devices)
                r.fail("nodes", fmt::format("{} x {} devices brings the cluster to {} devices, more than the {} "
                                            "dpart accepts",
                                            node_count, per_node, total, max_cluster_devices));
            for (std::uint64_t n = 0; n < node_count; ++n) {
                const std::string node_name = fmt::format("{}{}", node_prefix, first_node + n);
                for (std::uint64_t j = 0; j < per_node; ++j) {
                    Device d = figures;
                    d.name = fmt::format("{}.{}{}", node_name, device_prefix, j);
                    d.where = r.where();
                    builder.add_device(std::move(d), node_name, r, "node_prefix");
                }
            }
        }
    }
    if (links != nullptr)
        for (std::size_t i = 0; i < links->size(); ++i) {
            TableReader r(*links->get(i)->as_table(), path, fmt::format("[[link]] #{}", i + 1));
            builder.add_link(r);
        }
    return builder.finish(network_where);
}

}  // namespace

Cluster load_cluster(const std::string& path) { return read_cluster(parse_toml_file(path), path); }

Cluster parse_cluster(std::string_view text, const std::string& path) {
    return read_cluster(parse_toml_text(text, path), path);
}

}  // namespace dpart
