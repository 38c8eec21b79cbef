// dpart profile's GPU side without a GPU: nccl-tests' sizes and bus bandwidth, medians and
// rates, the GPU probes waived with a reason, the message a rank sends, and several ranks'
// results merged into one cluster.toml through the in-process transport (a fake of mpirun).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
#include <thread>

#include "dpart/core/error.hpp"
#include "dpart/io/cluster_toml.hpp"
#include "dpart/profile/gpu.hpp"
#include "dpart/profile/host_links.hpp"
#include "dpart/profile/rank_nccl.hpp"

using namespace dpart;
using namespace dpart::profile;

TEST_CASE("profile: busbw factors are nccl-tests' (2(n-1)/n, (n-1)/n, 1)") {
    CHECK(busbw_factor(Collective::all_reduce, 1) == 0);
    CHECK(busbw_factor(Collective::all_reduce, 2) == 1);
    CHECK(busbw_factor(Collective::all_reduce, 8) == doctest::Approx(1.75));
    CHECK(busbw_factor(Collective::all_gather, 1) == 0);
    CHECK(busbw_factor(Collective::all_gather, 8) == doctest::Approx(0.875));
    CHECK(busbw_factor(Collective::reduce_scatter, 4) == doctest::Approx(0.75));
    CHECK(busbw_factor(Collective::sendrecv, 1) == 1);
    CHECK(busbw_factor(Collective::sendrecv, 8) == 1);
    CHECK_THROWS_AS((void)busbw_factor(Collective::all_reduce, 0), RuntimeError);
    CHECK(to_string(Collective::reduce_scatter) == "reduce_scatter");
}

TEST_CASE("profile: a collective's algbw and busbw match an nccl-tests row") {
    // all_reduce_perf -g 8, 1 GiB out of place: 5760 us, algbw 186.41, busbw 326.22.
    const CollectivePoint p = collective_point(Collective::all_reduce, std::size_t{1} << 30, 8, 5760e-6);
    CHECK(p.algbw_gbs == doctest::Approx(186.41).epsilon(1e-4));
    CHECK(p.busbw_gbs == doctest::Approx(326.22).epsilon(1e-4));
    // One rank: busbw is 0 by definition, algbw still the figure.
    const CollectivePoint one = collective_point(Collective::all_reduce, 1000, 1, 1e-6);
    CHECK(one.algbw_gbs == doctest::Approx(1.0));
    CHECK(one.busbw_gbs == 0);
    CHECK(collective_point(Collective::sendrecv, 2000, 1, 1e-6).busbw_gbs == doctest::Approx(2.0));
}

TEST_CASE("profile: collective sizes go from 8 B to 1 GiB by x4, and nccl-tests' counts divide them") {
    const auto s = collective_sizes(8, std::size_t{1} << 30, 4);
    REQUIRE(s.size() == 15);
    CHECK(s[0] == 8);
    CHECK(s[1] == 32);
    CHECK(s[13] == std::size_t{512} << 20);
    CHECK(s.back() == std::size_t{1} << 30);
    CHECK(collective_sizes(8, 128, 2) == std::vector<std::size_t>{8, 16, 32, 64, 128});
    CHECK(collective_sizes(8, 8, 4) == std::vector<std::size_t>{8});
    CHECK(collective_sizes(1, std::numeric_limits<std::size_t>::max(), 4).back() ==
          std::numeric_limits<std::size_t>::max());
    CHECK_THROWS_AS((void)collective_sizes(0, 8, 4), RuntimeError);
    CHECK_THROWS_AS((void)collective_sizes(8, 4, 4), RuntimeError);
    CHECK_THROWS_AS((void)collective_sizes(8, 64, 1), RuntimeError);

    // all_reduce and sendrecv: the whole buffer per rank; all_gather / reduce_scatter: size is
    // the total buffer, each rank's share is size / n.
    CHECK(collective_count(Collective::all_reduce, 1024, 8, 4) == 256);
    CHECK(collective_count(Collective::sendrecv, 1024, 8, 4) == 256);
    CHECK(collective_count(Collective::all_gather, std::size_t{1} << 30, 8, 4) == std::size_t{1} << 25);
    CHECK(collective_bytes(Collective::all_gather, std::size_t{1} << 25, 8, 4) == std::size_t{1} << 30);
    CHECK(collective_count(Collective::reduce_scatter, 100, 8, 4) == 3);
    CHECK(collective_bytes(Collective::reduce_scatter, 3, 8, 4) == 96);  // rounded down, as nccl-tests
    CHECK(collective_count(Collective::all_gather, 8, 8, 4) == 0);        // too small to split: skipped
}

