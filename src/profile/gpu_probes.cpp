// The GPU and NCCL probes: what each measures, at which size, and how its timings become
// figures. The timings come from dpart/profile/gpu_measure.hpp (CUDA, or a stand-in that
// makes every probe here waived).
#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "dpart/profile/gpu.hpp"
#include "dpart/runtime/gpu_info.hpp"

namespace dpart::profile {
namespace {

std::size_t scaled(std::size_t base, double scale, std::size_t least) {
    return std::max(least, static_cast<std::size_t>(static_cast<double>(base) * scale));
}

/// The GPUs to measure, or a waiver that says why there are none.
std::vector<int> gpus_or_waive(const ProbeSettings& st) {
    const std::string why = gpu::unavailable();
    if (!why.empty()) throw Waived{why};
    const std::vector<int> gpus = measured_gpus(st, gpu::device_count());
    if (gpus.empty())
        throw Waived{fmt::format("no GPU falls to this process (GPUs d with d % {} == {} of {})", st.gpu_stride,
                                 st.gpu_offset, gpu::device_count())};
    return gpus;
}

std::string dev(int d, const char* figure) { return fmt::format("gpu{}.{}", d, figure); }

std::string gemm_name(gpu::GemmType t) {
    switch (t) {
        case gpu::GemmType::fp32: return "fp32";
        case gpu::GemmType::tf32: return "tf32";
        case gpu::GemmType::bf16: return "bf16";
        case gpu::GemmType::fp16: return "fp16";
    }
    return "?";
}

Probe gemm_probe(gpu::GemmType type, const ProbeSettings& st) {
    // 8192^3 fills an H100 (132 SMs); sizes stay multiples of 64 (tensor-core tiles).
    const int n = static_cast<int>(scaled(8192, st.scale, 256) / 64 * 64);
    const std::string name = gemm_name(type);
    const char* how = type == gpu::GemmType::fp32   ? "fp32 data and accumulation (CUBLAS_COMPUTE_32F)"
                      : type == gpu::GemmType::tf32 ? "fp32 data, TF32 tensor cores (CUBLAS_COMPUTE_32F_FAST_TF32)"
                                                    : "16-bit A, B and C, fp32 accumulation";
    return {"gpu.gemm_" + name, fmt::format("{} GEMM {}^3 through cublasGemmEx, {}: TFLOP/s = 2n^3/t", name, n, how),
            [=] {
                ProbeResult r;
                // fp32 runs at a tenth of the tensor-core rates: fewer products per sample.
                const gpu::Timing timing{st.repeats, type == gpu::GemmType::fp32 ? 3 : 10};
                for (int d : gpus_or_waive(st)) {
                    const Stats s = stats_of(gpu::gemm_times(d, type, n, timing));
                    r.figures.push_back({dev(d, "tflops"), gemm_tflops(n, n, n, s.median), "TFLOP/s"});
                }
                return r;
            }};
}

Probe conv_probe(const ProbeSettings& st) {
    gpu::ConvShape shape;
    shape.n = static_cast<int>(scaled(128, st.scale, 1));
    return {"gpu.conv",
            fmt::format("cuDNN convolution forward, fp16 NHWC, batch {} x {} x {} x {}, {} filters {}x{} (a ResNet "
                        "3x3 layer), the fastest algorithm found: TFLOP/s = 2 N K P Q C R S / t",
                        shape.n, shape.c, shape.h, shape.w, shape.k, shape.r, shape.s),
            [=] {
                ProbeResult r;
                for (int d : gpus_or_waive(st)) {
                    const gpu::ConvTimes c = gpu::conv_times(d, shape, {st.repeats, 20});
                    const Stats s = stats_of(c.seconds);
                    r.figures.push_back({dev(d, "tflops"), conv_tflops(shape, c.out_h, c.out_w, s.median), "TFLOP/s"});
                    r.labels.push_back({dev(d, "algorithm"), c.algorithm});
                }
                return r;
            }};
}

Probe memory_probe(const ProbeSettings& st) {
    const std::size_t bytes = scaled(std::size_t{1} << 30, st.scale, std::size_t{1} << 20);
    return {"gpu.memory_bw",
            fmt::format("device-to-device cudaMemcpy of {} MiB: GB/s copied, and read + written (twice that)",
                        bytes >> 20),
            [=] {
                ProbeResult r;
                for (int d : gpus_or_waive(st)) {
                    const Stats s = stats_of(gpu::copy_times(gpu::CopyKind::d2d, d, d, bytes, {st.repeats, 10}));
                    const double copied = gbs(static_cast<double>(bytes), s.median);
                    r.figures.push_back({dev(d, "gbs_copied"), copied, "GB/s"});
                    r.figures.push_back({dev(d, "gbs_read_written"), 2 * copied, "GB/s"});
                }
                return r;
            }};
}

Probe host_copy_probe(gpu::CopyKind kind, const ProbeSettings& st) {
    const std::size_t bytes = scaled(std::size_t{1} << 30, st.scale, std::size_t{1} << 20);
    const bool h2d = kind == gpu::CopyKind::h2d_pinned || kind == gpu::CopyKind::h2d_pageable;
    const bool pinned = kind == gpu::CopyKind::h2d_pinned || kind == gpu::CopyKind::d2h_pinned;
    const std::string key = fmt::format("gpu.{}_{}", h2d ? "h2d" : "d2h", pinned ? "pinned" : "pageable");
    const std::string what =
        pinned ? "cudaHostAlloc'ed memory, event-timed behind a blocked stream"
               : "ordinary (malloc'ed, touched) memory, host-timed around synchronous cudaMemcpy";
    return {key,
            fmt::format("{} copy of {} MiB, {}: GB/s", h2d ? "host-to-device" : "device-to-host", bytes >> 20, what),
            [=] {
                ProbeResult r;
                for (int d : gpus_or_waive(st)) {
                    const Stats s = stats_of(gpu::copy_times(kind, d, d, bytes, {st.repeats, pinned ? 4 : 2}));
                    r.figures.push_back({dev(d, "gbs"), gbs(static_cast<double>(bytes), s.median), "GB/s"});
                }
                return r;
            }};
}

Probe peer_probe(const ProbeSettings& st) {
    const std::size_t bytes = scaled(std::size_t{256} << 20, st.scale, std::size_t{1} << 20);
    return {"gpu.peer",
            fmt::format("device-to-device matrix: cudaMemcpyPeer of {} MiB (GB/s) and of 4 bytes (latency, us) for "
                        "every ordered pair, with peer access where the pair has it",
                        bytes >> 20),
            [=] {
                const std::vector<int> gpus = gpus_or_waive(st);
                if (gpus.size() < 2)
                    throw Waived{fmt::format("{} GPU in this process: a matrix needs 2 or more", gpus.size())};
                ProbeResult r;
                for (int a : gpus)
                    for (int b : gpus) {
                        if (a == b) continue;
                        const std::string pair = fmt::format("gpu{}-gpu{}", a, b);
                        const Stats s = stats_of(gpu::copy_times(gpu::CopyKind::peer, a, b, bytes, {st.repeats, 4}));
                        const Stats l =
                            stats_of(gpu::copy_latencies(gpu::CopyKind::peer, a, b, 4, {st.repeats, 200}));
                        r.figures.push_back({pair + ".gbs", gbs(static_cast<double>(bytes), s.median), "GB/s"});
                        r.figures.push_back({pair + ".latency_us", l.median * 1e6, "us"});
                        r.figures.push_back({pair + ".peer_access", gpu::can_access_peer(a, b) ? 1.0 : 0.0, "bool"});
                    }
                return r;
            }};
}

Probe latency_probe(const ProbeSettings& st) {
    return {"gpu.latency",
            "4-byte copies device-to-device, host-to-device and device-to-host (pinned): host wall time of "
            "cudaMemcpyAsync + cudaStreamSynchronize, us",
            [=] {
                ProbeResult r;
                const gpu::Timing timing{st.repeats, 1000};
                for (int d : gpus_or_waive(st)) {
                    for (auto [kind, name] : {std::pair{gpu::CopyKind::d2d, "d2d_us"},
                                              std::pair{gpu::CopyKind::h2d_pinned, "h2d_us"},
                                              std::pair{gpu::CopyKind::d2h_pinned, "d2h_us"}}) {
                        const Stats s = stats_of(gpu::copy_latencies(kind, d, d, 4, timing));
                        r.figures.push_back({dev(d, name), s.median * 1e6, "us"});
                    }
                }
                return r;
            }};
}

}  // namespace

CollectiveSizes collective_plan(Collective c, std::size_t max_bytes, int ranks) {
    const std::size_t elem = sizeof(float);
    CollectiveSizes plan;
    for (std::size_t b : collective_sizes(8, max_bytes, 4)) {
        const std::size_t count = collective_count(c, b, ranks, elem);
        if (count == 0) continue;  // nccl-tests skips what the ranks cannot divide
        if (!plan.counts.empty() && plan.counts.back() == count) continue;
        plan.counts.push_back(count);
        plan.bytes.push_back(collective_bytes(c, count, ranks, elem));
    }
    return plan;
}

void add_collective_figures(ProbeResult& r, Collective c, int ranks, const std::vector<CollectivePoint>& points,
                            const std::string& version) {
    r.figures.push_back({"ranks", static_cast<double>(ranks), "ranks"});
    double algbw = 0, busbw = 0;
    for (const CollectivePoint& p : points) {
        algbw = std::max(algbw, p.algbw_gbs);
        busbw = std::max(busbw, p.busbw_gbs);
    }
    r.figures.push_back({"algbw_gbs_peak", algbw, "GB/s"});
    r.figures.push_back({"busbw_gbs_peak", busbw, "GB/s"});
    for (const CollectivePoint& p : points) {
        r.figures.push_back({fmt::format("{}B.time_us", p.bytes), p.seconds * 1e6, "us"});
        r.figures.push_back({fmt::format("{}B.algbw_gbs", p.bytes), p.algbw_gbs, "GB/s"});
        r.figures.push_back({fmt::format("{}B.busbw_gbs", p.bytes), p.busbw_gbs, "GB/s"});
    }
    r.text = fmt::format("NCCL {}, {} rank{}", version, ranks, ranks == 1 ? "" : "s");
    if (busbw_factor(c, ranks) == 0)
        r.text += fmt::format(": busbw is 0 by nccl-tests' definition ({}(n-1)/n with n = 1); algbw is the figure",
                              c == Collective::all_reduce ? "2" : "");
}

namespace {

Probe nccl_probe(Collective c, const ProbeSettings& st) {
    const std::size_t max_bytes = scaled(std::size_t{1} << 30, st.scale, 1024);
    const std::string name = to_string(c);
    return {"nccl." + name,
            fmt::format("NCCL {} over this process's GPUs (one communicator each, ncclCommInitAll), float data, "
                        "8 B to {} MiB by x4: time, algbw and busbw as nccl-tests defines them",
                        name, max_bytes >> 20),
            [=] {
                const std::vector<int> gpus = gpus_or_waive(st);
                const int ranks = static_cast<int>(gpus.size());
                const CollectiveSizes plan = collective_plan(c, max_bytes, ranks);
                const gpu::NcclTimes t = gpu::nccl_times(c, gpus, plan.counts, {st.repeats, 20});
                ProbeResult r;
                std::vector<CollectivePoint> points;
                for (std::size_t i = 0; i < plan.bytes.size(); ++i)
                    points.push_back(collective_point(c, plan.bytes[i], ranks, stats_of(t.seconds[i]).median));
                add_collective_figures(r, c, ranks, points, t.version);
                return r;
            }};
}

}  // namespace

Probe gpu_facts_probe(const ProbeSettings& st) {
    return {"gpu.facts", "CUDA driver and library versions, and each GPU's name, SMs, memory and clocks", [st] {
                const GpuSoftware g = gpu_software();
                if (!g.built_with_cuda) throw Waived{"this dpart was built without CUDA"};
                if (g.devices == 0) throw Waived{fmt::format("no CUDA device visible ({})", g.driver)};
                ProbeResult r;
                r.text = fmt::format("CUDA {}, cuBLAS {}, NCCL {}, cuDNN {}, driver {}", g.cuda, g.cublas,
                                     g.nccl_loaded, g.cudnn_loaded, g.driver);
                r.labels.push_back({"versions", r.text});
                r.figures = {{"devices", static_cast<double>(g.devices), "GPUs"}};
                for (int d : measured_gpus(st, g.devices)) {
                    const gpu::DeviceFacts f = gpu::device_facts(d);
                    r.labels.push_back({dev(d, "name"), f.name});
                    r.labels.push_back({dev(d, "pci_bus"), f.pci_bus});
                    r.figures.push_back({dev(d, "sms"), static_cast<double>(f.sms), "SMs"});
                    r.figures.push_back({dev(d, "compute_capability"), f.cc_major + f.cc_minor / 10.0, ""});
                    r.figures.push_back({dev(d, "mem_gib"), f.mem_gib, "GiB"});
                    r.figures.push_back({dev(d, "l2_mib"), f.l2_mib, "MiB"});
                    r.figures.push_back({dev(d, "sm_clock_mhz"), f.sm_clock_mhz, "MHz"});
                    r.figures.push_back({dev(d, "mem_clock_mhz"), f.mem_clock_mhz, "MHz"});
                    r.figures.push_back({dev(d, "mem_bus_bits"), static_cast<double>(f.mem_bus_bits), "bits"});
                }
                return r;
            }};
}

std::vector<Probe> gpu_probes(const ProbeSettings& st) {
    std::vector<Probe> p;
    for (gpu::GemmType t : {gpu::GemmType::fp32, gpu::GemmType::tf32, gpu::GemmType::bf16, gpu::GemmType::fp16})
        p.push_back(gemm_probe(t, st));
    p.push_back(conv_probe(st));
    p.push_back(memory_probe(st));
    for (gpu::CopyKind k : {gpu::CopyKind::h2d_pinned, gpu::CopyKind::d2h_pinned, gpu::CopyKind::h2d_pageable,
                            gpu::CopyKind::d2h_pageable})
        p.push_back(host_copy_probe(k, st));
    p.push_back(peer_probe(st));
    p.push_back(latency_probe(st));
    for (Collective c : {Collective::all_reduce, Collective::all_gather, Collective::reduce_scatter,
                         Collective::sendrecv})
        p.push_back(nccl_probe(c, st));
    return p;
}

}  // namespace dpart::profile
