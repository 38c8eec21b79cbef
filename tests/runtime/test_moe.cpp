// A mixture of experts' routing (runtime/moe.hpp): the chosen experts and weights by hand, the
// slots' layout, and the router's gradient against finite differences.
#include <doctest/doctest.h>

#include <cmath>
#include <numeric>
#include <stdexcept>
#include <vector>

#include "dpart/runtime/moe.hpp"

using namespace dpart::rt;

TEST_CASE("moe routing: the k most probable experts, renormalised, slots grouped by expert") {
    // 3 tokens, 4 experts, k = 2. Token 0 prefers 2 then 0; token 1 prefers 3 then 2; token 2
    // has experts 1 and 3 tied (the lower index wins the tie for second place after 0).
    const std::vector<float> logits{1.0f, 0.0f, 2.0f, -1.0f,  //
                                    0.0f, 0.0f, 1.0f, 3.0f,   //
                                    2.0f, 0.5f, -3.0f, 0.5f};
    const MoeRouting r = route_tokens(logits, 3, 4, 2);
    REQUIRE(r.slots() == 6);
    CHECK(r.offset == std::vector<std::size_t>{0, 2, 3, 5, 6});
    CHECK(r.token == std::vector<std::size_t>{0, 2, 2, 0, 1, 1});  // expert 0: tokens 0, 2; 1: 2; 2: 0, 1; 3: 1
    for (std::size_t s = 0; s < r.slots(); ++s) CHECK(r.expert_of(s) == std::vector<std::size_t>{0, 0, 1, 2, 2, 3}[s]);
    CHECK_THROWS_AS((void)r.expert_of(6), std::out_of_range);
    // Each token's slots in increasing expert order.
    CHECK(r.token_slots == std::vector<std::size_t>{0, 3, 4, 5, 1, 2});
    // Weights: the chosen probabilities renormalised, e.g. token 0: e^1 / (e^1 + e^2).
    const double w00 = std::exp(1.0) / (std::exp(1.0) + std::exp(2.0));
    CHECK(r.weight[0] == doctest::Approx(w00).epsilon(1e-6));
    CHECK(r.weight[3] == doctest::Approx(1.0 - w00).epsilon(1e-6));
    const double w13 = std::exp(3.0) / (std::exp(1.0) + std::exp(3.0));
    CHECK(r.weight[5] == doctest::Approx(w13).epsilon(1e-6));
    CHECK(r.weight[2] == doctest::Approx(std::exp(0.5) / (std::exp(2.0) + std::exp(0.5))).epsilon(1e-6));
    // Probabilities are the softmax of every expert.
    for (std::size_t t = 0; t < 3; ++t) {
        double sum = 0.0;
        for (std::size_t e = 0; e < 4; ++e) sum += r.probs[t * 4 + e];
        CHECK(sum == doctest::Approx(1.0).epsilon(1e-6));
    }
}

TEST_CASE("moe routing: k = experts weighs every expert by its probability; bad sizes are refused") {
    const std::vector<float> logits{0.3f, -0.2f, 0.9f};
    const MoeRouting r = route_tokens(logits, 1, 3, 3);
    CHECK(r.offset == std::vector<std::size_t>{0, 1, 2, 3});
    for (std::size_t e = 0; e < 3; ++e) CHECK(r.weight[e] == doctest::Approx(r.probs[e]).epsilon(1e-6));
    CHECK_THROWS_AS((void)route_tokens(logits, 1, 3, 0), std::invalid_argument);
    CHECK_THROWS_AS((void)route_tokens(logits, 1, 3, 4), std::invalid_argument);
    CHECK_THROWS_AS((void)route_tokens(logits, 2, 3, 1), std::invalid_argument);
    CHECK_THROWS_AS((void)router_logit_grads(r, std::vector<float>(2)), std::invalid_argument);
    // No tokens: no slots.
    const MoeRouting none = route_tokens({}, 0, 3, 2);
    CHECK(none.slots() == 0);
    CHECK(none.offset == std::vector<std::size_t>{0, 0, 0, 0});
}

TEST_CASE("moe routing: the router's gradient matches finite differences of sum(weight x g)") {
    // f(logits) = sum over slots of weight(slot) * g(slot), g fixed; the routing does not change
    // within the step (the logits are well apart).
    const std::size_t tokens = 3, experts = 5, k = 2;
    std::vector<float> logits{0.1f, 1.3f, -0.7f, 0.6f, 2.0f,  //
                              -1.0f, 0.2f, 1.1f, 2.4f, 0.0f,  //
                              1.7f, -0.4f, 0.9f, -2.0f, 0.3f};
    const MoeRouting base = route_tokens(logits, tokens, experts, k);
    std::vector<float> g(base.slots());
    for (std::size_t s = 0; s < g.size(); ++s) g[s] = 0.5f - 0.3f * static_cast<float>(s);
    const std::vector<float> dz = router_logit_grads(base, g);
    // g is given by (token, expert), so that it follows a slot when the routing is recomputed.
    const auto f = [&](const std::vector<float>& z) {
        const MoeRouting r = route_tokens(z, tokens, experts, k);
        REQUIRE(r.token == base.token);
        double sum = 0.0;
        for (std::size_t s = 0; s < r.slots(); ++s) sum += static_cast<double>(r.weight[s]) * g[s];
        return sum;
    };
    const float h = 1e-3f;
    double worst = 0.0, scale = 0.0;
    for (std::size_t i = 0; i < logits.size(); ++i) {
        std::vector<float> up = logits, down = logits;
        up[i] += h;
        down[i] -= h;
        const double fd = (f(up) - f(down)) / (2.0 * h);
        worst = std::max(worst, std::abs(fd - dz[i]));
        scale = std::max(scale, std::abs(fd));
    }
    CHECK(scale > 0.01);
    CHECK(worst / scale < 2e-3);
    // The softmax's gradient sums to 0 over each token's logits.
    for (std::size_t t = 0; t < tokens; ++t)
        CHECK(std::accumulate(dz.begin() + static_cast<std::ptrdiff_t>(t * experts),
                              dz.begin() + static_cast<std::ptrdiff_t>((t + 1) * experts), 0.0) ==
              doctest::Approx(0.0).epsilon(1e-6));
}