TEST_CASE("profile: medians, rates and units") {
    const Stats odd = stats_of({3, 1, 2});
    CHECK(odd.median == 2);
    CHECK(odd.min == 1);
    CHECK(odd.max == 3);
    CHECK(odd.n == 3);
    CHECK(stats_of({4, 1, 3, 2}).median == 2.5);
    CHECK(stats_of({1, 1, 1, 100}).median == 1);  // one slow repeat does not move it
    CHECK_THROWS_AS((void)stats_of({}), RuntimeError);
    CHECK_THROWS_AS((void)stats_of({1, -1}), RuntimeError);
    CHECK_THROWS_AS((void)stats_of({1, std::nan("")}), RuntimeError);

    CHECK(gemm_tflops(8192, 8192, 8192, 1.3726e-3) == doctest::Approx(801.0).epsilon(1e-3));
    gpu::ConvShape c;  // 128 x 256 x 28 x 28, 256 filters 3x3, pad 1: output 28 x 28
    CHECK(conv_tflops(c, 28, 28, 1e-3) == doctest::Approx(2.0 * 128 * 256 * 28 * 28 * 256 * 9 / 1e-3 / 1e12));
    CHECK(gbs(1e9, 0.5) == 2);
    CHECK(gbs(double(std::size_t{1} << 30), 1) == doctest::Approx(1.073741824));

    ProbeSettings two;
    two.gpu_stride = 2;
    two.gpu_offset = 1;
    CHECK(measured_gpus(two, 5) == std::vector<int>{1, 3});
    CHECK(measured_gpus(ProbeSettings{}, 3) == std::vector<int>{0, 1, 2});
}

TEST_CASE("profile: every GPU and NCCL probe is listed, and runs or is waived with a reason") {
    ProbeSettings tiny;
    tiny.repeats = 1;
    tiny.scale = 0.01;
    const auto all = all_probes(tiny);
    std::set<std::string> keys;
    for (const Probe& p : all) {
        CHECK(keys.insert(p.key).second);
        CHECK(!p.description.empty());
        CHECK(p.description.find('\n') == std::string::npos);
    }
    for (const char* k : {"gpu.facts", "gpu.gemm_fp32", "gpu.gemm_tf32", "gpu.gemm_bf16", "gpu.gemm_fp16", "gpu.conv",
                          "gpu.memory_bw", "gpu.h2d_pinned", "gpu.d2h_pinned", "gpu.h2d_pageable", "gpu.d2h_pageable",
                          "gpu.peer", "gpu.latency", "nccl.all_reduce", "nccl.all_gather", "nccl.reduce_scatter",
                          "nccl.sendrecv"})
        CHECK_MESSAGE(keys.count(k) == 1, k);
    const bool gpu_here = gpu::unavailable().empty();
    for (const Probe& p : select_probes(all, {}, {"gpu.", "nccl."})) {
        const ProbeResult r = run_probe(p);
        CAPTURE(r.key);
        CAPTURE(r.reason);
        CHECK(r.status != ProbeResult::Status::failed);
        if (r.status == ProbeResult::Status::waived) CHECK(!r.reason.empty());
        if (!gpu_here) CHECK(r.status == ProbeResult::Status::waived);
        for (const Figure& f : r.figures) CHECK(std::isfinite(f.value));
    }
}

