// CPU probes: facts, single-precision GEMM through OpenBLAS, and memory bandwidth, each on
// one core alone and on every core at once (the figure a worker per core sees).
#include <cblas.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <exception>
#include <thread>
#include <vector>

#include "dpart/core/cores.hpp"
#include "dpart/profile/layers.hpp"
#include "dpart/profile/probe.hpp"
#include "dpart/runtime/backend.hpp"
#include "dpart/runtime/transport.hpp"

namespace dpart::profile {
namespace {

std::string cpu_model_name() {
    std::ifstream in("/proc/cpuinfo");
    std::string line;
    while (std::getline(in, line))
        if (line.starts_with("model name")) {
            const auto colon = line.find(':');
            if (colon != std::string::npos) return line.substr(line.find_first_not_of(' ', colon + 1));
        }
    return "unknown CPU";
}

unsigned cores() { return static_cast<unsigned>(usable_cores()); }

ProbeResult facts() {
    ProbeResult r;
    r.text = cpu_model_name();
    const double pages = static_cast<double>(sysconf(_SC_PHYS_PAGES));
    const double page = static_cast<double>(sysconf(_SC_PAGESIZE));
    r.figures = {{"cores", static_cast<double>(cores()), "cores"}, {"memory_gib", pages * page / (1ull << 30), "GiB"}};
    return r;
}

/// Runs `work(thread)` on `threads` threads at once; returns the median wall time.
double timed_on(unsigned threads, int repeats, const std::function<void(unsigned)>& work) {
    return median_seconds(repeats, [&] {
        std::vector<std::jthread> pool;
        for (unsigned t = 0; t < threads; ++t) pool.emplace_back([&, t] { work(t); });
    });
}

/// GFLOP/s per core of the three products of a linear layer's training step on n x n matrices
/// (forward y = x W^T, backward dx = dy W and dW = dy^T x: the transposes training uses, not
/// only the fastest one), on `threads` cores at once, each with its own matrices.
double gemm_gflops(unsigned threads, std::size_t n, int repeats) {
    rt::prepare_cpu_workers();
    const int d = static_cast<int>(n);
    std::vector<std::vector<float>> a(threads, std::vector<float>(n * n, 0.5f)), b = a, c = a;
    const double s = timed_on(threads, repeats, [&](unsigned t) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, d, d, d, 1.0f, a[t].data(), d, b[t].data(), d, 0.0f,
                    c[t].data(), d);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, d, d, d, 1.0f, a[t].data(), d, b[t].data(), d, 0.0f,
                    c[t].data(), d);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, d, d, d, 1.0f, a[t].data(), d, b[t].data(), d, 1.0f,
                    c[t].data(), d);
    });
    return 3 * 2.0 * static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(n) / s / 1e9;
}

/// GB/s per core (bytes read + written) of a copy of `bytes`, on `threads` cores at once.
double copy_gbs(unsigned threads, std::size_t bytes, int repeats) {
    std::vector<std::vector<char>> src(threads, std::vector<char>(bytes, 1)), dst = src;
    const double s = timed_on(threads, repeats, [&](unsigned t) { std::memcpy(dst[t].data(), src[t].data(), bytes); });
    return 2.0 * static_cast<double>(bytes) / s / 1e9;
}

/// One-way latency (us) and bandwidth (GB/s) between two workers of this process: a ping-pong
/// over the in-process transport dpart run uses, with 1-byte and `bytes` messages. Each side
/// handles a message as a worker does: it writes it from its tensor (a copy) and reads it into
/// its tensor (another copy).
std::pair<double, double> transport_link(std::size_t bytes, int repeats) {
    rt::prepare_cpu_workers();  // messages reuse freed pages, as a run's do
    rt::InProcessNetwork net(2, std::chrono::milliseconds(60000));
    auto pingpong = [&](std::size_t size, int rounds) {
        return median_seconds(repeats, [&] {
            // An exception may not leave a thread (std::terminate): the echo's is rethrown here.
            std::exception_ptr echo_error;
            std::jthread echo([&] {
                try {
                    std::vector<std::byte> tensor;
                    for (int i = 0; i < rounds; ++i) {
                        const rt::Bytes in = net.endpoint(1).recv(0, {});
                        tensor.assign(in.begin(), in.end());
                        net.endpoint(1).send(0, {}, rt::Bytes(tensor.begin(), tensor.end()));
                    }
                } catch (...) {
                    echo_error = std::current_exception();
                }
            });
            // Written and read as a worker's messages are: an untouched allocation would cost
            // nothing and measure no bandwidth.
            std::vector<std::byte> tensor(size, std::byte{1});
            for (int i = 0; i < rounds; ++i) {
                net.endpoint(0).send(1, {}, rt::Bytes(tensor.begin(), tensor.end()));
                const rt::Bytes in = net.endpoint(0).recv(1, {});
                std::copy(in.begin(), in.end(), tensor.begin());
            }
            echo.join();
            if (echo_error) std::rethrow_exception(echo_error);
        }) / (2.0 * rounds);
    };
    const double latency = pingpong(1, 1000);
    const double big = pingpong(bytes, 4);
    return {latency * 1e6, static_cast<double>(bytes) / std::max(1e-12, big - latency) / 1e9};
}

std::size_t scaled(std::size_t base, double scale, std::size_t least) {
    return std::max(least, static_cast<std::size_t>(static_cast<double>(base) * scale));
}

}  // namespace

std::string cpu_kind() { return cpu_model_name(); }

std::vector<Probe> cpu_probes(const ProbeSettings& st) {
    const std::size_t n = scaled(1024, st.scale, 64);
    const std::size_t bytes = scaled(std::size_t{256} << 20, st.scale, std::size_t{1} << 20);
    return {
        {"cpu.facts", "CPU model, core count and memory", facts},
        {"cpu.gemm_fp32",
         fmt::format("fp32 GEMM {}^3 through OpenBLAS (a training step's three transposes) on one core, then on every "
                     "core at once",
                     n),
         [=] {
             ProbeResult r;
             r.figures = {{"gflops_one_core", gemm_gflops(1, n, st.repeats), "GFLOP/s"},
                          {"gflops_per_core_all_busy", gemm_gflops(cores(), n, st.repeats), "GFLOP/s"}};
             return r;
         }},
        {"cpu.memory_bw", fmt::format("memory copy of {} MiB (read + written) on one core, then on every core at once",
                                      bytes >> 20),
         [=] {
             ProbeResult r;
             r.figures = {{"gbs_one_core", copy_gbs(1, bytes, st.repeats), "GB/s"},
                          {"gbs_per_core_all_busy", copy_gbs(cores(), bytes, st.repeats), "GB/s"}};
             return r;
         }},
        {"cpu.worker_link", "latency and bandwidth between two workers of dpart run (in-process ping-pong)",
         [=] {
             // 16 MiB messages (at scale 1): a large activation, or a stage's gradients.
             const auto [latency_us, gbs] = transport_link(bytes / 16, st.repeats);
             ProbeResult r;
             r.figures = {{"latency_us", latency_us, "us"}, {"gbs", gbs, "GB/s"}};
             return r;
         }},
    };
}

}  // namespace dpart::profile
