// CPU kernels under tensor parallelism: t shards on threads agree with one, the parameter
// layout splits and reassembles exactly, and splits that do not divide are bad input.
#include <doctest/doctest.h>

#include <string>

#include "dpart/core/error.hpp"
#include "dpart/graph/transformer.hpp"
#include "kernel_harness.hpp"

using namespace kt;

namespace {

AttentionOp attention(std::uint64_t heads, std::uint64_t kv, bool bias) {
    return AttentionOp{16, heads, kv, 16 / heads, 0, true, bias, bias};
}

TransformerBlockOp block(NormKind norm, MlpKind kind, Activation act, bool bias, std::uint64_t kv) {
    TransformerBlockOp b;
    b.attention = attention(4, kv, bias);
    b.mlp = MlpOp{16, 24, kind, act, bias};
    b.norm = norm;
    b.norm_bias = bias;
    return b;
}

std::string error_of(const Model& m, std::size_t l, std::uint32_t t) {
    try {
        (void)make_cpu_kernel(m, l, Shard{0, t});
    } catch (const InputError& e) {
        return e.what();
    }
    return "no error";
}

}  // namespace

TEST_CASE("kernel tensor parallel: linear, column-parallel with an all-gather") {
    check_tensor_parallel(single(LinearOp{6, 8, true, std::nullopt}, {3, 6}), 0, {2, 4});
    check_tensor_parallel(single(LinearOp{5, 6, false, std::nullopt}, {5}), 0, {2, 3}, 3);
}

TEST_CASE("kernel tensor parallel: attention, multi-head and grouped-query") {
    check_tensor_parallel(single(attention(4, 4, true), {5, 16}), 0, {2, 4});
    check_tensor_parallel(single(attention(4, 2, false), {5, 16}), 0, {2});
    check_tensor_parallel(single(attention(8, 4, true), {3, 16}), 0, {2, 4});
}

TEST_CASE("kernel tensor parallel: mlp, plain and gated") {
    check_tensor_parallel(single(MlpOp{16, 24, MlpKind::plain, Activation::gelu, true}, {3, 16}), 0, {2, 4});
    check_tensor_parallel(single(MlpOp{16, 24, MlpKind::gated, Activation::silu, false}, {3, 16}), 0, {2, 4});
}

TEST_CASE("kernel tensor parallel: transformer blocks") {
    check_tensor_parallel(single(block(NormKind::layernorm, MlpKind::plain, Activation::gelu, true, 4), {4, 16}), 0,
                          {2, 4});
    check_tensor_parallel(single(block(NormKind::rmsnorm, MlpKind::gated, Activation::silu, false, 2), {4, 16}), 0,
                          {2});
}

TEST_CASE("kernel tensor parallel: layers with no split hold everything on every rank") {
    TransformerSpec t;
    t.layers = 1;
    t.hidden = 16;
    t.heads = 4;
    t.vocab = 12;
    t.seq_len = 4;
    t.tied_embeddings = true;
    ModelSpec spec;
    spec.name = "tiny-gpt";
    spec.global_batch = 4;
    spec.layers = expand_transformer(t, SourceLocation{"t.toml", 1, 1});
    const Model m = build_model(spec);
    const std::size_t head = *m.find("head");
    REQUIRE(m.layers[head].cost.params == 0);  // tied: the planner counts the table at the embedding
    for (std::size_t l : {std::size_t{0}, *m.find("final_norm"), head, *m.find("loss")}) {
        CAPTURE(m.layers[l].name);
        const auto k = make_cpu_kernel(m, l, Shard{1, 2});
        CHECK(k->shard_params() == k->full_params());
    }
    CHECK(make_cpu_kernel(m, head, Shard{1, 2})->full_params() == 12 * 16);
    check_tensor_parallel(m, head, {2, 4});
    check_tensor_parallel(m, *m.find("block0"), {2, 4});
}