namespace {

ProbeResult ok(const std::string& key, std::vector<Figure> figures, std::vector<Label> labels = {}) {
    ProbeResult r;
    r.key = key;
    r.figures = std::move(figures);
    r.labels = std::move(labels);
    return r;
}

/// What a process with GPUs `gpus` (CUDA indices, PCI buses) measures.
std::vector<ProbeResult> gpu_results(const std::vector<std::pair<int, std::string>>& gpus, double bf16) {
    ProbeResult facts = ok("gpu.facts", {{"devices", double(gpus.size()), "GPUs"}}, {{"versions", "CUDA 13.0"}});
    ProbeResult fp32 = ok("gpu.gemm_fp32", {}), b16 = ok("gpu.gemm_bf16", {}), mem = ok("gpu.memory_bw", {});
    for (const auto& [d, bus] : gpus) {
        const std::string p = "gpu" + std::to_string(d) + ".";
        facts.labels.push_back({p + "name", "NVIDIA H100 80GB HBM3"});
        facts.labels.push_back({p + "pci_bus", bus});
        facts.figures.push_back({p + "mem_gib", 79.19, "GiB"});
        fp32.figures.push_back({p + "tflops", 51.5, "TFLOP/s"});
        b16.figures.push_back({p + "tflops", bf16 + d, "TFLOP/s"});
        mem.figures.push_back({p + "gbs_copied", 1506, "GB/s"});
        mem.figures.push_back({p + "gbs_read_written", 3012, "GB/s"});
    }
    ProbeResult waived;
    waived.key = "gpu.gemm_tf32";
    waived.status = ProbeResult::Status::waived;
    waived.reason = "not selected";
    return {facts, fp32, b16, mem, waived};
}

std::vector<ProbeResult> cpu_results() {
    ProbeResult facts = ok("cpu.facts", {{"cores", 2, "cores"}, {"memory_gib", 8, "GiB"}});
    facts.text = "AMD EPYC";
    return {facts, ok("cpu.gemm_fp32", {{"gflops_one_core", 100, "GFLOP/s"}, {"gflops_per_core_all_busy", 50, "GFLOP/s"}}),
            ok("cpu.memory_bw", {{"gbs_one_core", 20, "GB/s"}, {"gbs_per_core_all_busy", 10, "GB/s"}}),
            ok("cpu.worker_link", {{"latency_us", 5, "us"}, {"gbs", 4, "GB/s"}})};
}

}  // namespace

TEST_CASE("profile: a rank's results survive the message to rank 0, and a damaged message is refused") {
    RankResults r{3, "host-b", gpu_results({{0, "0000:18:00.0"}}, 800)};
    r.results[1].text = "a \"quoted\" text";
    const RankResults back = decode_rank_results(encode(r));
    CHECK(back.rank == 3);
    CHECK(back.host == "host-b");
    REQUIRE(back.results.size() == r.results.size());
    for (std::size_t i = 0; i < r.results.size(); ++i) {
        CHECK(back.results[i].key == r.results[i].key);
        CHECK(back.results[i].status == r.results[i].status);
        CHECK(back.results[i].reason == r.results[i].reason);
        CHECK(back.results[i].text == r.results[i].text);
        REQUIRE(back.results[i].figures.size() == r.results[i].figures.size());
        for (std::size_t j = 0; j < r.results[i].figures.size(); ++j) {
            CHECK(back.results[i].figures[j].name == r.results[i].figures[j].name);
            CHECK(back.results[i].figures[j].value == r.results[i].figures[j].value);
            CHECK(back.results[i].figures[j].unit == r.results[i].figures[j].unit);
        }
        REQUIRE(back.results[i].labels.size() == r.results[i].labels.size());
        for (std::size_t j = 0; j < r.results[i].labels.size(); ++j)
            CHECK(back.results[i].labels[j].text == r.results[i].labels[j].text);
    }
    rt::Bytes b = encode(r);
    rt::Bytes short_message(b.begin(), b.end() - 3);
    CHECK_THROWS_AS((void)decode_rank_results(short_message), RuntimeError);
    rt::Bytes longer = b;
    longer.push_back(std::byte{0});
    CHECK_THROWS_AS((void)decode_rank_results(longer), RuntimeError);
    CHECK_THROWS_AS((void)decode_rank_results(rt::Bytes(8, std::byte{7})), RuntimeError);
}

