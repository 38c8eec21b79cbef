#include <doctest/doctest.h>

#include "dpart/io/cluster_toml.hpp"
#include "dpart/io/model_toml.hpp"
#include <fmt/format.h>

#include "dpart/graph/ops.hpp"
#include "dpart/io/plan_toml.hpp"
#include "dpart/plan/estimate.hpp"
#include "dpart/plan/solver.hpp"
#include "dpart/sim/simulator.hpp"

using namespace dpart;

namespace {
const std::string plans_dir = std::string(DPART_SOURCE_DIR) + "/plans/";
}

TEST_CASE("a microbatch is shared among replicas in proportion to their speed") {
    CHECK(replica_shares(8, {1, 1}) == std::vector<std::uint64_t>{4, 4});
    CHECK(replica_shares(7, {1, 1}) == std::vector<std::uint64_t>{4, 3});
    CHECK(replica_shares(10, {3, 1}) == std::vector<std::uint64_t>{7, 3});  // 1 each + 8 split 6:2
    CHECK(replica_shares(3, {1, 1, 1, 1}).empty());                          // a replica would get nothing
    CHECK(replica_shares(4, {801, 250, 250, 250}) == std::vector<std::uint64_t>{1, 1, 1, 1});
}

TEST_CASE("cut bytes include skip connections") {
    const Model m = load_model(plans_dir + "models/resnet-block.toml");
    const auto cuts = cut_bytes(m);
    // Between conv2 and conv3, both relu1 (for the residual add) and relu2 (for conv3) are live.
    const std::size_t conv3 = *m.find("conv3");
    const std::size_t relu1 = *m.find("relu1");
    CHECK(cuts[conv3] == m.layers[conv3 - 1].cost.out_bytes + m.layers[relu1].cost.out_bytes);
    CHECK(cuts[0] == 0);
    CHECK(cuts[m.layers.size()] == 0);
    CHECK(cuts[1] == m.layers[0].cost.out_bytes);
}

TEST_CASE("stage memory: training state plus activations of the microbatches in flight") {
    const Model m = load_model(plans_dir + "models/gpt2-small.toml");
    StageMemoryInput in{1, 2, 1, 1, 2, 3};  // two blocks, 2 samples, 3 microbatches in flight
    const StageMemory mem = stage_memory(m, in, {});
    CHECK(mem.params == 2 * 7087872ull);
    CHECK(mem.state_bytes == 2 * 7087872ull * 16);
    CHECK(mem.activation_bytes == 3 * 2 * 2 * m.layers[1].cost.saved_bytes);
    CostOptions sharded;
    sharded.shard_optimizer = true;
    in.replicas = 4;
    CHECK(stage_memory(m, in, sharded).state_bytes == 2 * 7087872ull * (4 + 3));  // 12 B of Adam over 4
    CostOptions rc;
    rc.recompute = true;
    const auto cuts = cut_bytes(m);
    CHECK(stage_memory(m, in, rc).activation_bytes == 3 * 2 * cuts[1] + 2 * 2 * m.layers[1].cost.saved_bytes);
    // A tied head on its own stage keeps a copy of the embedding's weights.
    StageMemoryInput head{14, 15, 1, 1, 1, 1};
    CHECK(stage_memory(m, head, {}).params == 50257ull * 768);
    // ...on its embedding's stage too (dpart run's kernels hold one each), and whole on every
    // tensor-parallel rank (the kernels do not split a tied head).
    StageMemoryInput whole{0, 15, 1, 1, 1, 1};
    std::uint64_t owned = 0;
    for (const Layer& l : m.layers) owned += l.cost.params;
    CHECK(stage_memory(m, whole, {}).params == owned + 50257ull * 768);
    StageMemoryInput head_tp{14, 15, 2, 1, 1, 1};
    CHECK(stage_memory(m, head_tp, {}).params == 50257ull * 768);
    CHECK_FALSE(tp_splits(m.layers[14].op));
    CHECK(in_flight(ScheduleKind::one_f_one_b, 0, 4, 8) == 4);
    CHECK(in_flight(ScheduleKind::one_f_one_b, 3, 4, 8) == 1);
    CHECK(in_flight(ScheduleKind::one_f_one_b, 0, 4, 2) == 2);
    CHECK(in_flight(ScheduleKind::gpipe, 3, 4, 8) == 8);
}

