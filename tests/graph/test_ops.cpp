// The op library against hand-derived figures (docs/METHOD.md gives the formulas).
#include <doctest/doctest.h>

#include "dpart/core/error.hpp"
#include "dpart/graph/ops.hpp"

using namespace dpart;

namespace {

OpResult eval1(const OpParams& op, const Shape& in, DType dtype = DType::fp32) { return evaluate(op, {in}, dtype); }

TransformerBlockOp gpt2_block(std::uint64_t s) {
    TransformerBlockOp b;
    b.attention = AttentionOp{768, 12, 12, 64, s, true, true, true};
    b.mlp = MlpOp{768, 3072, MlpKind::plain, Activation::gelu, true};
    b.norm = NormKind::layernorm;
    return b;
}

}  // namespace

TEST_CASE("linear: parameters, FLOPs and bytes") {
    const OpResult r = eval1(LinearOp{100, 50, true, std::nullopt}, {100});
    CHECK(r.out_shape == Shape{50});
    CHECK(r.cost.params == 100 * 50 + 50);
    CHECK(r.cost.fwd_flops == 2 * 100 * 50);
    CHECK(r.cost.bwd_flops == 4 * 100 * 50);
    CHECK(r.cost.out_bytes == 50 * 4);
    CHECK(r.cost.saved_bytes == 100 * 4);
    CHECK(r.cost.weight_bytes == 5050 * 4);
    CHECK(r.cost.fwd_mem_bytes == (100 + 50) * 4);

    // Over a sequence, every token is multiplied.
    const OpResult seq = eval1(LinearOp{768, 3072, false, std::nullopt}, {1024, 768}, DType::bf16);
    CHECK(seq.out_shape == Shape{1024, 3072});
    CHECK(seq.cost.params == 768 * 3072);
    CHECK(seq.cost.fwd_flops == 2ull * 1024 * 768 * 3072);
    CHECK(seq.cost.out_bytes == 1024ull * 3072 * 2);

    // A tied layer owns no parameters but still reads its weights.
    const OpResult tied = eval1(LinearOp{768, 50257, false, std::size_t{0}}, {1024, 768}, DType::bf16);
    CHECK(tied.cost.params == 0);
    CHECK(tied.cost.weight_bytes == 768ull * 50257 * 2);
}

TEST_CASE("linear rejects an input of the wrong width") {
    CHECK_THROWS_WITH_AS(eval1(LinearOp{40, 10, true, std::nullopt}, {50}),
                         "in_features 40 does not match the input's last dimension 50 (input shape [50])", ShapeError);
    CHECK_THROWS_AS(evaluate(LinearOp{40, 10, true, std::nullopt}, {{40}, {40}}, DType::fp32), ShapeError);
    CHECK_THROWS_AS(eval1(LinearOp{40, 10, true, std::nullopt}, {}), ShapeError);  // opaque input
}

TEST_CASE("sizes that overflow 64 bits are refused, not wrapped") {
    CHECK_THROWS_AS(eval1(LinearOp{1ull << 40, 1ull << 30, true, std::nullopt}, {1ull << 40}), OverflowError);
    CHECK_THROWS_AS(eval1(EmbeddingOp{1ull << 62, 1ull << 10, 0, 0}, {8}), OverflowError);
}

TEST_CASE("embedding with learned positions") {
    const OpResult r = eval1(EmbeddingOp{50257, 768, 1024, 1024}, {1024}, DType::bf16);
    CHECK(r.out_shape == Shape{1024, 768});
    CHECK(r.cost.params == (50257ull + 1024) * 768);
    CHECK(r.cost.fwd_flops == 0);
    CHECK(r.cost.out_bytes == 1024ull * 768 * 2);
    CHECK(r.cost.saved_bytes == 1024 * 4);
    CHECK_THROWS_AS(eval1(EmbeddingOp{100, 8, 512, 0}, {1024}), ShapeError);  // more tokens than positions
    CHECK_THROWS_AS(eval1(EmbeddingOp{100, 8, 0, 512}, {1024}), ShapeError);  // seq_len disagrees
}

