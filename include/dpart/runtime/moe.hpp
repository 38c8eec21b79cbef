#pragma once
// A mixture of experts' routing, shared by the CPU kernel and the device layer so that both send
// the same tokens to the same experts with the same weights (Mixtral's sparse MoE block):
//   probs = softmax(x W_router^T) per token; the k most probable experts (ties: the lower
//   index); their weights = their probabilities renormalised to sum 1;
//   y = sum over the chosen experts e of weight_e * expert_e(x).
// Tokens are handled in "slots": each (token, chosen expert) pair, sorted by expert and, within
// an expert, by token, so that every expert's tokens are one contiguous block of rows.
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace dpart::rt {

struct MoeRouting {
    std::size_t tokens = 0, experts = 0, k = 0;
    /// [tokens, experts]: the softmax of the router's logits.
    std::vector<float> probs;
    /// [experts + 1]: expert e's slots are [offset[e], offset[e + 1]).
    std::vector<std::size_t> offset;
    /// [tokens x k], by slot: the token (row) and its weight.
    std::vector<std::size_t> token;
    std::vector<float> weight;
    /// [tokens, k]: each token's slots, in increasing expert order (the order its expert outputs
    /// are summed in).
    std::vector<std::size_t> token_slots;

    [[nodiscard]] std::size_t slots() const noexcept { return token.size(); }
    [[nodiscard]] std::size_t expert_of(std::size_t slot) const;
};

/// The routing of `tokens` rows of router logits [tokens, experts]. Throws std::invalid_argument
/// when k is 0 or above experts, or the sizes disagree.
[[nodiscard]] MoeRouting route_tokens(std::span<const float> logits, std::size_t tokens, std::size_t experts,
                                      std::size_t k);

/// The gradient of the router's logits [tokens, experts] given, by slot, d loss / d weight of
/// each slot (the dot product of the token's output gradient with that expert's output):
/// through the renormalisation w_j = p_j / P (P = sum of the chosen p) then the softmax.
/// Non-chosen experts' logits get only the softmax's share.
[[nodiscard]] std::vector<float> router_logit_grads(const MoeRouting& r, std::span<const float> dweight);

}  // namespace dpart::rt