TEST_CASE("stage memory: the largest layer's workspace, tensor parallelism on inner tensors only, fused attention") {
    const Model m = load_model(plans_dir + "models/gpt2-small.toml");
    const Layer& block = m.layers[1];
    const std::uint64_t s = 1024, h = 768, a = 12, e = 2;
    StageMemoryInput in{1, 2, 1, 1, 2, 3};  // two blocks, 2 samples, 3 microbatches in flight
    const StageMemory mem = stage_memory(m, in, {});
    CHECK(mem.workspace_bytes == 2 * block.cost.workspace_bytes);  // one layer's at a time, for the share
    CHECK(mem.total() == mem.state_bytes + mem.activation_bytes + mem.workspace_bytes);
    // Tensor parallelism divides the heads' and the MLP's inner tensors; each rank keeps the
    // block's input, both norms' tensors and the inputs of attention and the MLP whole.
    const std::uint64_t whole = 2 * (s * h * e + 8 * s) + 2 * s * h * e;
    CHECK(block.cost.saved_bytes - block.cost.tp_saved_bytes == whole);
    StageMemoryInput tp2 = in;
    tp2.tp = 2;
    CHECK(stage_memory(m, tp2, {}).activation_bytes == 3 * 2 * 2 * (whole + block.cost.tp_saved_bytes / 2));
    // Each rank holds whole dY and dX, and its heads' and inner units' gradients: while
    // attention's backward runs, 3 x dY-sized (dY, the MLP's and the norm's dX), attention's dX
    // and half of dO, dQ, dK, dV and the probabilities' gradient.
    CHECK(stage_memory(m, tp2, {}).workspace_bytes == 2 * 2 * (6 * s * h + a / 2 * s * s));
    // Fused attention keeps an fp32 log-sum-exp per row and head instead of the probabilities,
    // and holds no gradient of them: Korthikanti's 32sh (no dropout, flash) and 2 x 8sh.
    CostOptions fused;
    fused.fused_attention = true;
    const StageMemory f = stage_memory(m, in, fused);
    CHECK(f.activation_bytes == 3 * 2 * 2 * (32 * s * h + 16 * s + 4 * s * a));
    CHECK(f.workspace_bytes == 2 * 2 * (8 * s * h));
    CHECK(stage_memory(m, tp2, fused).activation_bytes ==
          3 * 2 * 2 * (whole + (block.cost.tp_saved_bytes - block.cost.fused_saved_less) / 2));
    CHECK(stage_memory(m, tp2, fused).workspace_bytes == 2 * 2 * (6 * s * h));
    // A split linear layer (untied head) also holds its own columns of dY.
    CHECK(split_workspace_bytes(LinearOp{768, 1000, true, std::nullopt}, {1024, 1000}, DType::bf16, 4, false) ==
          1024 * (768 + 1000 + 250) * 2);
    // On one rank, the op library's own figures, for every layer of the bundled models.
    for (const char* name : {"gpt2-small", "llama3-8b", "tiny-mixtral", "tiny-gpt", "cpu-mlp"}) {
        const Model model = load_model(plans_dir + "models/" + name + ".toml");
        for (const Layer& l : model.layers) {
            CAPTURE(l.name);
            const auto one = split_workspace_bytes(l.op, l.out_shape, model.dtype, 1, false);
            if (!one) continue;
            CHECK(*one == l.cost.workspace_bytes);
            CHECK(*split_workspace_bytes(l.op, l.out_shape, model.dtype, 1, true) ==
                  l.cost.workspace_bytes - l.cost.fused_workspace_less);
        }
    }
    // Vocabulary-parallel (Megatron-LM's): the embedding's tables divided over the ranks; dpart
    // run's, and the default plan's, whole on every rank.
    StageMemoryInput embed{0, 0, 2, 1, 1, 1};
    CostOptions vocab;
    vocab.vocab_parallel = true;
    CHECK(stage_memory(m, embed, {}).params == m.layers[0].cost.params);
    CHECK(stage_memory(m, embed, vocab).params == m.layers[0].cost.params / 2);
    // ...and the tied head with it, and the loss's logits (each rank its classes').
    CHECK(tp_splits(m.layers[14].op, true));
    StageMemoryInput head2{14, 15, 2, 1, 1, 1};
    CHECK(stage_memory(m, head2, vocab).params == 50257ull * 768 / 2);
    const Layer& loss = m.layers[15];
    CHECK(saved_per_rank(loss, 2, false, true) == loss.cost.saved_bytes - loss.cost.tp_saved_bytes / 2);
    CHECK(saved_per_rank(loss, 2) == loss.cost.saved_bytes);
    // A plan solved for fused attention says so, and is estimated so.
    const Cluster c = load_cluster(plans_dir + "clusters/dgx-h100.toml");
    const AnalyticalCostModel cost(m, c, {});
    const SolveResult r = solve(m, c, cost, fused, {});
    CHECK(r.plan.fused_attention);
    const std::string text = plan_toml(r.plan, r.estimate, m, c, Meta{"dpart plan test", {}}, "optimal");
    CHECK(text.find("fused_attention = true") != std::string::npos);
    CHECK(parse_plan(text, "plan.toml", m, c) == r.plan);
    CostOptions both = fused;
    both.vocab_parallel = true;
    const SolveResult rv = solve(m, c, cost, both, {});
    CHECK(rv.plan.vocab_parallel);
    const std::string vtext = plan_toml(rv.plan, rv.estimate, m, c, Meta{"dpart plan test", {}}, "optimal");
    CHECK(vtext.find("vocab_parallel = true") != std::string::npos);
    CHECK(parse_plan(vtext, "plan.toml", m, c) == rv.plan);
    CHECK(estimate_plan(r.plan, m, c, cost, {}).stages[0].memory.total() == r.estimate.stages[0].memory.total());
    Plan materialised = r.plan;
    materialised.fused_attention = false;
    CHECK(estimate_plan(materialised, m, c, cost, {}).stages[0].memory.total() > r.estimate.stages[0].memory.total());
}

