// The CUDA backend's CPU-side logic, tested without a GPU: green-context partitions read from a
// cluster file and cut into cuDevSmResourceSplitByCount calls, what a slowdown leaves of a
// partition, the device-memory arena, the communicators a plan needs, the NCCL unique id shared
// over a (fake) bootstrap transport, ncclCommShrink's exclusion list, and the bounded wait that
// keeps a stream waiting on a failed peer's transfer from hanging the host.
#include <doctest/doctest.h>

#include <thread>

#include "dpart/io/cluster_toml.hpp"
#include "dpart/runtime/arena.hpp"
#include "dpart/runtime/bounded_wait.hpp"
#include "dpart/runtime/comm_groups.hpp"
#include "dpart/runtime/sm_partition.hpp"

using namespace dpart;
using namespace dpart::rt;

namespace {

const std::string head = R"([cluster]
name = "one-h100"
[network]
intra_node_gbs = 1500.0
intra_node_latency_us = 4.4
)";

std::string partition(const std::string& name, unsigned sm, const std::string& extra = "") {
    return "[[device]]\nname = \"" + name + "\"\nnode = \"h100\"\ntflops = " + std::to_string(sm * 6) +
           "\nmem_gib = 19.0\nmem_bw_gbs = 700.0\ngpu_sms = 132\nsm = " + std::to_string(sm) + "\n" + extra;
}

std::string error_of(const std::string& text) {
    try {
        (void)parse_cluster(text, "c.toml");
    } catch (const InputError& e) {
        return e.what();
    }
    return "no error";
}

}  // namespace

TEST_CASE("a cluster file describes green-context partitions of one GPU") {
    const Cluster c = parse_cluster(head + partition("p0", 64) + partition("p1", 32) + partition("p2", 32), "c.toml");
    REQUIRE(c.devices.size() == 3);
    REQUIRE(c.devices[0].partition.has_value());
    CHECK(c.devices[0].partition->sm == 64);
    CHECK(c.devices[0].partition->gpu_sms == 132);
    CHECK(c.devices[0].partition->gpu == 0);
    const auto layouts = gpu_layouts(c);
    REQUIRE(layouts.size() == 1);
    CHECK(layouts[0].devices == std::vector<std::size_t>{0, 1, 2});
    CHECK(layouts[0].used_sms() == 128);
    CHECK(split_steps(layouts[0].sms) == std::vector<SplitStep>{{64, 1}, {32, 2}});
}

TEST_CASE("devices without sm are whole devices, in no layout") {
    const Cluster c = parse_cluster(head + R"([[device]]
name = "gpu0"
node = "h100"
tflops = 790.0
mem_gib = 80.0
mem_bw_gbs = 3000.0
)", "c.toml");
    CHECK_FALSE(c.devices[0].partition.has_value());
    CHECK(gpu_layouts(c).empty());
}

TEST_CASE("bad partitions are refused at their line") {
    CHECK(error_of(head + partition("p0", 36)) ==
          "c.toml:13:6: device \"p0\": sm 36 is not a multiple of 8 (green contexts split a GPU in steps of 8 SMs on "
          "Hopper; set sm_granularity for another GPU)");
    CHECK(error_of(head + partition("p0", 36, "sm_granularity = 2\n")) == "no error");
    CHECK(error_of(head + partition("p0", 136)).find("sm 136 exceeds the GPU's gpu_sms 132") != std::string::npos);
    CHECK(error_of(head + partition("p0", 64) + partition("p1", 64) + partition("p2", 8)) ==
          "c.toml:22:1: device \"p2\": the partitions of GPU 0 of node \"h100\" take 136 SMs up to here, more than "
          "its 132");
    CHECK(error_of(head + partition("p0", 64) + partition("p1", 64, "gpu = 1\n") + partition("p2", 8)) == "no error");
    CHECK(error_of(head + "[[device]]\nname = \"p0\"\nnode = \"h100\"\ntflops = 1.0\nmem_gib = 1.0\nmem_bw_gbs = 1.0\n"
                          "sm = 32\n")
              .find("missing required key \"gpu_sms\"") != std::string::npos);
    CHECK(error_of(head + "[[device]]\nname = \"p0\"\nnode = \"h100\"\ntflops = 1.0\nmem_gib = 1.0\nmem_bw_gbs = 1.0\n"
                          "gpu_sms = 132\n")
              .find("\"gpu_sms\" describes a GPU partition: give \"sm\" too") != std::string::npos);
    std::string differ = partition("p1", 32);
    differ.replace(differ.find("gpu_sms = 132"), 13, "gpu_sms = 128");
    CHECK(error_of(head + partition("p0", 32) + differ).find("gpu_sms 128 differs from 132 given by \"p0\"") !=
          std::string::npos);
}

