// CPU kernels: every op's gradients against finite differences, and the properties the
// executor relies on (accumulation, determinism, masks and labels independent of the split).
#include <doctest/doctest.h>

#include "dpart/io/model_toml.hpp"
#include "kernel_harness.hpp"

using namespace kt;

namespace {

AttentionOp attention(std::uint64_t hidden, std::uint64_t heads, std::uint64_t kv, std::uint64_t dim, bool causal,
                      bool bias) {
    return AttentionOp{hidden, heads, kv, dim, 0, causal, bias, bias};
}

MlpOp mlp(std::uint64_t hidden, std::uint64_t ffn, MlpKind kind, Activation act, bool bias) {
    return MlpOp{hidden, ffn, kind, act, bias};
}

TransformerBlockOp block(NormKind norm, MlpKind kind, Activation act, bool bias, std::uint64_t heads,
                         std::uint64_t kv) {
    TransformerBlockOp b;
    b.attention = attention(8, heads, kv, 8 / heads, true, bias);
    b.mlp = mlp(8, 12, kind, act, bias);
    b.norm = norm;
    b.norm_bias = bias;
    return b;
}

Conv2dOp conv(std::uint64_t in, std::uint64_t out, std::uint64_t kernel, std::uint64_t stride, std::uint64_t padding,
              std::uint64_t groups, bool bias) {
    return Conv2dOp{in, out, kernel, kernel, stride, padding, groups, bias};
}

}  // namespace

TEST_CASE("kernel gradients: linear, with and without bias, on [n, seq, in] inputs") {
    CHECK(check_gradients(single(LinearOp{5, 4, true, std::nullopt}, {2, 5}), 0) == 2 * 10 + 24);
    CHECK(check_gradients(single(LinearOp{5, 3, false, std::nullopt}, {5}), 0, {.samples = 3}) == 15 + 15);
}

TEST_CASE("kernel gradients: relu, gelu, silu and dropout") {
    // Inputs uniform in [-1, 1): a 1e-3 step crosses relu's kink with small odds, none here.
    CHECK(check_gradients(single(ElementwiseOp{Elementwise::relu}, {7}), 0, {.step = 1e-3f}) == 14);
    CHECK(check_gradients(single(ElementwiseOp{Elementwise::gelu}, {7}), 0) == 14);
    CHECK(check_gradients(single(ElementwiseOp{Elementwise::silu}, {2, 3}), 0) == 12);
    CHECK(check_gradients(single(ElementwiseOp{Elementwise::dropout}, {40}), 0) == 80);
}

TEST_CASE("kernel gradients: layernorm (with and without bias) and rmsnorm") {
    CHECK(check_gradients(single(NormOp{NormKind::layernorm, 6, true}, {3, 6}), 0) == 36 + 12);
    CHECK(check_gradients(single(NormOp{NormKind::layernorm, 0, false}, {6}), 0, {.samples = 3}) == 18 + 6);
    CHECK(check_gradients(single(NormOp{NormKind::rmsnorm, 5, true}, {2, 5}), 0) == 20 + 5);
}

TEST_CASE("kernel gradients: embedding tables, with and without positions") {
    // Token ids have no gradient: only the tables are checked.
    const GradCheck tables{.samples = 3, .input_grads = false};
    CHECK(check_gradients(single(EmbeddingOp{7, 4, 5, 3}, {3}), 0, tables) == (7 + 5) * 4);
    CHECK(check_gradients(single(EmbeddingOp{6, 3, 0, 4}, {4}), 0, tables) == 6 * 3);
    EmbeddingOp bert{7, 4, 5, 3};
    bert.token_types = 2;  // every token of type 0: row 1 gets no gradient
    const Model m = single(bert, {3});
    CHECK(make_cpu_kernel(m, 0)->full_params() == m.layers[0].cost.params);
    CHECK(check_gradients(m, 0, tables) == (7 + 5 + 2) * 4);
}

TEST_CASE("kernel gradients: attention, multi-head causal and grouped-query") {
    CHECK(check_gradients(single(attention(8, 2, 2, 4, true, true), {3, 8}), 0) > 0);
    CHECK(check_gradients(single(attention(8, 4, 2, 2, false, false), {4, 8}), 0) > 0);
    CHECK(check_gradients(single(attention(6, 3, 1, 3, true, true), {3, 6}), 0) > 0);
}