TEST_CASE("with recompute, a stage's backward runs its forward again; the planner counts it too") {
    const Model m = load_model(plans_dir + "models/gpt2-small.toml");
    const Cluster c = load_cluster(plans_dir + "clusters/dgx-h100.toml");
    const AnalyticalCostModel cost(m, c, {});
    CostOptions rc;
    rc.recompute = true;
    const SolveResult r = solve(m, c, cost, rc, {});
    Plan without = r.plan;
    without.recompute = false;
    const PlanEstimate plain = estimate_plan(without, m, c, cost, {});
    const PlanEstimate again = estimate_plan(without, m, c, cost, rc);
    REQUIRE(again.stages.size() == plain.stages.size());
    for (std::size_t s = 0; s < again.stages.size(); ++s) {
        CHECK(again.stages[s].forward_s == plain.stages[s].forward_s);
        CHECK(again.stages[s].backward_s == doctest::Approx(plain.stages[s].backward_s + plain.stages[s].forward_s));
    }
    CHECK(again.iteration_s > plain.iteration_s);
    // What the solver reported for its plan is the estimate with recompute.
    CHECK(r.estimate.iteration_s == doctest::Approx(again.iteration_s));
    // The plan says so, in plan.toml too, and is estimated with it whatever the caller's options.
    CHECK(r.plan.recompute);
    const std::string text = plan_toml(r.plan, again, m, c, Meta{"dpart plan test", {}}, "optimal");
    CHECK(text.find("recompute = true") != std::string::npos);
    const Plan back = parse_plan(text, "plan.toml", m, c);
    CHECK(back.recompute);
    CHECK(estimate_plan(back, m, c, cost, {}).iteration_s == again.iteration_s);
    CHECK(estimate_plan(r.plan, m, c, cost, {}).iteration_s == again.iteration_s);
}