TEST_CASE("a layout is checked against the GPU the runtime finds") {
    const Cluster c = parse_cluster(head + partition("p0", 64) + partition("p1", 64), "c.toml");
    const GpuLayout layout = gpu_layouts(c).at(0);
    CHECK_NOTHROW(check_layout_fits(layout, {132, 9, 0, "H100"}, c));
    CHECK_THROWS_WITH_AS(check_layout_fits(layout, {114, 9, 0, "H100 PCIe"}, c),
                         "c.toml:6:1: the partitions of GPU 0 of node \"h100\" take 128 SMs, but that GPU (H100 PCIe) "
                         "has 114",
                         InputError);
    const Cluster odd = parse_cluster(head + partition("p0", 6, "sm_granularity = 2\n"), "c.toml");
    CHECK_THROWS_WITH_AS(check_layout_fits(gpu_layouts(odd).at(0), {132, 9, 0, "H100"}, odd),
                         "c.toml:6:1: device \"p0\": 6 SMs is not a multiple of 8, the partition step of GPU 0 (H100, "
                         "compute capability 9.0)",
                         InputError);
    CHECK_NOTHROW(check_layout_fits(gpu_layouts(odd).at(0), {108, 8, 0, "A100"}, odd));
    CHECK(sm_granularity(9) == 8);
    CHECK(sm_granularity(8) == 2);
}

TEST_CASE("a slowdown shrinks a partition to whole steps, never below one") {
    CHECK(shrunk_sms(32, 2.0, 8) == 16);
    CHECK(shrunk_sms(32, 3.0, 8) == 8);   // 10.7 -> 8
    CHECK(shrunk_sms(32, 10.0, 8) == 8);  // never below one step
    CHECK(shrunk_sms(64, 1.5, 8) == 40);  // 42.7 -> 40
    CHECK(shrunk_sms(32, 1.0, 8) == 32);
    CHECK(shrunk_sms(32, 0.5, 8) == 32);  // no growth
    CHECK(partition_slowdown(32, 8) == doctest::Approx(4.0));
    CHECK(partition_slowdown(64, 40) == doctest::Approx(1.6));
}

TEST_CASE("a resized partition's compute scales with its SMs; its bandwidth stops at the GPU's") {
    const Cluster c = parse_cluster(head + partition("p0", 32, "tflops_bf16 = 190.0\n"), "c.toml");
    const Device half = resized_partition(c.devices[0], 16);
    CHECK(half.partition->sm == 16);
    CHECK(half.tflops == doctest::Approx(96.0));
    CHECK(*half.tflops_by_dtype[static_cast<std::size_t>(DType::bf16)] == doctest::Approx(95.0));
    CHECK(half.mem_bw_gbs == doctest::Approx(350.0));
    const Device whole = resized_partition(c.devices[0], 132);
    CHECK(whole.mem_bw_gbs == doctest::Approx(700.0 * 132 / 32));
}

TEST_CASE("the arena never overlaps buffers that are live together") {
    const std::vector<BufferRequest> reqs{
        {"weights", 1000, 0, 9}, {"act0", 600, 0, 5}, {"act1", 600, 1, 6}, {"tmp", 300, 2, 2},
        {"tmp2", 300, 3, 3},     {"grad", 1000, 6, 9}, {"late", 600, 7, 9}};
    const ArenaPlan plan = plan_arena(reqs, 256);
    CHECK(arena_is_valid(reqs, plan));
    for (std::uint64_t off : plan.offsets) CHECK(off % 256 == 0);
    // tmp and tmp2 never live together, nor act0/act1 with grad/late: memory is reused.
    CHECK(plan.offsets[3] == plan.offsets[4]);
    std::uint64_t sum = 0;
    for (const auto& r : reqs) sum += (r.bytes + 255) / 256 * 256;
    CHECK(plan.total < sum);
    CHECK(plan.total >= plan.peak_live);
    CHECK(plan.peak_live == 1024 + 768 + 768 + 512);  // weights, act0, act1, one tmp
    CHECK(plan.total <= plan.peak_live + 512);  // greedy by size: within one small buffer of the bound
    // The same requests give the same plan.
    CHECK(plan_arena(reqs, 256).offsets == plan.offsets);
}

TEST_CASE("arena input errors and an overlap detector that detects") {
    CHECK_THROWS_WITH_AS((void)plan_arena(std::vector<BufferRequest>{{"x", 8, 3, 2}}),
                         "buffer \"x\" ends (step 2) before it starts (step 3)", InputError);
    CHECK_THROWS_WITH_AS((void)plan_arena(std::vector<BufferRequest>{{"x", 8, 0, 0}}, 48),
                         "arena alignment 48 is not a power of two", InputError);
    CHECK_THROWS_AS((void)plan_arena(std::vector<BufferRequest>{{"a", ~0ull - 10, 0, 1}, {"b", ~0ull - 10, 0, 1}}),
                    InputError);
    const std::vector<BufferRequest> reqs{{"a", 100, 0, 1}, {"b", 100, 1, 2}};
    ArenaPlan bad{{0, 50}, 150, 200};
    CHECK_FALSE(arena_is_valid(reqs, bad));
    CHECK(plan_arena(std::vector<BufferRequest>{}).total == 0);
}