TEST_CASE("kernel gradients: mlp, plain and gated") {
    CHECK(check_gradients(single(mlp(6, 10, MlpKind::plain, Activation::gelu, true), {2, 6}), 0) == 24 + 6 * 10 * 2 + 16);
    CHECK(check_gradients(single(mlp(6, 8, MlpKind::gated, Activation::silu, false), {2, 6}), 0) == 24 + 3 * 48);
    CHECK(check_gradients(single(mlp(4, 6, MlpKind::gated, Activation::gelu, true), {4}), 0) > 0);
}

TEST_CASE("kernel gradients: mixtures of experts, alone and in a Mixtral-style block") {
    MlpOp plain = mlp(6, 10, MlpKind::plain, Activation::gelu, true);
    plain.experts = 4;
    plain.experts_per_token = 2;
    const Model a = single(plain, {3, 6});
    CHECK(make_cpu_kernel(a, 0)->full_params() == a.layers[0].cost.params);
    CHECK(check_gradients(a, 0) == 36 + a.layers[0].cost.params);
    MlpOp gated = mlp(6, 8, MlpKind::gated, Activation::silu, false);
    gated.experts = 3;
    gated.experts_per_token = 1;  // one expert per token: its weight is 1, the router learns nothing
    const Model b = single(gated, {4, 6});
    CHECK(make_cpu_kernel(b, 0)->full_params() == b.layers[0].cost.params);
    CHECK(check_gradients(b, 0, {.input_grads = true}) > 0);
    TransformerBlockOp mixtral = block(NormKind::rmsnorm, MlpKind::gated, Activation::silu, false, 4, 2);
    mixtral.mlp.experts = 4;
    mixtral.mlp.experts_per_token = 2;
    const Model c = single(mixtral, {3, 8});
    CHECK(make_cpu_kernel(c, 0)->full_params() == c.layers[0].cost.params);
    // The top-k choice is a step function: a difference step must not move a token across a
    // tie (in a block every input moves every later token, through attention). 5e-3 does here,
    // 1e-3 does not; with every expert chosen there is no step at all.
    CHECK(check_gradients(c, 0, {.step = 1e-3f}) > 0);
    mixtral.mlp.experts_per_token = 4;
    CHECK(check_gradients(single(mixtral, {3, 8}), 0) > 0);
}

TEST_CASE("kernel gradients: transformer blocks (GPT-2 style and Llama style)") {
    CHECK(check_gradients(single(block(NormKind::layernorm, MlpKind::plain, Activation::gelu, true, 2, 2), {3, 8}), 0) > 0);
    CHECK(check_gradients(single(block(NormKind::rmsnorm, MlpKind::gated, Activation::silu, false, 4, 2), {3, 8}), 0) > 0);
}

TEST_CASE("kernel gradients: add, concat, flatten") {
    const Model m = model({layer("a", ElementwiseOp{Elementwise::gelu}), layer("b", LinearOp{3, 3, true, std::nullopt}),
                           layer("sum", AddOp{}, std::vector<std::string>{"a", "b"}),
                           layer("cat0", ConcatOp{0}, std::vector<std::string>{"a", "sum"}),
                           layer("flat", FlattenOp{}, std::vector<std::string>{"cat0"})},
                          Shape{2, 3});
    CHECK(check_gradients(m, 2, {.samples = 3}) == 2 * 18);
    CHECK(check_gradients(m, 3, {.samples = 3}) == 2 * 18);
    CHECK(check_gradients(m, 4, {.samples = 3}) == 36);

    const Model wide = model({layer("a", ElementwiseOp{Elementwise::relu}), layer("b", LinearOp{3, 5, true, std::nullopt}),
                              layer("c", ElementwiseOp{Elementwise::silu}, std::vector<std::string>{"a"}),
                              layer("cat1", ConcatOp{1}, std::vector<std::string>{"a", "b", "c"})},
                             Shape{2, 3});
    CHECK(wide.layers[3].out_shape == Shape{2, 11});
    CHECK(check_gradients(wide, 3) == 12 + 20 + 12);
}

TEST_CASE("kernel gradients: softmax cross-entropy over several positions") {
    CHECK(check_gradients(single(SoftmaxXentOp{5}, {3, 5}), 0, {.samples = 3}) == 45);
    CHECK(check_gradients(single(SoftmaxXentOp{0}, {4}), 0) == 8);
}

TEST_CASE("kernel gradients: custom layers tile or cut their input to the product's width") {
    CustomOp tiled;
    tiled.fwd_flops = 2 * 4 * 7;  // out 4, k = 7 from an input of 5: tiled
    tiled.out_bytes = 16;
    tiled.out_shape = {4};
    CHECK(check_gradients(single(tiled, {5}), 0) == 10 + 28);
    CustomOp cut;
    cut.fwd_flops = 2 * 6 * 3;  // out 6 (opaque: out_bytes / 4), k = 3 from an input of 2 x 4: cut
    cut.out_bytes = 24;
    const Model m = single(cut, {2, 4});
    CHECK(make_cpu_kernel(m, 0)->full_params() == 18);
    CHECK(check_gradients(m, 0) == 16 + 18);
}