TEST_CASE("with a sharded optimizer, each replica steps its part; the plan says so and is estimated with it") {
    CHECK(optimizer_params(10, 3, true) == 4);
    CHECK(optimizer_params(10, 3, false) == 10);
    CHECK(optimizer_params(10, 1, true) == 10);
    const Model m = load_model(plans_dir + "models/gpt2-small.toml");
    const Cluster c = load_cluster(plans_dir + "clusters/dgx-h100.toml");
    const AnalyticalCostModel cost(m, c, {});
    // Every layer on all eight GPUs as replicas.
    Plan dp;
    dp.microbatch_size = m.global_batch;
    dp.microbatches = 1;
    Stage st;
    st.first_layer = 0;
    st.last_layer = m.layers.size() - 1;
    for (std::size_t d = 0; d < 8; ++d) st.devices.push_back(d);
    dp.stages.push_back(st);
    CostOptions zero;
    zero.shard_optimizer = true;
    const PlanEstimate whole = estimate_plan(dp, m, c, cost, {});
    const PlanEstimate parts = estimate_plan(dp, m, c, cost, zero);
    CHECK(parts.stages[0].optimizer_s == doctest::Approx(whole.stages[0].optimizer_s / 8).epsilon(1e-6));
    CHECK(parts.stages[0].allreduce_s == whole.stages[0].allreduce_s);  // reduce-scatter + all-gather
    CHECK(parts.stages[0].memory.state_bytes < whole.stages[0].memory.state_bytes);
    // A plan solved with it records it; read back, it is estimated with it.
    const SolveResult r = solve(m, c, cost, zero, {});
    CHECK(r.plan.shard_optimizer);
    const std::string text = plan_toml(r.plan, r.estimate, m, c, Meta{"dpart plan test", {}}, "optimal");
    CHECK(text.find("shard_optimizer = true") != std::string::npos);
    const Plan back = parse_plan(text, "plan.toml", m, c);
    CHECK(back.shard_optimizer);
    CHECK(back == r.plan);
    CHECK(estimate_plan(back, m, c, cost, {}).iteration_s == doctest::Approx(r.estimate.iteration_s));
    dp.shard_optimizer = true;
    CHECK(estimate_plan(dp, m, c, cost, {}).stages[0].optimizer_s == parts.stages[0].optimizer_s);
}

