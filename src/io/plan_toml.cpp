#include "dpart/io/plan_toml.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <unordered_map>

#include "dpart/core/strings.hpp"
#include "dpart/io/toml_reader.hpp"

namespace dpart {

namespace {


double utilisation(const StageEstimate& e, const Plan& plan, const PlanEstimate& est) {
    return static_cast<double>(plan.microbatches) * (e.forward_s + e.backward_s) / est.iteration_s;
}

}  // namespace

std::string plan_toml(const Plan& plan, const PlanEstimate& est, const Model& model, const Cluster& cluster,
                      const Meta& meta, std::string_view strategy) {
    std::string out = meta_toml(meta);
    out += "[plan]\n";
    out += fmt::format("objective = {}\n", toml_string(std::string(to_string(plan.objective))));
    out += fmt::format("schedule = {}\n", toml_string(std::string(to_string(plan.schedule))));
    out += fmt::format("microbatch_size = {}\n", plan.microbatch_size);
    out += fmt::format("microbatches = {}\n", plan.microbatches);
    if (plan.recompute) out += "recompute = true  # activation checkpointing: dpart run recomputes\n";
    if (plan.shard_optimizer) out += "shard_optimizer = true  # ZeRO-1: each replica keeps its part of the optimizer state\n";
    if (plan.fused_attention) out += "fused_attention = true  # memory of fused attention kernels (dpart run materialises)\n";
    if (plan.vocab_parallel) out += "vocab_parallel = true  # a vocabulary-parallel embedding and loss (dpart run's are whole)\n";
    if (plan.precision)
        out += fmt::format("precision = {}  # planned for dpart run computing in it, with the training state it keeps\n",
                           toml_string(std::string(to_string(*plan.precision))));
    out += fmt::format("predicted_iteration_ms = {}\n", ms_text(est.iteration_s));
    out += fmt::format("predicted_bottleneck_ms = {}\n", ms_text(est.bottleneck_s));
    out += fmt::format("predicted_samples_per_s = {:.6g}\n", est.samples_per_s);
    out += fmt::format("bubble_fraction = {:.6g}\n", est.bubble_fraction);
    out += fmt::format("bottleneck_stage = {}\n", est.bottleneck_stage);
    out += fmt::format("strategy = {}\n", toml_string(std::string(strategy)));
    for (std::size_t s = 0; s < plan.stages.size(); ++s) {
        const Stage& st = plan.stages[s];
        const StageEstimate& e = est.stages[s];
        out += "\n[[stage]]\n";
        out += fmt::format("first_layer = {}  # {}\n", st.first_layer, model.layers[st.first_layer].name);
        out += fmt::format("last_layer = {}  # {}\n", st.last_layer, model.layers[st.last_layer].name);
        std::string devices = "[";
        for (std::size_t i = 0; i < st.devices.size(); ++i)
            devices += (i ? ", " : "") + toml_string(cluster.devices[st.devices[i]].name);
        out += fmt::format("devices = {}]\n", devices);
        out += fmt::format("tp = {}\n", st.tp);
        out += fmt::format("replicas = {}\n", st.replicas());
        out += fmt::format("predicted_ms = {}\n", ms_text(e.stage_s));
        out += fmt::format("forward_ms = {}\n", ms_text(e.forward_s));
        out += fmt::format("backward_ms = {}\n", ms_text(e.backward_s));
        out += fmt::format("send_activation_ms = {}\n", ms_text(e.send_activation_s));
        out += fmt::format("send_gradient_ms = {}\n", ms_text(e.send_gradient_s));
        out += fmt::format("allreduce_ms = {}\n", ms_text(e.allreduce_s));
        out += fmt::format("optimizer_ms = {}\n", ms_text(e.optimizer_s));
        out += fmt::format("memory_bytes = {}\n", e.memory.total());
        out += fmt::format("memory_capacity_bytes = {}\n", e.capacity_bytes);
        out += fmt::format("utilisation = {:.4f}\n", utilisation(e, plan, est));
    }
    return out;
}

std::string pipedream_plan_toml(const PipeDreamResult& r, const PipeDreamOptions& o, const Model& model,
                                const Meta& meta) {
    auto ms = [](double seconds) { return fmt::format("{:.12g}", seconds * 1e3); };
    std::string out = meta_toml(meta);
    out += "[plan]\n";
    out += "cost_model = \"pipedream\"\n";
    out += "objective = \"throughput\"\n";
    out += "schedule = \"1f1b\"\n";
    out += fmt::format("microbatch_size = {}\n", model.global_batch);
    out += "microbatches = 1\n";
    out += fmt::format("workers = {}\n", o.workers);
    out += fmt::format("bandwidth_bytes = {}\n", o.bandwidth);
    out += fmt::format("straight_pipeline = {}\n", o.straight_pipeline ? "true" : "false");
    if (o.memory_bytes) out += fmt::format("memory_bytes = {}\n", *o.memory_bytes);
    out += fmt::format("predicted_bottleneck_ms = {}\n", ms(r.plan_bottleneck_s));
    out += fmt::format("pipedream_time_per_stage_ms = {}\n", ms(r.time_per_stage_s));
    out += fmt::format("single_stage_ms = {}\n", ms(r.single_stage_s));
    out += fmt::format("data_parallel_ms = {}\n", ms(r.data_parallel_s));
    out += fmt::format("pipedream_states = {}\n", r.states);
    out += "strategy = \"pipedream\"\n";
    std::size_t worker = 0;
    for (const PipeDreamStage& st : r.stages) {
        out += "\n[[stage]]\n";
        out += fmt::format("first_layer = {}  # {}\n", st.first_layer, model.layers[st.first_layer].name);
        out += fmt::format("last_layer = {}  # {}\n", st.last_layer, model.layers[st.last_layer].name);
        std::string devices;
        for (std::size_t i = 0; i < st.replicas; ++i) devices += fmt::format("{}\"worker{}\"", i ? ", " : "", worker++);
        out += fmt::format("devices = [{}]\n", devices);
        out += "tp = 1\n";
        out += fmt::format("replicas = {}\n", st.replicas);
        out += fmt::format("pipedream_states = [{}, {}]\n", st.first_state, st.end_state);
        out += fmt::format("predicted_ms = {}\n", ms(std::max({st.time_s, st.input_transfer_s, st.output_transfer_s})));
        out += fmt::format("compute_ms = {}\n", ms(st.compute_s));
        out += fmt::format("stage_ms = {}\n", ms(st.time_s));
        out += fmt::format("input_transfer_ms = {}\n", ms(st.input_transfer_s));
        out += fmt::format("output_transfer_ms = {}\n", ms(st.output_transfer_s));
        out += fmt::format("parameter_bytes = {}\n", st.parameter_bytes);
    }
    return out;
}

namespace {

Plan read_plan(const toml::table& root, const std::string& path, const Model& model, const Cluster& cluster) {
    TableReader top(root, path, "");
    (void)top.optional_table("meta");  // provenance: free-form, not checked
    const toml::table* plan_table = top.optional_table("plan");
    const toml::array* stages = top.optional_table_array("stage");
    top.finish();
    if (plan_table == nullptr) throw InputError(SourceLocation{path}, "missing the [plan] table");
    if (stages == nullptr) throw InputError(SourceLocation{path}, "the plan has no [[stage]] tables");

    Plan plan;
    TableReader p(*plan_table, path, "[plan]");
    const auto* cost_model = plan_table->get_as<std::string>("cost_model");
    if (cost_model != nullptr && cost_model->get() == "pipedream")
        p.fail("cost_model", "a plan of PipeDream's cost model (dpart plan --cost-model pipedream) is a record of its "
                             "prediction: its replicas take whole minibatches in turn, which dpart's schedules do not; "
                             "plan with a --cluster to replay or run");
    p.expect({"predicted_iteration_ms", "predicted_bottleneck_ms", "predicted_samples_per_s", "bubble_fraction",
              "bottleneck_stage", "strategy"});
    plan.where = p.where();
    plan.objective = p.choice("objective", {"iteration", "throughput"}, "") == "throughput" ? Objective::throughput
                                                                                            : Objective::iteration;
    plan.schedule = p.choice("schedule", {"1f1b", "gpipe"}, "") == "gpipe" ? ScheduleKind::gpipe
                                                                          : ScheduleKind::one_f_one_b;
    plan.microbatch_size = p.required_count("microbatch_size");
    plan.microbatches = p.required_count("microbatches");
    plan.recompute = p.optional_bool("recompute", false);
    plan.shard_optimizer = p.optional_bool("shard_optimizer", false);
    plan.fused_attention = p.optional_bool("fused_attention", false);
    plan.vocab_parallel = p.optional_bool("vocab_parallel", false);
    if (p.optional_string("precision")) plan.precision = parse_dtype(p.choice("precision", {"fp32", "bf16"}, ""));
    p.finish();

    std::unordered_map<std::string, std::size_t> device_index;
    for (std::size_t d = 0; d < cluster.devices.size(); ++d) device_index.emplace(cluster.devices[d].name, d);
    for (std::size_t s = 0; s < stages->size(); ++s) {
        TableReader r(*stages->get(s)->as_table(), path, fmt::format("stage {}", s));
        r.expect({"replicas", "predicted_ms", "forward_ms", "backward_ms", "send_activation_ms", "send_gradient_ms",
                  "allreduce_ms", "optimizer_ms", "memory_bytes", "memory_capacity_bytes", "utilisation"});
        Stage st;
        st.where = r.where();
        st.first_layer = r.optional_count("first_layer", 0, true);
        if (!r.has("first_layer")) r.missing("first_layer");
        st.last_layer = r.optional_count("last_layer", 0, true);
        if (!r.has("last_layer")) r.missing("last_layer");
        if (st.last_layer >= model.layers.size())
            r.fail("last_layer", fmt::format("last_layer {} is past the model's last layer {}", st.last_layer,
                                             model.layers.size() - 1));
        std::vector<SourceLocation> where;
        const auto names = r.optional_string_array("devices", &where);
        if (!names) r.missing("devices");
        if (names->empty()) r.fail("devices", "a stage needs at least one device");
        for (std::size_t i = 0; i < names->size(); ++i) {
            auto it = device_index.find((*names)[i]);
            if (it == device_index.end()) {
                std::vector<std::string> all;
                if (cluster.devices.size() <= 4096)
                    for (const auto& d : cluster.devices) all.push_back(d.name);
                throw InputError(where[i], fmt::format("stage {}: device \"{}\" is not in cluster \"{}\"{}", s,
                                                       (*names)[i], cluster.name, did_you_mean((*names)[i], all)));
            }
            st.devices.push_back(it->second);
        }
        const std::uint64_t tp = r.required_count("tp");
        if (tp > st.devices.size())
            r.fail("tp", fmt::format("tp {} is more than the stage's {} devices", tp, st.devices.size()));
        st.tp = static_cast<std::uint32_t>(tp);
        r.finish();
        plan.stages.push_back(std::move(st));
    }
    validate_plan(plan, model, cluster);
    return plan;
}

}  // namespace

Plan load_plan(const std::string& path, const Model& model, const Cluster& cluster) {
    return read_plan(parse_toml_file(path), path, model, cluster);
}

Plan parse_plan(std::string_view text, const std::string& path, const Model& model, const Cluster& cluster) {
    return read_plan(parse_toml_text(text, path), path, model, cluster);
}

const std::vector<std::string>& stage_csv_columns() {
    static const std::vector<std::string> columns{
        "stage",        "first_layer",  "last_layer",  "first_name",   "last_name",     "devices",
        "replicas",     "tp",           "forward_ms",  "backward_ms",  "send_activation_ms", "send_gradient_ms",
        "allreduce_ms", "optimizer_ms", "stage_ms",    "memory_bytes", "capacity_bytes", "utilisation",
        "bottleneck"};
    return columns;
}

CsvTable stage_csv(const Plan& plan, const PlanEstimate& est, const Model& model, const Cluster& cluster) {
    CsvTable csv(stage_csv_columns());
    for (std::size_t s = 0; s < plan.stages.size(); ++s) {
        const Stage& st = plan.stages[s];
        const StageEstimate& e = est.stages[s];
        std::string devices;
        for (std::size_t i = 0; i < st.devices.size(); ++i) devices += (i ? " " : "") + cluster.devices[st.devices[i]].name;
        csv.add_row({std::to_string(s), std::to_string(st.first_layer), std::to_string(st.last_layer),
                     model.layers[st.first_layer].name, model.layers[st.last_layer].name, devices,
                     std::to_string(st.replicas()), std::to_string(st.tp), ms_text(e.forward_s), ms_text(e.backward_s),
                     ms_text(e.send_activation_s), ms_text(e.send_gradient_s), ms_text(e.allreduce_s), ms_text(e.optimizer_s),
                     ms_text(e.stage_s), std::to_string(e.memory.total()), std::to_string(e.capacity_bytes),
                     fmt::format("{:.4f}", utilisation(e, plan, est)), s == est.bottleneck_stage ? "1" : "0"});
    }
    return csv;
}

}  // namespace dpart