TEST_CASE("the communicators of a plan with pipeline, data and tensor parallelism") {
    Plan p;
    Stage s0;
    s0.first_layer = 0;
    s0.last_layer = 3;
    s0.devices = {0, 1, 2, 3};
    s0.tp = 2;  // 2 replicas x tp 2: ranks 0..3
    Stage s1;
    s1.first_layer = 4;
    s1.last_layer = 7;
    s1.devices = {4, 5};
    s1.tp = 1;  // 2 replicas: ranks 4, 5
    p.stages = {s0, s1};
    const CommGroups g = comm_groups(p);
    CHECK(g.tensor_parallel == std::vector<std::vector<std::size_t>>{{0, 1}, {2, 3}});
    CHECK(g.data_parallel == std::vector<std::vector<std::size_t>>{{0, 2}, {1, 3}, {4, 5}});
    CHECK(g.pipeline == std::vector<std::vector<std::size_t>>{{0, 1, 2, 3, 4, 5}});
}

TEST_CASE("an NCCL unique id reaches every rank of its group over the bootstrap transport") {
    InProcessNetwork net(4, std::chrono::milliseconds(5000));
    const std::vector<std::size_t> group{1, 2, 3};  // rank 0 is not in the communicator
    std::vector<Bytes> got(4);
    int made = 0;
    std::vector<std::thread> threads;
    for (std::size_t r = 1; r < 4; ++r)
        threads.emplace_back([&, r] {
            got[r] = share_from_root(net.endpoint(r), group, Tag{Tag::Kind::control, 0, 0, 7}, [&] {
                ++made;  // only the root makes it
                Bytes id(128);
                for (std::size_t i = 0; i < id.size(); ++i) id[i] = static_cast<std::byte>(i * 7 + 3);
                return id;
            });
        });
    for (auto& t : threads) t.join();
    CHECK(made == 1);
    REQUIRE(got[1].size() == 128);
    CHECK(got[2] == got[1]);
    CHECK(got[3] == got[1]);
    CHECK(static_cast<int>(got[3][5]) == 38);
    CHECK_THROWS_AS((void)share_from_root(net.endpoint(0), group, Tag{}, [] { return Bytes{}; }), RuntimeError);
}

TEST_CASE("ncclCommShrink's exclusion list and the survivors' new ranks") {
    const std::vector<std::size_t> failed{3, 1, 3};
    const Shrink s = shrink_ranks(5, failed);
    CHECK(s.excluded == std::vector<int>{1, 3});
    CHECK(s.new_rank == std::vector<int>{0, -1, 1, -1, 2});
    CHECK_THROWS_WITH_AS((void)shrink_ranks(2, std::vector<std::size_t>{2}),
                         "failed rank 2 is not in a communicator of 2 ranks", InputError);
    CHECK_THROWS_AS((void)shrink_ranks(2, std::vector<std::size_t>{0, 1}), InputError);
}

TEST_CASE("a bounded wait returns once the work is done and gives up with its message after the limit") {
    using namespace std::chrono_literals;
    int calls = 0;
    // Done on the fifth question: four pending answers, then done.
    const auto fifth = [&] { return ++calls >= 5 ? Poll::done : Poll::pending; };
    CHECK(wait_bounded(fifth, 1000ms, [] { return std::string("never"); }) == 5);
    calls = 0;
    CHECK(wait_bounded(fifth, 0ms, [] { return std::string("never"); }) == 5);  // 0: no limit

    // Never done: the message after the limit, not before it.
    const auto start = std::chrono::steady_clock::now();
    std::size_t asked = 0;
    const auto never = [&] {
        ++asked;
        return Poll::pending;
    };
    CHECK_THROWS_WITH_AS(wait_bounded(never, 30ms, [] { return std::string("gpu0: did not finish within 0.03 s"); }),
                         "gpu0: did not finish within 0.03 s", RuntimeError);
    CHECK(std::chrono::steady_clock::now() - start >= 30ms);
    CHECK(asked > 1);

    // An error of the query's own goes through at once.
    CHECK_THROWS_WITH_AS(wait_bounded([]() -> Poll { throw RuntimeError("cudaStreamQuery: illegal address"); }, 1000ms,
                                      [] { return std::string("timeout"); }),
                         "cudaStreamQuery: illegal address", RuntimeError);
}