TEST_CASE("the training state as dpart run keeps it: what ZeRO-1 divides, the gradients' bytes, another dtype") {
    // The planner's default (mixed-precision Adam, bf16 model): bf16 weights and gradients kept
    // whole, 12 B of fp32 master weights and moments divided.
    const CostOptions planner;
    CHECK(state_bytes(1, planner, DType::bf16, 1) == 16);
    CHECK(state_bytes(1, planner, DType::fp32, 1) == 16);
    CostOptions zero = planner;
    zero.shard_optimizer = true;
    // Each replica the optimizer state of its part, ceil(params / replicas), as dpart run's parts.
    CHECK(state_bytes(1000, zero, DType::bf16, 4) == 1000 * 4 + 250 * 12);
    CHECK(state_bytes(1000, zero, DType::fp32, 4) == 1000 * 8 + 250 * 8);
    CHECK(state_bytes(1001, zero, DType::fp32, 4) == 1001 * 8 + 251 * 8);
    // Where the last replica's part would be empty, dpart run keeps the state whole.
    CHECK(state_bytes(10, zero, DType::fp32, 16) == 10 * 16);
    CHECK(optimizer_params(10, 16, true) == 10);
    CHECK(optimizer_params(10, 4, true) == 3);  // parts of 3: 3, 3, 3, 1
    CHECK(optimizer_params(9, 4, true) == 9);    // parts of 3: the fourth empty
    CHECK(state_bytes(1000, zero, DType::bf16, 1) == 16000);
    CHECK(state_bytes(UINT64_MAX / 4, planner, DType::bf16, 1) == UINT64_MAX);  // saturates
    CHECK(gradient_value_bytes(planner, DType::bf16) == 2);
    // dpart run in bf16: fp32 master weights, a bf16 compute copy and fp32 gradients whole (10 B),
    // the two moments divided; fp32 gradients summed.
    CostOptions run = zero;
    run.bytes_per_param = 18;
    run.replicated_bytes_per_param = 10;
    run.gradient_bytes = 4;
    CHECK(state_bytes(1000, run, DType::bf16, 2) == 1000 * 10 + 500 * 8);
    CHECK(gradient_value_bytes(run, DType::bf16) == 4);

    // A bf16 model priced in fp32 (dpart run --precision fp32): every activation twice the bytes,
    // the same FLOPs; the estimate's all-reduce moves the given gradient bytes.
    const Model bf16 = load_model(plans_dir + "models/gpt2-small.toml");
    const Model fp32 = with_dtype(bf16, DType::fp32);
    REQUIRE(fp32.layers.size() == bf16.layers.size());
    CHECK(fp32.dtype == DType::fp32);
    CHECK(with_dtype(fp32, DType::bf16).total() == bf16.total());  // and back, to the byte
    for (std::size_t l = 0; l < bf16.layers.size(); ++l) {
        CAPTURE(bf16.layers[l].name);
        CHECK(fp32.layers[l].cost.fwd_flops == bf16.layers[l].cost.fwd_flops);
        CHECK(fp32.layers[l].cost.params == bf16.layers[l].cost.params);
        if (l + 1 < bf16.layers.size())
            CHECK(fp32.layers[l].cost.out_bytes == 2 * bf16.layers[l].cost.out_bytes);
        else  // the loss: one fp32 value per sample in any dtype
            CHECK(fp32.layers[l].cost.out_bytes == bf16.layers[l].cost.out_bytes);
        CHECK(fp32.layers[l].cost.weight_bytes == 2 * bf16.layers[l].cost.weight_bytes);
        CHECK(fp32.layers[l].out_shape == bf16.layers[l].out_shape);
    }
    const Cluster c = load_cluster(plans_dir + "clusters/dgx-h100.toml");
    const AnalyticalCostModel cost(bf16, c, {});
    Plan dp;
    dp.microbatch_size = bf16.global_batch / 8;
    dp.microbatches = 8;
    Stage st;
    st.first_layer = 0;
    st.last_layer = bf16.layers.size() - 1;
    st.devices = {0, 1};
    dp.stages.push_back(st);
    CostOptions fp32_grads;
    fp32_grads.gradient_bytes = 4;
    const PlanEstimate two = estimate_plan(dp, bf16, c, cost, {});
    const PlanEstimate four = estimate_plan(dp, bf16, c, cost, fp32_grads);
    CHECK(four.stages[0].allreduce_s > 1.9 * two.stages[0].allreduce_s);
    CHECK(four.stages[0].memory.state_bytes == two.stages[0].memory.state_bytes);
    // A custom layer's given bytes scale with the element size.
    const Model custom = parse_model(R"(
[model]
name = "custom"
dtype = "bf16"
global_batch = 4
input_shape = [8]

[[layer]]
name = "x"
op = "custom"
params = 10
fwd_flops = 100
bwd_flops = 200
out_bytes = 16
saved_bytes = 6
workspace_bytes = 30
)",
                                     "custom.toml");
    const Model wide = with_dtype(custom, DType::fp32);
    CHECK(wide.layers[0].cost.out_bytes == 32);
    CHECK(wide.layers[0].cost.saved_bytes == 12);
    CHECK(wide.layers[0].cost.workspace_bytes == 60);
    CHECK(wide.layers[0].cost.weight_bytes == 40);
    CHECK(wide.layers[0].cost.fwd_flops == 100);
}