TEST_CASE("norms and elementwise ops cost memory traffic, not FLOPs") {
    const OpResult ln = eval1(NormOp{NormKind::layernorm, 0, true}, {1024, 768}, DType::bf16);
    CHECK(ln.cost.params == 2 * 768);
    CHECK(ln.cost.fwd_flops == 0);
    CHECK(ln.cost.saved_bytes == 1024ull * 768 * 2 + 1024 * 8);
    CHECK(ln.cost.fwd_mem_bytes == 2ull * 1024 * 768 * 2);
    const OpResult rms = eval1(NormOp{NormKind::rmsnorm, 4096, true}, {8, 4096});
    CHECK(rms.cost.params == 4096);  // no bias, whatever `bias` says
    CHECK_THROWS_AS(eval1(NormOp{NormKind::rmsnorm, 4096, true}, {8, 1024}), ShapeError);

    const OpResult relu = eval1(ElementwiseOp{Elementwise::relu}, {64, 10, 10});
    CHECK(relu.out_shape == Shape{64, 10, 10});
    CHECK(relu.cost.params == 0);
    CHECK(relu.cost.saved_bytes == 6400 * 4);
    const OpResult dropout = eval1(ElementwiseOp{Elementwise::dropout}, {4096});
    CHECK(dropout.cost.saved_bytes == 4096);  // a byte of mask per element

    const OpResult bn = eval1(BatchNormOp{0}, {64, 8, 8});
    CHECK(bn.cost.params == 128);
    CHECK_THROWS_AS(eval1(BatchNormOp{32}, {64, 8, 8}), ShapeError);
}

TEST_CASE("attention: multi-head and grouped-query") {
    // Llama-3-8B: hidden 4096, 32 heads, 8 KV heads, no biases.
    const OpResult gqa = eval1(AttentionOp{4096, 32, 8, 128, 0, true, false, false}, {8192, 4096}, DType::bf16);
    CHECK(gqa.cost.params == 4096ull * (4096 + 2 * 1024) + 4096ull * 4096);
    CHECK(gqa.cost.params == 41943040);
    const std::uint64_t s = 8192, h = 4096;
    CHECK(gqa.cost.fwd_flops == 2 * s * h * (h + 2048) + 4 * s * s * h + 2 * s * h * h);
    CHECK(gqa.cost.bwd_flops == 2 * gqa.cost.fwd_flops);

    // GPT-2: biases on all projections.
    const OpResult mha = eval1(AttentionOp{768, 12, 12, 64, 1024, true, true, true}, {1024, 768}, DType::bf16);
    CHECK(mha.cost.params == 768ull * 2304 + 2304 + 768ull * 768 + 768);

    CHECK_THROWS_AS(eval1(AttentionOp{768, 12, 12, 64, 512, true, true, true}, {1024, 768}), ShapeError);
    CHECK_THROWS_AS(eval1(AttentionOp{768, 12, 5, 64, 0, true, true, true}, {1024, 768}), ShapeError);
    CHECK_THROWS_AS(eval1(AttentionOp{768, 12, 12, 64, 0, true, true, true}, {768}), ShapeError);
}

TEST_CASE("mlp: plain and gated") {
    const OpResult plain = eval1(MlpOp{768, 3072, MlpKind::plain, Activation::gelu, true}, {1024, 768});
    CHECK(plain.cost.params == 2ull * 768 * 3072 + 3072 + 768);
    CHECK(plain.cost.fwd_flops == 4ull * 1024 * 768 * 3072);
    const OpResult gated = eval1(MlpOp{4096, 14336, MlpKind::gated, Activation::silu, false}, {8192, 4096});
    CHECK(gated.cost.params == 3ull * 4096 * 14336);
    CHECK(gated.cost.fwd_flops == 6ull * 8192 * 4096 * 14336);
    CHECK(gated.cost.saved_bytes == 8192ull * (4096 + 3 * 14336) * 4);
}