TEST_CASE("kernel parameters: init is a pure function of (seed, layer) in the full layout") {
    const Model m = single(LinearOp{4, 4, true, std::nullopt}, {4});
    const Model b = single(block(NormKind::layernorm, MlpKind::gated, Activation::gelu, true, 2), {4, 16});
    const auto k = make_cpu_kernel(b, 0);
    std::vector<float> p1(k->full_params()), p2(k->full_params()), p3(k->full_params());
    k->init(5, p1);
    make_cpu_kernel(b, 0, Shard{1, 2})->init(5, p2);
    k->init(6, p3);
    CHECK(p1 == p2);
    CHECK(p1 != p3);
    // Norm gains 1, biases 0, weights within 1 / sqrt(fan_in).
    CHECK(p1[0] == 1.0f);
    CHECK(p1[16] == 0.0f);
    CHECK(std::abs(p1[32]) <= 0.25f);
    CHECK(max_abs(p1) > 0.1);

    const auto fc = make_cpu_kernel(m, 0);
    std::vector<float> w(fc->full_params());
    fc->init(5, w);
    CHECK(w[0] == random_symmetric(5, stream_of(Stream::weight, 0), 0) * 0.5f);
    CHECK(w[16] == 0.0f);  // the bias
}

TEST_CASE("kernel parameters: shards cover the layout and reassemble it exactly") {
    const Model b = single(block(NormKind::layernorm, MlpKind::plain, Activation::relu, true, 2), {4, 16});
    const auto whole = make_cpu_kernel(b, 0);
    std::vector<float> full(whole->full_params());
    for (std::size_t i = 0; i < full.size(); ++i) full[i] = static_cast<float>(i);
    for (std::uint32_t t : {1u, 2u}) {
        CAPTURE(t);
        std::vector<float> back(full.size(), -1.0f);
        std::size_t total = 0;
        for (std::uint32_t r = 0; r < t; ++r) {
            const auto k = make_cpu_kernel(b, 0, Shard{r, t});
            std::vector<float> shard(k->shard_params());
            k->to_shard(full, shard);
            k->from_shard(shard, back);
            total += shard.size();
        }
        CHECK(back == full);
        // Replicated: two norms (2 x 2 x 16) and the two output biases (16 each).
        CHECK(total == full.size() + (t - 1) * (4 * 16 + 2 * 16));
    }
    // Rank 1 of 2 holds the second half of Wq's rows and the second half of each row of Wo.
    const auto k = make_cpu_kernel(b, 0, Shard{1, 2});
    std::vector<float> shard(k->shard_params());
    k->to_shard(full, shard);
    const std::size_t wq = 2 * 16;  // after norm1's gain and bias
    CHECK(shard[wq] == full[wq + 8 * 16]);
    const std::size_t wo_full = wq + (16 + 8 + 8) * 16 + (16 + 8 + 8);
    const std::size_t wo_shard = wq + (8 + 4 + 4) * 16 + (8 + 4 + 4);
    CHECK(shard[wo_shard] == full[wo_full + 8]);
    CHECK(shard[wo_shard + 8] == full[wo_full + 16 + 8]);
}

TEST_CASE("kernel errors: splits that do not divide are bad input naming the layer") {
    const Model lin = single(LinearOp{4, 6, true, std::nullopt}, {4});
    CHECK(error_of(lin, 0, 3) == "no error");
    const std::string e = error_of(lin, 0, 4);
    CHECK(e.find("k.toml:3:1") == 0);
    CHECK(e.find("layer \"op\"") != std::string::npos);
    CHECK(e.find("out_features 6") != std::string::npos);
    CHECK(e.find("tensor-parallel group of 4") != std::string::npos);

    CHECK(error_of(single(attention(4, 2, true), {3, 16}), 0, 4).find("kv_heads 2") != std::string::npos);
    CHECK(error_of(single(AttentionOp{12, 3, 3, 4, 0, true, true, true}, {3, 12}), 0, 2).find("heads 3") !=
          std::string::npos);
    CHECK(error_of(single(MlpOp{16, 24, MlpKind::gated, Activation::silu, false}, {16}), 0, 5).find("ffn_hidden 24") !=
          std::string::npos);
    CHECK(error_of(single(block(NormKind::rmsnorm, MlpKind::plain, Activation::gelu, false, 4), {2, 16}), 0, 8)
              .find("heads 4") != std::string::npos);
}