TEST_CASE("profile: one GPU's figures for cluster.toml") {
    auto results = gpu_results({{0, "0000:18:00.0"}}, 800);
    const NodeFigures n = node_figures(results);
    REQUIRE(n.gpus.size() == 1);
    CHECK(n.gpus[0].kind == "NVIDIA H100 80GB HBM3");
    CHECK(n.gpus[0].tflops() == 800);  // bf16
    CHECK(n.gpus[0].tflops_fp32 == 51.5);
    CHECK(!n.gpus[0].tflops_tf32);  // waived: not written
    CHECK(n.gpus[0].mem_bw_gbs == 3012);
    CHECK(!n.intra);  // one GPU: no link inside the node
    CHECK(has_gpu_figures(results));
    CHECK(!has_gpu_figures(cpu_results()));

    // Without bf16, fp16 is the default rate; without any GEMM, no GPU at all.
    GpuFigures g;
    g.tflops_fp16 = 700;
    g.tflops_fp32 = 50;
    CHECK(g.tflops() == 700);
    CHECK_THROWS_AS((void)GpuFigures{}.tflops(), RuntimeError);
    CHECK(node_figures(cpu_results()).gpus.empty());

    // A GEMM rate without the facts or the bandwidth a device needs: said, not made up.
    auto no_facts = results;
    no_facts.erase(no_facts.begin());
    CHECK_THROWS_AS((void)node_figures(no_facts), RuntimeError);
    auto no_bw = results;
    no_bw.erase(no_bw.begin() + 3);
    CHECK_THROWS_AS((void)node_figures(no_bw), RuntimeError);

    // Two GPUs and NCCL with 2 ranks, no peer probe: the link is NCCL's all-reduce busbw at the
    // largest size and sendrecv's smallest time.
    auto two = gpu_results({{0, "a"}, {1, "b"}}, 800);
    two.push_back(ok("nccl.all_reduce", {{"ranks", 2, "ranks"},
                                         {"8B.time_us", 20, "us"},
                                         {"8B.busbw_gbs", 0.0004, "GB/s"},
                                         {"1073741824B.busbw_gbs", 350, "GB/s"},
                                         {"4096B.busbw_gbs", 0.2, "GB/s"}}));
    two.push_back(ok("nccl.sendrecv", {{"ranks", 2, "ranks"}, {"8B.time_us", 9, "us"}, {"32B.time_us", 9.5, "us"}}));
    const NodeFigures nn = node_figures(two);
    REQUIRE(nn.intra);
    CHECK(nn.intra->gbs == 350);
    CHECK(nn.intra->latency_us == 9);
    // Peer copies, when measured, come first: the median over ordered pairs.
    two.push_back(ok("gpu.peer", {{"gpu0-gpu1.gbs", 380, "GB/s"},
                                  {"gpu0-gpu1.latency_us", 3, "us"},
                                  {"gpu1-gpu0.gbs", 390, "GB/s"},
                                  {"gpu1-gpu0.latency_us", 4, "us"}}));
    const NodeFigures peer = node_figures(two);
    REQUIRE(peer.intra);
    CHECK(peer.intra->gbs == 385);
    CHECK(peer.intra->latency_us == 3.5);
}