TEST_CASE("a transformer block's forward FLOPs equal Megatron-LM's 24bsh^2 + 4bs^2h") {
    for (std::uint64_t s : {128ull, 1024ull, 2048ull}) {
        const std::uint64_t h = 768;
        const OpResult r = eval1(gpt2_block(s), {s, 768}, DType::bf16);
        CHECK(r.cost.fwd_flops == 24 * s * h * h + 4 * s * s * h);  // b = 1: per sample
        CHECK(r.cost.bwd_flops == 2 * r.cost.fwd_flops);
    }
    // Llama-3-70B's block with grouped-query attention and a gated MLP, by parts.
    TransformerBlockOp llama;
    llama.attention = AttentionOp{8192, 64, 8, 128, 0, true, false, false};
    llama.mlp = MlpOp{8192, 28672, MlpKind::gated, Activation::silu, false};
    llama.norm = NormKind::rmsnorm;
    const OpResult r = eval1(llama, {8192, 8192}, DType::bf16);
    CHECK(r.cost.params == 855654400);  // published: (70,553,706,496 - 2 x 1,050,673,152 - 8192) / 80
}

TEST_CASE("a transformer block keeps 32sh + 2as^2 bytes of bf16 activations (Korthikanti et al., no dropout)") {
    const std::uint64_t s = 1024, h = 768, a = 12;
    const OpResult r = eval1(gpt2_block(s), {s, h}, DType::bf16);
    // sh(34 + 5as/h) of Korthikanti's count less what dropout keeps (2sh of masks, the as^2
    // mask and the 2as^2 output of attention's dropout): 32sh + 2as^2 (the softmax's output,
    // which dpart run's materialised attention keeps), plus the fp32 statistics of two
    // layernorms (8 B per row each).
    CHECK(r.cost.saved_bytes == 32 * s * h + 2 * a * s * s + 2 * 8 * s);
    CHECK(r.cost.out_bytes == s * h * 2);
    // Backward at its fullest, while attention's runs: dY, the MLP's dX, the second norm's dX,
    // then attention's dO, dP, dQ, dK, dV and dX (2 bytes each).
    CHECK(r.cost.workspace_bytes == 2 * (s * h * 3 + s * h * 5 + a * s * s));
    // A fused (flash) kernel keeps an fp32 log-sum-exp per row and head instead of the
    // probabilities (Korthikanti's 32sh without dropout), and holds no gradient of them.
    CHECK(r.cost.saved_bytes - r.cost.fused_saved_less == 32 * s * h + 2 * 8 * s + 4 * s * a);
    CHECK(r.cost.workspace_bytes - r.cost.fused_workspace_less == 2 * 8 * s * h);
}