TEST_CASE("kernel tensor parallel: mixtures of experts split every expert by inner units") {
    MlpOp moe{16, 24, MlpKind::plain, Activation::gelu, true};
    moe.experts = 4;
    moe.experts_per_token = 2;
    check_tensor_parallel(single(moe, {3, 16}), 0, {2, 4});
    TransformerBlockOp b = block(NormKind::rmsnorm, MlpKind::gated, Activation::silu, false, 2);
    b.mlp.experts = 3;
    b.mlp.experts_per_token = 2;
    check_tensor_parallel(single(b, {4, 16}), 0, {2});
    // The experts' inner size must split like a dense MLP's.
    moe.ffn_hidden = 18;
    CHECK(error_of(single(moe, {16}), 0, 4).find("ffn_hidden 18") != std::string::npos);
}

TEST_CASE("kernel tensor parallel: every rank routes a mixture of experts from rank 0's logits") {
    // Rank 1's router is negated, as if its products rounded (much) differently: it must still
    // send every token where rank 0 does, or the two ranks' experts would all-reduce different
    // sizes. Both ranks then give the unsplit layer's output.
    prepare_cpu_workers();
    MlpOp moe{16, 24, MlpKind::plain, Activation::gelu, true};
    moe.experts = 4;
    moe.experts_per_token = 2;
    const Model m = single(moe, {3, 16});
    const auto whole = make_cpu_kernel(m, 0);
    const StepContext base{21, 8, nullptr};
    const std::vector<Tensor> in = inputs_for(m, 0, 2, 31);
    const std::vector<float> full = params_for(*whole, 9);
    Saved saved;
    const Tensor y1 = whole->forward(base, pointers(in), full, saved);
    const Tensor dout = random_tensor(y1.shape, 41);
    const Result one = run(*whole, base, in, full, dout);
    const std::size_t router = 4 * 16;  // the first parameters: [experts, hidden], whole on each rank
    ThreadGroup group(2);
    std::vector<Result> ranks(2);
    std::vector<std::thread> threads;
    for (std::uint32_t r = 0; r < 2; ++r)
        threads.emplace_back([&, r] {
            const auto k = make_cpu_kernel(m, 0, Shard{r, 2});
            ThreadGroup::Comm comm(group, r);
            StepContext ctx = base;
            ctx.tp = &comm;
            std::vector<float> shard(k->shard_params());
            k->to_shard(full, shard);
            if (r == 1)
                for (std::size_t i = 0; i < router; ++i) shard[i] = -shard[i];
            ranks[r] = run(*k, ctx, in, shard, dout);
        });
    for (auto& t : threads) t.join();
    CHECK(ranks[0].y.data == ranks[1].y.data);
    CHECK(rel_diff(ranks[0].y.data, one.y.data) < 1e-6);
    // Backward ran through the same experts on both (the router's own input gradient reads each
    // rank's router, so only rank 0's is the unsplit one's).
    CHECK(rel_diff(ranks[0].dx[0].data, one.dx[0].data) < 1e-6);
}

TEST_CASE("kernel factory: conv2d, batchnorm, pool, custom and the rest all have CPU kernels") {
    CustomOp c;
    c.fwd_flops = 2 * 4 * 4;
    c.out_bytes = 16;
    c.out_shape = {4, 1, 1};
    const Model m = model({layer("conv", Conv2dOp{1, 4, 1, 1, 1, 0, 1, true}),
                           layer("bn", BatchNormOp{4}),
                           layer("pool", PoolOp{PoolKind::max, 0, 0, 0, true}),
                           layer("flat", FlattenOp{}),
                           layer("fc", LinearOp{4, 4, true, std::nullopt}),
                           layer("act", ElementwiseOp{Elementwise::silu}),
                           layer("norm", NormOp{NormKind::rmsnorm, 4, false}),
                           layer("drop", ElementwiseOp{Elementwise::dropout}),
                           layer("opaque", c, std::vector<std::string>{"flat"}),
                           layer("flat2", FlattenOp{}),
                           layer("sum", AddOp{}, std::vector<std::string>{"drop", "flat2"}),
                           layer("cat", ConcatOp{0}, std::vector<std::string>{"sum", "fc"}),
                           layer("loss", SoftmaxXentOp{8})},
                          Shape{1, 3, 3});
    for (std::size_t l = 0; l < m.layers.size(); ++l) {
        CAPTURE(m.layers[l].name);
        CHECK_NOTHROW((void)make_cpu_kernel(m, l, Shard{0, 2}));
    }
    CHECK_THROWS_AS((void)make_cpu_kernel(m, 13), std::out_of_range);
}
