#include "dpart/profile/rank_nccl.hpp"

#include <fmt/format.h>

#include <numeric>

#include "dpart/core/error.hpp"
#include "dpart/runtime/comm_groups.hpp"

namespace dpart::profile {

RankNcclCalls gpu_rank_nccl(const ProbeSettings& settings) {
    RankNcclCalls calls;
    const auto device = [settings]() -> int {
        if (!gpu::unavailable().empty()) return -1;
        const std::vector<int> gpus = measured_gpus(settings, gpu::device_count());
        return gpus.empty() ? -1 : gpus.front();
    };
    calls.unavailable = [settings, device] {
        if (const std::string why = gpu::unavailable(); !why.empty()) return why;
        if (device() < 0)
            return fmt::format("no GPU falls to this rank (GPUs d with d % {} == {} of {})", settings.gpu_stride,
                               settings.gpu_offset, gpu::device_count());
        return std::string();
    };
    calls.unique_id = [] { return gpu::nccl_unique_id(); };
    const gpu::Timing timing{settings.repeats, 20};
    calls.times = [device, timing](Collective c, const std::string& id, int ranks, int rank,
                                   const std::vector<std::size_t>& counts) {
        return gpu::nccl_rank_times(c, id, ranks, rank, device(), counts, timing).seconds;
    };
    calls.version = [] { return gpu::nccl_times(Collective::all_reduce, {}, {}, {}).version; };
    return calls;
}

namespace {

rt::Tag tag(std::uint32_t what, std::uint32_t index) { return {rt::Tag::Kind::report, 1, what, index}; }

}  // namespace

std::vector<ProbeResult> measure_rank_collectives(rt::Transport& t, const RankNcclCalls& calls, std::size_t max_bytes) {
    const std::size_t n = t.size();
    if (n <= 1) return {};
    std::vector<std::size_t> all(n);
    std::iota(all.begin(), all.end(), std::size_t{0});
    const bool root = t.rank() == 0;
    const std::vector<Collective> collectives{Collective::all_reduce, Collective::all_gather,
                                              Collective::reduce_scatter, Collective::sendrecv};
    std::vector<ProbeResult> out;
    for (Collective c : collectives) {
        ProbeResult r;
        r.key = "nccl.ranks." + to_string(c);
        out.push_back(std::move(r));
    }

    // Can every rank take part? The reasons go to rank 0, which names the first.
    const std::string why = calls.unavailable();
    const std::vector<std::uint8_t> votes = rt::group_vote(t, all, tag(0, 0), why.empty() ? 0 : 1);
    const auto first = std::find(votes.begin(), votes.end(), std::uint8_t{1});
    if (first != votes.end()) {
        const auto who = static_cast<std::size_t>(first - votes.begin());
        if (t.rank() == who && !root) t.send(0, tag(1, 0), rt::Bytes(reinterpret_cast<const std::byte*>(why.data()),
                                                                      reinterpret_cast<const std::byte*>(why.data() + why.size())));
        if (!root) return {};
        std::string reason = why;
        if (who != 0) {
            const rt::Bytes b = t.recv(who, tag(1, 0));
            reason.assign(reinterpret_cast<const char*>(b.data()), b.size());
        }
        for (ProbeResult& r : out) {
            r.status = ProbeResult::Status::waived;
            r.reason = fmt::format("rank {} cannot join an NCCL communicator: {}", who, reason);
        }
        return out;
    }

    const int ranks = static_cast<int>(n), rank = static_cast<int>(t.rank());
    for (std::size_t k = 0; k < collectives.size(); ++k) {
        const Collective c = collectives[k];
        const CollectiveSizes plan = collective_plan(c, max_bytes, ranks);
        const rt::Bytes id = rt::share_from_root(t, all, tag(2, static_cast<std::uint32_t>(k)), [&] {
            const std::string s = calls.unique_id();
            return rt::Bytes(reinterpret_cast<const std::byte*>(s.data()), reinterpret_cast<const std::byte*>(s.data() + s.size()));
        });
        std::vector<std::vector<double>> mine =
            calls.times(c, std::string(reinterpret_cast<const char*>(id.data()), id.size()), ranks, rank, plan.counts);
        if (mine.size() != plan.counts.size())
            throw RuntimeError(fmt::format("{}: {} sizes timed, {} asked", out[k].key, mine.size(), plan.counts.size()));
        // Each rank's samples to rank 0: per size, the number of samples, then the samples.
        rt::Bytes msg;
        for (const auto& samples : mine) {
            rt::append_value(msg, static_cast<std::uint64_t>(samples.size()));
            rt::append(msg, std::span<const double>(samples));
        }
        if (!root) {
            t.send(0, tag(3, static_cast<std::uint32_t>(k)), std::move(msg));
            continue;
        }
        // nccl-tests' default: each sample's time averaged over the ranks; the median over samples.
        std::vector<std::vector<double>> sum = mine;
        for (std::size_t src = 1; src < n; ++src) {
            const rt::Bytes b = t.recv(src, tag(3, static_cast<std::uint32_t>(k)));
            rt::Reader in(b);
            for (auto& samples : sum) {
                const auto count = in.value<std::uint64_t>();
                if (count != samples.size())
                    throw RuntimeError(fmt::format("{}: rank {} timed {} samples of a size, rank 0 {}", out[k].key, src,
                                                   count, samples.size()));
                std::vector<double> theirs(count);
                in.read_into(std::span<double>(theirs));
                for (std::size_t i = 0; i < count; ++i) samples[i] += theirs[i];
            }
            if (!in.done()) throw RuntimeError(fmt::format("{}: rank {} sent more than asked", out[k].key, src));
        }
        std::vector<CollectivePoint> points;
        for (std::size_t i = 0; i < plan.bytes.size(); ++i) {
            for (double& s : sum[i]) s /= static_cast<double>(n);
            points.push_back(collective_point(c, plan.bytes[i], ranks, stats_of(sum[i]).median));
        }
        add_collective_figures(out[k], c, ranks, points, calls.version());
        out[k].text += " (one per MPI rank; each sample's time averaged over the ranks)";
    }
    if (!root) return {};
    return out;
}

}  // namespace dpart::profile
