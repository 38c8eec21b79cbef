#pragma once
// Device memory planning: a worker's buffers, each live over a span of its schedule's steps,
// placed at offsets of one allocation so that buffers live at the same time never overlap and
// the allocation is as small as a greedy placement finds. The CUDA backend allocates the plan's
// total once per worker (no allocation in the steady state, which CUDA graphs need); the plan
// itself is pure and tested without a GPU.
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace dpart::rt {

/// A buffer needed from step `first` to step `last` (inclusive).
struct BufferRequest {
    std::string name;
    std::uint64_t bytes = 0;
    std::uint32_t first = 0;
    std::uint32_t last = 0;
};

struct ArenaPlan {
    std::vector<std::uint64_t> offsets;  ///< per request, in request order
    std::uint64_t total = 0;             ///< bytes of the one allocation
    /// The most bytes live at one step (a lower bound on any placement's total).
    std::uint64_t peak_live = 0;
};

/// Greedy by size (largest first, ties in request order): each buffer goes at the lowest
/// `alignment`-aligned offset where it overlaps no placed buffer live at an overlapping step.
/// Deterministic. Throws InputError when a request has last < first, an alignment is not a
/// power of two, or the total overflows 64 bits.
[[nodiscard]] ArenaPlan plan_arena(std::span<const BufferRequest> requests, std::uint64_t alignment = 256);

/// True when no two requests live at a common step share a byte in `plan` (for tests and checks).
[[nodiscard]] bool arena_is_valid(std::span<const BufferRequest> requests, const ArenaPlan& plan);

}  // namespace dpart::rt