TEST_CASE("memory_shortfalls: a whole device, or a GPU's partitions pooled, that a plan over-fills") {
    const auto estimate = [](std::vector<std::uint64_t> bytes) {
        PlanEstimate e;
        for (std::uint64_t b : bytes) {
            StageEstimate st;
            st.memory.state_bytes = b;
            e.stages.push_back(st);
        }
        return e;
    };
    const auto plan = [](std::vector<std::vector<std::size_t>> devices) {
        Plan p;
        for (auto& d : devices) {
            Stage st;
            st.devices = d;
            p.stages.push_back(st);
        }
        return p;
    };
    // Four partitions of one GPU, 19.8 GiB each: one stage may use more than its partition's
    // share while the GPU's memory holds the plan's stages together.
    const Cluster parts = load_cluster(plans_dir + "clusters/h100-4partitions.toml");
    const std::uint64_t gpu = 4 * parts.devices[0].mem_bytes();
    CHECK(memory_shortfalls(plan({{0}, {1}}), estimate({30'000'000'000, 30'000'000'000}), parts).empty());
    const auto over = memory_shortfalls(plan({{0}, {1}}), estimate({50'000'000'000, 40'000'000'000}), parts);
    REQUIRE(over.size() == 1);
    CHECK(over[0].devices == std::vector<std::size_t>{0, 1, 2, 3});
    CHECK(over[0].needed == 90'000'000'000);
    CHECK(over[0].capacity == gpu);
    // Whole GPUs: each its own memory; a stage's replicas each need the stage's memory.
    const Cluster dgx = load_cluster(plans_dir + "clusters/dgx-h100.toml");
    const std::uint64_t one = dgx.devices[0].mem_bytes();
    CHECK(memory_shortfalls(plan({{0, 1}, {2}}), estimate({one, one}), dgx).empty());
    const auto whole = memory_shortfalls(plan({{0, 1}, {2}}), estimate({one, one + 1}), dgx);
    REQUIRE(whole.size() == 1);
    CHECK(whole[0].devices == std::vector<std::size_t>{2});
    CHECK(whole[0].needed == one + 1);
}

TEST_CASE("a plan survives plan.toml: written, read back, the same predictions") {
    const Model m = load_model(plans_dir + "models/llama3-8b.toml");
    const Cluster c = load_cluster(plans_dir + "clusters/hetero-3kinds.toml");
    const AnalyticalCostModel cost(m, c, {});
    const SolveResult r = solve(m, c, cost, {}, {});
    const std::string text = plan_toml(r.plan, r.estimate, m, c, Meta{"dpart plan test", {}}, "optimal");
    CHECK(text.rfind("[meta]\nschema = 1\n", 0) == 0);
    const Plan back = parse_plan(text, "plan.toml", m, c);
    CHECK(back == r.plan);
    const PlanEstimate again = estimate_plan(back, m, c, cost, {});
    CHECK(again.iteration_s == r.estimate.iteration_s);
    CHECK(again.bottleneck_s == r.estimate.bottleneck_s);
    for (std::size_t s = 0; s < again.stages.size(); ++s) {
        CHECK(again.stages[s].stage_s == r.estimate.stages[s].stage_s);
        CHECK(again.stages[s].memory.total() == r.estimate.stages[s].memory.total());
    }
    // The predicted figures printed in the file are the recomputed ones (to 6 digits).
    CHECK(text.find(fmt::format("predicted_iteration_ms = {:.6g}", again.iteration_s * 1e3)) != std::string::npos);
    // The stage CSV has its declared columns and a row per stage.
    const CsvTable csv = stage_csv(back, again, m, c);
    CHECK(csv.rows() == back.stages.size());
    CHECK(csv.columns().front() == "stage");
    // A plan for dpart run in a precision keeps it.
    for (const DType p : {DType::fp32, DType::bf16}) {
        Plan precise = r.plan;
        precise.precision = p;
        const Plan read = parse_plan(plan_toml(precise, r.estimate, m, c, Meta{"dpart plan test", {}}, "optimal"),
                                     "plan.toml", m, c);
        CHECK(read == precise);
        CHECK(read.precision == p);
        CHECK(read != r.plan);
    }
}

TEST_CASE("a hand-written plan with only the required fields is valid; mistakes are located") {
    const Model m = load_model(plans_dir + "models/seed-mlp.toml");
    const Cluster c = load_cluster(plans_dir + "clusters/cpu-local.toml");
    const std::string head = "[plan]\nobjective = \"iteration\"\nschedule = \"1f1b\"\nmicrobatch_size = 8\nmicrobatches = 8\n";
    const Plan p = parse_plan(head + "[[stage]]\nfirst_layer = 0\nlast_layer = 1\ndevices = [\"cpu0\"]\ntp = 1\n"
                                     "[[stage]]\nfirst_layer = 2\nlast_layer = 3\ndevices = [\"cpu1\"]\ntp = 1\n",
                              "p.toml", m, c);
    CHECK(p.stages.size() == 2);
    auto error_of = [&](const std::string& stages) {
        try {
            (void)parse_plan(head + stages, "p.toml", m, c);
        } catch (const InputError& e) {
            return std::string(e.what());
        }
        return std::string("no error");
    };
    CHECK(error_of("[[stage]]\nfirst_layer = 0\nlast_layer = 3\ndevices = [\"cpu7\"]\ntp = 1\n") ==
          "p.toml:9:12: stage 0: device \"cpu7\" is not in cluster \"cpu-local\" (did you mean \"cpu0\"?)");
    CHECK(error_of("[[stage]]\nfirst_layer = 0\nlast_layer = 1\ndevices = [\"cpu0\"]\ntp = 1\n"
                   "[[stage]]\nfirst_layer = 3\nlast_layer = 3\ndevices = [\"cpu1\"]\ntp = 1\n") ==
          "p.toml:11:1: stage 1: first_layer is 3 but the previous stage ends at layer 1 (stages must cover the "
          "layers in order, each once)");
    CHECK(error_of("[[stage]]\nfirst_layer = 0\nlast_layer = 3\ndevices = [\"cpu0\", \"cpu0\"]\ntp = 1\n")
              .find("device \"cpu0\" appears more than once") != std::string::npos);
    CHECK(error_of("[[stage]]\nfirst_layer = 0\nlast_layer = 2\ndevices = [\"cpu0\"]\ntp = 1\n") ==
          "p.toml:1:1: the stages end at layer 2 but the model has 4 layers");
    CHECK(error_of("[[stage]]\nfirst_layer = 0\nlast_layer = 3\ndevices = [\"cpu0\"]\ntp = 1\nspeed = 3\n") ==
          "p.toml:11:1: stage 0: unknown key \"speed\"");
}

TEST_CASE("stages placed A, B, A, B share the inter-node links; the prediction counts it") {
    const Model model = load_model(std::string(DPART_SOURCE_DIR) + "/plans/models/llama3-8b.toml");
    const Cluster cluster = load_cluster(std::string(DPART_SOURCE_DIR) + "/plans/clusters/h100-4x8.toml");
    const AnalyticalCostModel cost(model, cluster, {});
    Plan plan;
    plan.microbatch_size = 8;
    plan.microbatches = 128;
    // Nodes 0, 1, 0, 1: activations 0->1 and 2->3 both leave node 0 for node 1; the gradient
    // 1->0 and the activation 1->2 both leave node 1 for node 0.
    const std::size_t node_of_stage[] = {0, 1, 0, 1};
    const std::size_t ends[] = {9, 18, 27, 36};
    for (std::size_t s = 0, first = 0; s < 4; first = ends[s], ++s) {
        Stage st;
        st.first_layer = first;
        st.last_layer = ends[s] - 1;
        st.tp = 4;
        for (std::size_t d = 0; d < 4; ++d) st.devices.push_back(node_of_stage[s] * 8 + (s / 2) * 4 + d);
        plan.stages.push_back(st);
    }
    const PlanEstimate est = estimate_plan(plan, model, cluster, cost, {});
    CHECK(est.stages[0].activation_link == est.stages[2].activation_link);
    CHECK(est.stages[0].activation_link != private_link);
    CHECK(est.stages[1].gradient_link == est.stages[1].activation_link);
    CHECK(est.stages[3].gradient_link == est.stages[1].activation_link);  // 3 -> 2 is node 1 -> node 0 too
    // Without sharing, the same durations finish no later.
    std::vector<StageDurations> d;
    for (const StageEstimate& e : est.stages)
        d.push_back({e.forward_s, e.backward_s, e.send_activation_s, e.send_gradient_s, e.allreduce_s, e.optimizer_s});
    const double uncontended = simulate(build_schedule(plan.schedule, d, 128)).makespan;
    CHECK(est.iteration_s >= uncontended);  // equal here: the sends are short next to the compute
    // The simulator replays the same contended graph: an unperturbed replay is the prediction.
    const ReplayResult r = replay_static(plan, est, cluster, Scenario{}, 3);
    for (const IterationRecord& it : r.iterations) CHECK(it.iteration_s == doctest::Approx(est.iteration_s).epsilon(1e-12));
}