TEST_CASE("kernel gradients: conv2d (padding, stride, groups), batchnorm, pooling") {
    CHECK(check_gradients(single(conv(2, 4, 3, 2, 1, 2, true), {2, 5, 5}), 0) == 100 + 4 * 9 + 4);
    CHECK(check_gradients(single(conv(3, 2, 2, 1, 0, 1, false), {3, 4, 3}), 0) == 72 + 24);
    CHECK(check_gradients(single(BatchNormOp{2}, {2, 2, 3}), 0, {.samples = 3}) == 36 + 4);
    PoolOp max{PoolKind::max, 2, 2, 1, false};
    CHECK(check_gradients(single(max, {2, 3, 3}), 0, {.step = 1e-3f}) == 36);
    PoolOp avg{PoolKind::avg, 3, 2, 1, false};
    CHECK(check_gradients(single(avg, {2, 4, 4}), 0) == 64);
    PoolOp global{PoolKind::avg, 0, 0, 0, true};
    CHECK(check_gradients(single(global, {3, 2, 2}), 0) == 24);
}

TEST_CASE("kernel backward adds into the parameter gradients and is deterministic") {
    const Model m = single(attention(8, 4, 2, 2, true, true), {4, 8});
    const auto k = make_cpu_kernel(m, 0);
    const std::vector<Tensor> in = inputs_for(m, 0, 3, 1);
    const std::vector<float> params = params_for(*k, 2);
    const StepContext ctx{1, 0, nullptr};
    const Tensor dout = random_tensor({3, 4, 8}, 3);
    const Result a = run(*k, ctx, in, params, dout);
    const Result b = run(*k, ctx, in, params, dout);
    CHECK(a.y.data == b.y.data);
    CHECK(a.dx[0].data == b.dx[0].data);
    CHECK(a.dparams == b.dparams);

    std::vector<float> twice(k->shard_params(), 0.0f);
    Saved saved;
    (void)k->forward(ctx, pointers(in), params, saved);
    (void)k->backward(ctx, dout, pointers(in), params, saved, twice);
    (void)k->backward(ctx, dout, pointers(in), params, saved, twice);
    // Not bitwise 2x: BLAS adds its partial products into a non-zero C in its own order.
    std::vector<float> doubled = a.dparams;
    for (float& v : doubled) v *= 2.0f;
    CHECK(rel_diff(twice, doubled) < 1e-6);
    CHECK(twice != a.dparams);
}

TEST_CASE("kernel dropout: the mask follows the global sample index, not the split") {
    const Model m = single(ElementwiseOp{Elementwise::dropout}, {3, 50});
    const auto k = make_cpu_kernel(m, 0);
    const Tensor x = random_tensor({4, 3, 50}, 5);
    Saved saved;
    const Tensor* whole_in[] = {&x};
    const Tensor whole = k->forward(StepContext{9, 100, nullptr}, whole_in, {}, saved);
    std::size_t dropped = 0;
    for (std::size_t i = 0; i < x.size(); ++i) {
        if (whole.data[i] == 0.0f) ++dropped;
        else CHECK(whole.data[i] == doctest::Approx(x.data[i] / 0.9f).epsilon(1e-6));
    }
    CHECK(dropped > 40);  // p = 0.1 of 600
    CHECK(dropped < 80);
    for (std::size_t half = 0; half < 2; ++half) {
        Tensor part({2, 3, 50});
        std::copy_n(x.data.begin() + static_cast<std::ptrdiff_t>(half * 300), 300, part.data.begin());
        const Tensor* in[] = {&part};
        const Tensor y = k->forward(StepContext{9, 100 + 2 * half, nullptr}, in, {}, saved);
        CHECK(std::equal(y.data.begin(), y.data.end(), whole.data.begin() + static_cast<std::ptrdiff_t>(half * 300)));
    }
    const Tensor other = k->forward(StepContext{10, 100, nullptr}, whole_in, {}, saved);
    CHECK(other.data != whole.data);
}