TEST_CASE("profile: several ranks' results merge into one cluster.toml, one node per host") {
    // Four ranks over the in-process transport, as mpirun's ranks over MPI: host a runs rank 0
    // with two GPUs; host b runs ranks 1 and 2, one GPU each (rank 2's first on the PCI bus);
    // host c has no GPU.
    std::vector<RankResults> sent{
        {0, "a", gpu_results({{0, "0000:18:00.0"}, {1, "0000:2a:00.0"}}, 800)},
        {1, "b", gpu_results({{1, "0000:9a:00.0"}}, 700)},
        {2, "b", gpu_results({{0, "0000:18:00.0"}}, 600)},
        {3, "c", cpu_results()},
    };
    sent[0].results.push_back(ok("gpu.peer", {{"gpu0-gpu1.gbs", 380, "GB/s"},
                                              {"gpu0-gpu1.latency_us", 3, "us"},
                                              {"gpu1-gpu0.gbs", 380, "GB/s"},
                                              {"gpu1-gpu0.latency_us", 3, "us"}}));
    rt::InProcessNetwork net(4, std::chrono::milliseconds(10000));
    const rt::Tag tag{rt::Tag::Kind::report, 0, 0, 0};
    std::vector<std::jthread> ranks;
    for (std::size_t r = 1; r < 4; ++r) ranks.emplace_back([&, r] { net.endpoint(r).send(0, tag, encode(sent[r])); });
    std::vector<RankResults> got{sent[0]};
    for (std::size_t src = 3; src >= 1; --src) got.push_back(decode_rank_results(net.endpoint(0).recv(src, tag)));
    ranks.clear();

    const std::string text = merged_cluster_toml(got, "merged", Meta{});
    const Cluster c = parse_cluster(text, "merged.toml");
    CAPTURE(text);
    CHECK(c.name == "merged");
    REQUIRE(c.nodes.size() == 3);
    CHECK(c.nodes[0].name == "a");
    CHECK(c.nodes[1].name == "b");
    CHECK(c.nodes[2].name == "c");
    REQUIRE(c.devices.size() == 6);
    CHECK(c.devices[0].name == "a.gpu0");
    CHECK(c.devices[0].tflops == 800);
    CHECK(c.devices[1].name == "a.gpu1");
    CHECK(c.devices[1].tflops == 801);
    CHECK(c.devices[0].tflops_for(DType::fp32) == 51.5);
    CHECK(c.devices[0].mem_bw_gbs == 3012);
    CHECK(c.devices[0].mem_gib == doctest::Approx(79.1));
    CHECK(c.devices[0].kind == "NVIDIA H100 80GB HBM3");
    // Host b: the GPU on bus 18 (rank 2's) is gpu0, whatever the ranks' order.
    CHECK(c.devices[2].name == "b.gpu0");
    CHECK(c.devices[2].tflops == 600);
    CHECK(c.devices[3].name == "b.gpu1");
    CHECK(c.devices[3].tflops == 701);
    CHECK(c.devices[4].name == "c.cpu0");
    CHECK(c.devices[4].tflops == doctest::Approx(0.05));
    REQUIRE(c.nodes[0].intra);
    CHECK(c.nodes[0].intra->gbs == 380);
    CHECK(c.nodes[0].intra->latency_us == 3);
    CHECK(!c.nodes[1].intra);  // one GPU per rank, no peer probe: the [network] default
    REQUIRE(c.intra_default);
    REQUIRE(c.nodes[2].intra);
    CHECK(c.nodes[2].intra->gbs == 4);
    REQUIRE(c.inter_default);
    CHECK(text.find("not measured") != std::string::npos);

    // The same GPU measured by two ranks of a host counts once.
    std::vector<RankResults> twice{{0, "a", gpu_results({{0, "0000:18:00.0"}}, 800)},
                                   {1, "a", gpu_results({{0, "0000:18:00.0"}}, 790)}};
    const Cluster once = parse_cluster(merged_cluster_toml(twice, "x", Meta{}), "x.toml");
    REQUIRE(once.devices.size() == 1);
    CHECK(once.devices[0].tflops == 800);
    // A host with neither GPU nor CPU figures, or no ranks at all: an error, not a file.
    CHECK_THROWS_AS((void)merged_cluster_toml({{0, "a", {}}}, "x", Meta{}), RuntimeError);
    CHECK_THROWS_AS((void)merged_cluster_toml({}, "x", Meta{}), RuntimeError);
}

TEST_CASE("round_robin: every pair once, no member twice in a round") {
    for (std::size_t n = 0; n <= 9; ++n) {
        CAPTURE(n);
        const auto rounds = round_robin(n);
        CHECK(rounds.size() == (n < 2 ? 0 : n % 2 == 0 ? n - 1 : n));
        std::set<std::pair<std::size_t, std::size_t>> seen;
        for (const auto& round : rounds) {
            std::set<std::size_t> busy;
            for (const auto& [a, b] : round) {
                CHECK(a < b);
                CHECK(b < n);
                CHECK(busy.insert(a).second);
                CHECK(busy.insert(b).second);
                CHECK(seen.insert({a, b}).second);
            }
        }
        CHECK(seen.size() == n * (n - (n > 0 ? 1 : 0)) / 2);
    }
}

