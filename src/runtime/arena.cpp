#include "dpart/runtime/arena.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <numeric>

#include "dpart/core/checked.hpp"
#include "dpart/core/error.hpp"

namespace dpart::rt {
namespace {

bool lives_overlap(const BufferRequest& a, const BufferRequest& b) noexcept {
    return a.first <= b.last && b.first <= a.last;
}

std::uint64_t align_up(std::uint64_t v, std::uint64_t alignment) {
    return checked_add(v, alignment - 1) & ~(alignment - 1);
}

}  // namespace

ArenaPlan plan_arena(std::span<const BufferRequest> requests, std::uint64_t alignment) {
    if (alignment == 0 || (alignment & (alignment - 1)) != 0)
        throw InputError(fmt::format("arena alignment {} is not a power of two", alignment));
    for (const BufferRequest& r : requests)
        if (r.last < r.first)
            throw InputError(fmt::format("buffer \"{}\" ends (step {}) before it starts (step {})", r.name, r.last,
                                         r.first));
    ArenaPlan plan;
    plan.offsets.assign(requests.size(), 0);
    std::vector<std::size_t> order(requests.size());
    std::iota(order.begin(), order.end(), std::size_t{0});
    std::stable_sort(order.begin(), order.end(),
                     [&](std::size_t a, std::size_t b) { return requests[a].bytes > requests[b].bytes; });
    try {
        std::vector<std::size_t> placed;
        for (std::size_t i : order) {
            const BufferRequest& r = requests[i];
            const std::uint64_t size = align_up(r.bytes, alignment);
            // The placed buffers live at the same time as r, by offset: r goes in the first gap.
            std::vector<std::pair<std::uint64_t, std::uint64_t>> busy;  // [begin, end)
            for (std::size_t j : placed)
                if (lives_overlap(r, requests[j]))
                    busy.emplace_back(plan.offsets[j], checked_add(plan.offsets[j], align_up(requests[j].bytes, alignment)));
            std::sort(busy.begin(), busy.end());
            std::uint64_t at = 0;
            for (const auto& [begin, end] : busy) {
                if (checked_add(at, size) <= begin) break;
                at = std::max(at, end);
            }
            plan.offsets[i] = at;
            plan.total = std::max(plan.total, checked_add(at, size));
            placed.push_back(i);
        }
        // Peak live bytes: the sum over the buffers live at each step where a buffer starts.
        for (const BufferRequest& r : requests) {
            std::uint64_t live = 0;
            for (const BufferRequest& q : requests)
                if (q.first <= r.first && r.first <= q.last) live = checked_add(live, align_up(q.bytes, alignment));
            plan.peak_live = std::max(plan.peak_live, live);
        }
    } catch (const OverflowError&) {
        throw InputError("the buffers' total size overflows 64 bits");
    }
    return plan;
}

bool arena_is_valid(std::span<const BufferRequest> requests, const ArenaPlan& plan) {
    if (plan.offsets.size() != requests.size()) return false;
    for (std::size_t i = 0; i < requests.size(); ++i) {
        if (plan.offsets[i] + requests[i].bytes > plan.total) return false;
        for (std::size_t j = i + 1; j < requests.size(); ++j) {
            if (!lives_overlap(requests[i], requests[j]) || requests[i].bytes == 0 || requests[j].bytes == 0) continue;
            const bool apart = plan.offsets[i] + requests[i].bytes <= plan.offsets[j] ||
                               plan.offsets[j] + requests[j].bytes <= plan.offsets[i];
            if (!apart) return false;
        }
    }
    return true;
}

}  // namespace dpart::rt
