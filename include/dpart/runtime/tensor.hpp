#pragma once
// The runtime's value types: a dense fp32 tensor whose first dimension is the samples of a
// (part of a) microbatch, and the counter-based random numbers that make every run
// reproducible whatever the partition.
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace dpart::rt {

/// Row-major fp32 tensor. shape[0] is the number of samples; the rest is the layer's
/// per-sample shape (graph::Layer::out_shape).
struct Tensor {
    std::vector<std::size_t> shape;
    std::vector<float> data;

    Tensor() = default;
    explicit Tensor(std::vector<std::size_t> s) : shape(std::move(s)), data(count(shape), 0.0f) {}

    [[nodiscard]] std::size_t rows() const noexcept { return shape.empty() ? 0 : shape[0]; }
    /// Elements per sample.
    [[nodiscard]] std::size_t row_size() const noexcept { return rows() == 0 ? 0 : data.size() / rows(); }
    [[nodiscard]] std::size_t size() const noexcept { return data.size(); }
    [[nodiscard]] static std::size_t count(const std::vector<std::size_t>& s) noexcept {
        std::size_t n = 1;
        for (std::size_t d : s) n *= d;
        return s.empty() ? 0 : n;
    }
};

/// splitmix64: the bits of a counter-based generator. Every random number dpart's runtime
/// draws is a pure function of (seed, stream, index), so the same value is drawn whichever
/// worker draws it and in whatever order.
[[nodiscard]] constexpr std::uint64_t mix64(std::uint64_t x) noexcept {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}
[[nodiscard]] constexpr std::uint64_t random_bits(std::uint64_t seed, std::uint64_t stream, std::uint64_t index) noexcept {
    return mix64(mix64(mix64(seed) ^ stream) ^ index);
}
/// Uniform in [0, 1), 24 bits.
[[nodiscard]] constexpr float random_uniform(std::uint64_t seed, std::uint64_t stream, std::uint64_t index) noexcept {
    return static_cast<float>(random_bits(seed, stream, index) >> 40) * (1.0f / 16777216.0f);
}
/// Uniform in [-1, 1).
[[nodiscard]] constexpr float random_symmetric(std::uint64_t seed, std::uint64_t stream, std::uint64_t index) noexcept {
    return 2.0f * random_uniform(seed, stream, index) - 1.0f;
}

/// Streams: what a random number is for. Layer-specific streams add the layer index.
enum class Stream : std::uint64_t { input = 1, label = 2, weight = 3, dropout = 4 };
[[nodiscard]] constexpr std::uint64_t stream_of(Stream s, std::uint64_t layer = 0) noexcept {
    return (static_cast<std::uint64_t>(s) << 48) ^ layer;
}

/// Dropout's probability, and the factor element `index` of layer `layer`'s input gets (index:
/// the sample's global index x its row size + the element's place in the row): 0 or 1 / (1 - p),
/// the same in forward and backward, on every backend.
inline constexpr float dropout_p = 0.1f;
[[nodiscard]] constexpr float dropout_factor(std::uint64_t seed, std::uint64_t layer, std::uint64_t index) noexcept {
    return random_uniform(seed, stream_of(Stream::dropout, layer), index) >= dropout_p ? 1.0f / (1.0f - dropout_p)
                                                                                        : 0.0f;
}

}  // namespace dpart::rt
