#include "dpart/runtime/moe.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>

namespace dpart::rt {

std::size_t MoeRouting::expert_of(std::size_t slot) const {
    if (slot >= slots()) throw std::out_of_range("MoeRouting::expert_of: no such slot");
    // offset is non-decreasing: the last expert whose block starts at or before the slot.
    const auto it = std::upper_bound(offset.begin(), offset.end(), slot);
    return static_cast<std::size_t>(it - offset.begin()) - 1;
}

MoeRouting route_tokens(std::span<const float> logits, std::size_t tokens, std::size_t experts, std::size_t k) {
    if (k == 0 || k > experts) throw std::invalid_argument("route_tokens: k must be in [1, experts]");
    if (logits.size() != tokens * experts) throw std::invalid_argument("route_tokens: logits are not [tokens, experts]");
    MoeRouting r;
    r.tokens = tokens;
    r.experts = experts;
    r.k = k;
    r.probs.resize(logits.size());
    std::vector<std::size_t> chosen(tokens * k);  // [tokens, k], increasing expert
    std::vector<std::size_t> order(experts);
    for (std::size_t t = 0; t < tokens; ++t) {
        const float* z = logits.data() + t * experts;
        float* p = r.probs.data() + t * experts;
        const float m = *std::max_element(z, z + experts);
        float sum = 0.0f;
        for (std::size_t e = 0; e < experts; ++e) sum += (p[e] = std::exp(z[e] - m));
        for (std::size_t e = 0; e < experts; ++e) p[e] /= sum;
        std::iota(order.begin(), order.end(), std::size_t{0});
        std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(k), order.end(),
                          [&](std::size_t a, std::size_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
        std::sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(k));
        std::copy_n(order.begin(), k, chosen.begin() + static_cast<std::ptrdiff_t>(t * k));
    }
    // Slots by expert, then token: count, prefix sums, fill.
    r.offset.assign(experts + 1, 0);
    for (const std::size_t e : chosen) ++r.offset[e + 1];
    std::partial_sum(r.offset.begin(), r.offset.end(), r.offset.begin());
    std::vector<std::size_t> next(r.offset.begin(), r.offset.end() - 1);
    r.token.resize(tokens * k);
    r.weight.resize(tokens * k);
    r.token_slots.resize(tokens * k);
    for (std::size_t t = 0; t < tokens; ++t) {
        const float* p = r.probs.data() + t * experts;
        float total = 0.0f;
        for (std::size_t j = 0; j < k; ++j) total += p[chosen[t * k + j]];
        for (std::size_t j = 0; j < k; ++j) {
            const std::size_t e = chosen[t * k + j];
            const std::size_t slot = next[e]++;
            r.token[slot] = t;
            r.weight[slot] = p[e] / total;
            r.token_slots[t * k + j] = slot;
        }
    }
    return r;
}

std::vector<float> router_logit_grads(const MoeRouting& r, std::span<const float> dweight) {
    if (dweight.size() != r.slots()) throw std::invalid_argument("router_logit_grads: one gradient per slot");
    std::vector<float> dz(r.tokens * r.experts, 0.0f);
    std::vector<float> dp(r.experts);
    for (std::size_t t = 0; t < r.tokens; ++t) {
        const float* p = r.probs.data() + t * r.experts;
        const std::size_t* s = r.token_slots.data() + t * r.k;
        // w_j = p_j / P: dp_j = (g_j - sum_i w_i g_i) / P for the chosen j, 0 for the others.
        float total = 0.0f, mean = 0.0f;
        for (std::size_t j = 0; j < r.k; ++j) {
            total += p[r.expert_of(s[j])];
            mean += r.weight[s[j]] * dweight[s[j]];
        }
        std::fill(dp.begin(), dp.end(), 0.0f);
        for (std::size_t j = 0; j < r.k; ++j) dp[r.expert_of(s[j])] = (dweight[s[j]] - mean) / total;
        // Softmax: dz_e = p_e (dp_e - sum_i p_i dp_i).
        float dot = 0.0f;
        for (std::size_t e = 0; e < r.experts; ++e) dot += p[e] * dp[e];
        for (std::size_t e = 0; e < r.experts; ++e) dz[t * r.experts + e] = p[e] * (dp[e] - dot);
    }
    return dz;
}

}  // namespace dpart::rt
