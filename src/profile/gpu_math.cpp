// The arithmetic of the GPU probes: medians, rates, and nccl-tests' sizes and bus bandwidth.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "dpart/core/error.hpp"
#include "dpart/profile/gpu.hpp"

namespace dpart::profile {

Stats stats_of(std::vector<double> samples) {
    if (samples.empty()) throw RuntimeError("no timed samples");
    for (double s : samples)
        if (!std::isfinite(s) || s < 0) throw RuntimeError(fmt::format("a timed sample is {}", s));
    std::sort(samples.begin(), samples.end());
    Stats st;
    st.n = samples.size();
    st.min = samples.front();
    st.max = samples.back();
    const std::size_t mid = st.n / 2;
    st.median = st.n % 2 == 1 ? samples[mid] : (samples[mid - 1] + samples[mid]) / 2;
    return st;
}

double gemm_tflops(double m, double n, double k, double seconds) { return 2.0 * m * n * k / seconds / 1e12; }

double conv_tflops(const gpu::ConvShape& s, int out_h, int out_w, double seconds) {
    const double flops = 2.0 * s.n * s.k * static_cast<double>(out_h) * out_w * s.c * s.r * s.s;
    return flops / seconds / 1e12;
}

double gbs(double bytes, double seconds) { return bytes / seconds / 1e9; }

std::string to_string(Collective c) {
    switch (c) {
        case Collective::all_reduce: return "all_reduce";
        case Collective::all_gather: return "all_gather";
        case Collective::reduce_scatter: return "reduce_scatter";
        case Collective::sendrecv: return "sendrecv";
    }
    return "?";
}

double busbw_factor(Collective c, int ranks) {
    if (ranks < 1) throw RuntimeError(fmt::format("a collective over {} ranks", ranks));
    const double n = ranks;
    switch (c) {
        case Collective::all_reduce: return 2.0 * (n - 1) / n;
        case Collective::all_gather:
        case Collective::reduce_scatter: return (n - 1) / n;
        case Collective::sendrecv: return 1.0;
    }
    return 0;
}

std::vector<std::size_t> collective_sizes(std::size_t min_bytes, std::size_t max_bytes, std::size_t factor) {
    if (min_bytes == 0 || factor < 2 || max_bytes < min_bytes)
        throw RuntimeError(fmt::format("no sizes from {} to {} by x{}", min_bytes, max_bytes, factor));
    std::vector<std::size_t> out;
    for (std::size_t b = min_bytes; b <= max_bytes; b *= factor) {
        out.push_back(b);
        if (b > max_bytes / factor) break;  // the next one would pass max (or overflow)
    }
    if (out.back() != max_bytes) out.push_back(max_bytes);
    return out;
}

std::size_t collective_count(Collective c, std::size_t bytes, int ranks, std::size_t elem) {
    const std::size_t elements = bytes / elem;
    switch (c) {
        case Collective::all_gather:
        case Collective::reduce_scatter: return elements / static_cast<std::size_t>(ranks);
        case Collective::all_reduce:
        case Collective::sendrecv: return elements;
    }
    return 0;
}

std::size_t collective_bytes(Collective c, std::size_t count, int ranks, std::size_t elem) {
    switch (c) {
        case Collective::all_gather:
        case Collective::reduce_scatter: return count * elem * static_cast<std::size_t>(ranks);
        case Collective::all_reduce:
        case Collective::sendrecv: return count * elem;
    }
    return 0;
}

CollectivePoint collective_point(Collective c, std::size_t bytes, int ranks, double seconds) {
    CollectivePoint p;
    p.bytes = bytes;
    p.seconds = seconds;
    p.algbw_gbs = gbs(static_cast<double>(bytes), seconds);
    p.busbw_gbs = p.algbw_gbs * busbw_factor(c, ranks);
    return p;
}

std::vector<int> measured_gpus(const ProbeSettings& settings, int count) {
    std::vector<int> out;
    const int stride = std::max(1, settings.gpu_stride);
    for (int d = 0; d < count; ++d)
        if (d % stride == settings.gpu_offset) out.push_back(d);
    return out;
}

}  // namespace dpart::profile