TEST_CASE("conv2d and pooling follow the output-size formula") {
    // VGG-16 conv1_1: 3 -> 64, 3x3, padding 1, on 224 x 224.
    const OpResult c = eval1(Conv2dOp{3, 64, 3, 3, 1, 1, 1, true}, {3, 224, 224});
    CHECK(c.out_shape == Shape{64, 224, 224});
    CHECK(c.cost.params == 64 * 27 + 64);
    CHECK(c.cost.fwd_flops == 2ull * 64 * 224 * 224 * 27);
    // Strided, grouped, no bias: ResNet-style 7x7 stride 2 padding 3.
    const OpResult s = eval1(Conv2dOp{4, 8, 7, 7, 2, 3, 2, false}, {4, 224, 224});
    CHECK(s.out_shape == Shape{8, 112, 112});
    CHECK(s.cost.params == 8 * 2 * 49);
    CHECK_THROWS_AS(eval1(Conv2dOp{3, 64, 5, 5, 1, 0, 1, true}, {3, 4, 4}), ShapeError);   // kernel too large
    CHECK_THROWS_AS(eval1(Conv2dOp{3, 64, 3, 3, 1, 1, 1, true}, {4, 8, 8}), ShapeError);   // channels
    CHECK_THROWS_AS(eval1(Conv2dOp{3, 64, 3, 3, 1, 1, 2, true}, {3, 8, 8}), ShapeError);   // groups

    CHECK(eval1(PoolOp{PoolKind::max, 2, 2, 0, false}, {64, 224, 224}).out_shape == Shape{64, 112, 112});
    CHECK(eval1(PoolOp{PoolKind::max, 3, 2, 1, false}, {64, 112, 112}).out_shape == Shape{64, 56, 56});
    CHECK(eval1(PoolOp{PoolKind::avg, 0, 0, 0, true}, {512, 7, 7}).out_shape == Shape{512, 1, 1});
    CHECK(eval1(FlattenOp{}, {512, 7, 7}).out_shape == Shape{25088});
}

TEST_CASE("add, concat and the loss") {
    const OpResult add = evaluate(AddOp{}, {{16, 8, 8}, {16, 8, 8}}, DType::fp32);
    CHECK(add.out_shape == Shape{16, 8, 8});
    CHECK_THROWS_WITH_AS(evaluate(AddOp{}, {{16, 8, 8}, {8, 8, 8}}, DType::fp32),
                         "input 2 has shape [8, 8, 8] but input 1 has [16, 8, 8]: add needs equal shapes", ShapeError);
    CHECK_THROWS_AS(evaluate(AddOp{}, {{16}}, DType::fp32), ShapeError);

    CHECK(evaluate(ConcatOp{0}, {{16, 8, 8}, {32, 8, 8}}, DType::fp32).out_shape == Shape{48, 8, 8});
    CHECK_THROWS_AS(evaluate(ConcatOp{0}, {{16, 8, 8}, {32, 4, 8}}, DType::fp32), ShapeError);
    CHECK_THROWS_AS(evaluate(ConcatOp{3}, {{16, 8, 8}, {16, 8, 8}}, DType::fp32), ShapeError);

    const OpResult loss = eval1(SoftmaxXentOp{0}, {1024, 50257}, DType::bf16);
    CHECK(loss.out_shape == Shape{1});
    CHECK(loss.cost.out_bytes == 4);
    CHECK(loss.cost.fwd_flops == 0);
    CHECK_THROWS_AS(eval1(SoftmaxXentOp{10}, {1000}), ShapeError);
}

TEST_CASE("custom layers carry their given costs") {
    CustomOp c;
    c.fwd_flops = 2000000000;
    c.bwd_flops = 4000000000;
    c.params = 1000000;
    c.out_bytes = 65536;
    c.saved_bytes = 65536;
    const OpResult r = evaluate(c, {{}}, DType::fp32);
    CHECK(r.out_shape.empty());
    CHECK(r.cost.fwd_flops == 2000000000);
    CHECK(r.cost.params == 1000000);
    CHECK(r.cost.weight_bytes == 4000000);
    c.out_shape = {1000};
    CHECK_THROWS_AS(evaluate(c, {{}}, DType::fp32), ShapeError);  // 1000 x 4 B is not 65536 B
    c.out_shape = {16384};
    CHECK(evaluate(c, {{}}, DType::fp32).out_shape == Shape{16384});
}

TEST_CASE("the model input a first layer implies") {
    CHECK(implied_input_shape(LinearOp{100, 50, true, std::nullopt}) == Shape{100});
    CHECK(implied_input_shape(EmbeddingOp{10, 4, 0, 16}) == Shape{16});
    CHECK(implied_input_shape(EmbeddingOp{10, 4, 0, 0}).empty());
    CHECK(implied_input_shape(Conv2dOp{3, 8, 3, 3, 1, 1, 1, true}).empty());
}