TEST_CASE("links between hosts: the first ranks of every two hosts measure their link, and the merge uses them") {
    rt::InProcessNetwork net(6, std::chrono::milliseconds(10000));
    const std::vector<std::string> hosts{"a", "a", "b", "c", "b", "d"};
    HostLinkSettings s;
    s.bytes = 1 << 16;
    s.latency_rounds = 3;
    s.repeats = 1;
    std::vector<std::vector<HostLink>> got(6);
    {
        std::vector<std::jthread> ranks;
        for (std::size_t r = 0; r < 6; ++r)
            ranks.emplace_back([&, r] { got[r] = measure_host_links(net.endpoint(r), hosts[r], s); });
    }
    for (std::size_t r = 1; r < 6; ++r) CHECK(got[r].empty());
    // Hosts a, b, c, d led by ranks 0, 2, 3, 5: six pairs, each measured once by its smaller rank.
    std::set<std::pair<std::size_t, std::size_t>> pairs;
    for (const HostLink& l : got[0]) {
        CHECK(l.rank_a < l.rank_b);
        CHECK(l.host_a == hosts[l.rank_a]);
        CHECK(l.host_b == hosts[l.rank_b]);
        CHECK(l.latency_us > 0);
        CHECK(l.gbs > 0);
        pairs.insert({l.rank_a, l.rank_b});
    }
    CHECK(got[0].size() == 6);
    CHECK(pairs == std::set<std::pair<std::size_t, std::size_t>>{{0, 2}, {0, 3}, {0, 5}, {2, 3}, {2, 5}, {3, 5}});
    // Each pair becomes a [[link]] between the hosts' nodes.
    const std::vector<RankResults> four{
        {0, "a", cpu_results()}, {2, "b", cpu_results()}, {3, "c", cpu_results()}, {5, "d", cpu_results()}};
    const Cluster measured =
        parse_cluster(merged_cluster_toml(four, "four", Meta{}, inter_node_link(got[0]), node_links(got[0])), "4.toml");
    CHECK(measured.node_overrides.size() == 6);
    for (const HostLink& l : got[0]) {
        const auto a = measured.find_device(l.host_a + ".cpu0"), b = measured.find_device(l.host_b + ".cpu0");
        REQUIRE((a && b));
        CHECK(measured.link(*a, *b).gbs == doctest::Approx(l.gbs).epsilon(1e-3));  // as written: 4 digits
    }
    // The slowest pair sets the inter-node figures.
    const auto inter = inter_node_link({{0, 2, "a", "b", 5.0, 10.0}, {0, 3, "a", "c", 8.0, 4.0}});
    REQUIRE(inter.has_value());
    CHECK(inter->gbs == 4.0);
    CHECK(inter->latency_us == 8.0);
    CHECK(inter->source.find("2 pairs (a - b, a - c)") != std::string::npos);
    CHECK_FALSE(inter_node_link({}).has_value());
    const std::vector<RankResults> ranks{{0, "a", cpu_results()}, {1, "b", cpu_results()}};
    const std::string text = merged_cluster_toml(ranks, "two", Meta{}, inter);
    CAPTURE(text);
    const Cluster c = parse_cluster(text, "two.toml");
    REQUIRE(c.inter_default.has_value());
    CHECK(c.inter_default->gbs == 4.0);
    CHECK(c.inter_default->latency_us == 8.0);
    CHECK(text.find("not measured: a guess (100 Gb/s") == std::string::npos);
    // Alone on one host: nothing to measure.
    rt::InProcessNetwork one(2, std::chrono::milliseconds(10000));
    std::vector<HostLink> none(1);
    {
        std::jthread other([&] { (void)measure_host_links(one.endpoint(1), "a", s); });
        none = measure_host_links(one.endpoint(0), "a", s);
    }
    CHECK(none.empty());
}