TEST_CASE("kernel softmax_xent: the loss of one sample by hand") {
    const Model m = single(SoftmaxXentOp{3}, {3});
    const auto k = make_cpu_kernel(m, 0);
    Tensor x({1, 3});
    x.data = {1.0f, 2.0f, 0.5f};
    const StepContext ctx{42, 17, nullptr};
    const std::size_t label = random_bits(42, stream_of(Stream::label), 17) % 3;
    const double expected = std::log(std::exp(1.0) + std::exp(2.0) + std::exp(0.5)) - x.data[label];
    Saved saved;
    const Tensor* in[] = {&x};
    const Tensor y = k->forward(ctx, in, {}, saved);
    CHECK(y.shape == std::vector<std::size_t>{1, 1});
    CHECK(y.data[0] == doctest::Approx(expected).epsilon(1e-6));
    Tensor dout({1, 1});
    dout.data = {2.0f};
    const std::vector<Tensor> dx = k->backward(ctx, dout, in, {}, saved, {});
    double sum = 0.0;
    for (float g : dx[0].data) sum += g;
    CHECK(sum == doctest::Approx(0.0).epsilon(1e-6));
    CHECK(dx[0].data[label] < 0.0f);
}

TEST_CASE("kernel synthetic input: token ids in range, values independent of the split") {
    const Model lm = single(EmbeddingOp{11, 4, 0, 6}, {6});
    const Tensor ids = synthetic_input(lm, 3, 10, 4);
    CHECK(ids.shape == std::vector<std::size_t>{4, 6});
    for (float v : ids.data) {
        CHECK(v >= 0.0f);
        CHECK(v < 11.0f);
        CHECK(v == std::floor(v));
    }
    const Tensor tail = synthetic_input(lm, 3, 12, 2);
    CHECK(std::equal(tail.data.begin(), tail.data.end(), ids.data.begin() + 12));

    const Model mlp_model = single(LinearOp{5, 2, true, std::nullopt}, {5});
    const Tensor x = synthetic_input(mlp_model, 3, 0, 2);
    CHECK(x.shape == std::vector<std::size_t>{2, 5});
    CHECK(max_abs(x.data) <= 1.0);
    CHECK(max_abs(x.data) > 0.0);

    CustomOp opaque;
    opaque.fwd_flops = 2 * 3 * 9;
    opaque.out_bytes = 12;
    const Model o = model({layer("c", opaque)});
    CHECK(synthetic_input(o, 3, 0, 2).shape == std::vector<std::size_t>{2, 9});
}

TEST_CASE("kernel chain: the bundled tiny transformers run forward and backward through every layer") {
    for (const char* name : {"tiny-gpt", "tiny-llama", "tiny-mixtral"}) {
        CAPTURE(name);
        const Model m = load_model(std::string(DPART_SOURCE_DIR) + "/plans/models/" + name + ".toml");
        const std::size_t n = 2;
        const StepContext ctx{5, 0, nullptr};
        std::vector<std::unique_ptr<LayerKernel>> kernels;
        std::vector<std::vector<float>> params;
        std::vector<Tensor> out(m.layers.size());
        std::vector<Saved> saved(m.layers.size());
        const Tensor x = synthetic_input(m, 5, 0, n);
        const auto inputs_of = [&](std::size_t l) {
            std::vector<const Tensor*> in;
            if (m.layers[l].inputs.empty()) in.push_back(&x);
            for (std::size_t j : m.layers[l].inputs) in.push_back(&out[j]);
            return in;
        };
        for (std::size_t l = 0; l < m.layers.size(); ++l) {
            kernels.push_back(make_cpu_kernel(m, l));
            params.emplace_back(kernels[l]->full_params());
            kernels[l]->init(5, params[l]);
            out[l] = kernels[l]->forward(ctx, inputs_of(l), params[l], saved[l]);
            CHECK(out[l].shape == batch_shape(n, m.layers[l].out_shape));
        }
        // At initialisation the loss is close to that of a uniform guess over the vocabulary.
        for (float loss : out.back().data) {
            CHECK(loss > std::log(256.0f) - 0.5f);
            CHECK(loss < std::log(256.0f) + 1.0f);
        }
        Tensor grad({n, 1});
        std::fill(grad.data.begin(), grad.data.end(), 1.0f / static_cast<float>(n));
        for (std::size_t l = m.layers.size(); l-- > 0;) {
            std::vector<float> dparams(kernels[l]->shard_params(), 0.0f);
            const std::vector<Tensor> dx = kernels[l]->backward(ctx, grad, inputs_of(l), params[l], saved[l], dparams);
            CHECK(std::all_of(dparams.begin(), dparams.end(), [](float g) { return std::isfinite(g); }));
            if (!dparams.empty()) CHECK(max_abs(dparams) > 0.0);
            // A chain: each layer reads the previous one.
            if (l > 0) grad = dx.at(0);
        }
    }
}