namespace {

/// A fake NCCL for `measure_rank_collectives`: rank r takes (r + 1) x (1 us + bytes / 10 GB/s)
/// per collective in every sample; every rank checks that it got the first rank's id.
RankNcclCalls fake_nccl(std::size_t rank, std::string why, std::vector<std::string>& ids) {
    RankNcclCalls calls;
    calls.unavailable = [why] { return why; };
    calls.unique_id = [rank] { return "id-of-rank-" + std::to_string(rank); };
    calls.times = [rank, &ids](Collective, const std::string& id, int, int r, const std::vector<std::size_t>& counts) {
        CHECK(static_cast<std::size_t>(r) == rank);
        ids[rank] = id;
        std::vector<std::vector<double>> out;
        for (std::size_t c : counts)
            out.push_back(std::vector<double>(3, static_cast<double>(rank + 1) * (1e-6 + 4.0 * c / 10e9)));
        return out;
    };
    calls.version = [] { return std::string("2.28.9"); };
    return calls;
}

/// measure_rank_collectives on ids.size() ranks (threads) with the fake; rank 2 gives `why2` as
/// its reason not to take part ("" : it takes part). Every rank's results.
std::vector<std::vector<ProbeResult>> rank_collectives(std::vector<std::string>& ids, const std::string& why2) {
    const std::size_t n = ids.size();
    rt::InProcessNetwork net(n, std::chrono::milliseconds(10000));
    std::vector<std::vector<ProbeResult>> got(n);
    std::vector<std::jthread> ranks;
    for (std::size_t r = 0; r < n; ++r)
        ranks.emplace_back([&, r] {
            got[r] = measure_rank_collectives(net.endpoint(r), fake_nccl(r, r == 2 ? why2 : "", ids), 1 << 20);
        });
    ranks.clear();  // joined
    return got;
}

}  // namespace

TEST_CASE("NCCL between ranks: the first rank's id for all, each sample averaged over the ranks, busbw for all") {
    std::vector<std::string> ids(3);
    const std::vector<std::vector<ProbeResult>> got = rank_collectives(ids, "");
    for (const std::string& id : ids) CHECK(id == "id-of-rank-0");
    CHECK(got[1].empty());
    CHECK(got[2].empty());
    REQUIRE(got[0].size() == 4);
    CHECK(got[0][0].key == "nccl.ranks.all_reduce");
    CHECK(got[0][3].key == "nccl.ranks.sendrecv");
    for (const ProbeResult& r : got[0]) {
        CAPTURE(r.key);
        CHECK(r.status == ProbeResult::Status::ok);
        REQUIRE(r.find("ranks") != nullptr);
        CHECK(r.find("ranks")->value == 3);
    }
    // all_reduce of 1 MiB: mean time over ranks (1 + 2 + 3) / 3 = 2 x (1 us + 1 MiB / 10 GB/s);
    // busbw = algbw x 2 (n - 1) / n.
    const double bytes = 1 << 20, t = 2 * (1e-6 + bytes / 10e9);
    const ProbeResult& ar = got[0][0];
    REQUIRE(ar.find("1048576B.time_us") != nullptr);
    CHECK(ar.find("1048576B.time_us")->value == doctest::Approx(t * 1e6));
    CHECK(ar.find("1048576B.algbw_gbs")->value == doctest::Approx(bytes / t / 1e9));
    CHECK(ar.find("1048576B.busbw_gbs")->value == doctest::Approx(bytes / t / 1e9 * 4.0 / 3.0));
    CHECK(ar.text.find("NCCL 2.28.9, 3 ranks") != std::string::npos);
}

TEST_CASE("NCCL between ranks: a rank without a GPU waives them all, naming it; one rank measures nothing") {
    std::vector<std::string> ids(3);
    const std::vector<std::vector<ProbeResult>> got = rank_collectives(ids, "no CUDA device");
    REQUIRE(got[0].size() == 4);
    for (const ProbeResult& r : got[0]) {
        CHECK(r.status == ProbeResult::Status::waived);
        CHECK(r.reason == "rank 2 cannot join an NCCL communicator: no CUDA device");
    }
    for (const std::string& id : ids) CHECK(id.empty());  // nothing ran
    rt::InProcessNetwork one(1, std::chrono::milliseconds(1000));
    CHECK(measure_rank_collectives(one.endpoint(0), fake_nccl(0, "", ids), 1 << 20).empty());
}
