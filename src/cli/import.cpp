// dpart import: models from elsewhere become model.toml files that inspect and plan accept as
// they are. `import hf` reads a Hugging Face config.json; `import pipedream` a PipeDream profile.
#include <fmt/format.h>

#include <memory>

#include "commands.hpp"
#include "dpart/core/format.hpp"
#include "dpart/io/atomic_file.hpp"
#include "dpart/io/hf_import.hpp"
#include "dpart/io/pipedream_import.hpp"

namespace dpart::cli {
namespace {

struct HfOptions {
    std::string config;
    std::string out;
    std::uint64_t seq_len = 0;
    std::uint64_t global_batch = 512;
    std::string dtype = "bf16";
    std::string name;
};

struct PipeDreamOptionsCli {
    std::string profile;
    std::string out;
    std::uint64_t batch = 1;
    std::string dtype = "fp32";
    std::string device = "pipedream-profile";
    double tflops = 0;
    std::string name;
};

/// The model file to `out` (atomically) with a one-line summary, or to stdout.
void emit(const std::string& toml, const std::string& out, const std::string& summary) {
    if (out.empty()) {
        fmt::print("{}", toml);
        return;
    }
    write_file_atomic(out, toml);
    fmt::print("{} -> {}\n", summary, out);
}

int run_hf(const HfOptions& o, const std::string& command) {
    HfImportOptions opt;
    opt.seq_len = o.seq_len;
    opt.global_batch = o.global_batch;
    opt.dtype = *parse_dtype(o.dtype);
    opt.name = o.name;
    Meta meta;
    meta.command_line = command;
    meta.extra = {{"source", o.config}, {"importer", "hf"}};
    const HfImport r = import_hf_config(o.config, opt, meta);
    emit(r.toml, o.out,
         fmt::format("{} ({}): {} layers, {} parameters", r.model_type,
                     r.architecture.empty() ? "no architectures entry" : r.architecture, r.model.layers.size(),
                     with_commas(r.model.total().params)));
    return 0;
}

int run_pipedream(const PipeDreamOptionsCli& o, const std::string& command) {
    PipeDreamImportOptions opt;
    opt.batch = o.batch;
    opt.dtype = *parse_dtype(o.dtype);
    opt.device = o.device;
    opt.tflops = o.tflops;
    opt.name = o.name;
    Meta meta;
    meta.command_line = command;
    meta.extra = {{"source", o.profile}, {"importer", "pipedream"}};
    const PipeDreamImport r = import_pipedream(o.profile, opt, meta);
    emit(r.toml, o.out,
         fmt::format("PipeDream profile: {} nodes, {} layers ({} left out), {} parameters", r.nodes,
                     r.model.layers.size(), r.dropped, with_commas(r.model.total().params)));
    return 0;
}

}  // namespace

void setup_import(CLI::App& app, Action& action, const std::string& command) {
    CLI::App* cmd = app.add_subcommand("import",
                                       "Write a model.toml from a Hugging Face config.json or a PipeDream "
                                       "profile (inspect and plan accept it as it is)");
    cmd->require_subcommand(1);

    auto hf = std::make_shared<HfOptions>();
    CLI::App* h = cmd->add_subcommand(
        "hf",
        "A Hugging Face config.json (model_type gpt2, llama, mistral, qwen2, mixtral or bert) as a model.toml "
        "with the published parameter count");
    h->add_option("config", hf->config, "config.json")->required();
    h->add_option("--out,-o", hf->out, "write the model here (atomically); default: standard output");
    h->add_option("--seq-len", hf->seq_len, "tokens per sample (default: the config's context length, at most 8192)")
        ->check(CLI::Range(std::uint64_t{1}, std::uint64_t{1} << 24));
    h->add_option("--global-batch", hf->global_batch, "samples per iteration")
        ->check(CLI::Range(std::uint64_t{1}, std::uint64_t{1} << 40))
        ->capture_default_str();
    h->add_option("--dtype", hf->dtype, "training dtype of weights and activations")
        ->check(CLI::IsMember({"fp32", "bf16", "fp16"}))
        ->capture_default_str();
    h->add_option("--name", hf->name, "[model] name (default: the config file's name without .json)");
    h->footer(
        "Examples:\n"
        "  dpart import hf plans/hf/llama-2-7b.json -o llama-2-7b.toml\n"
        "  dpart import hf plans/hf/mixtral-8x7b-v0.1.json --seq-len 4096 --global-batch 1024 -o mixtral.toml\n"
        "Exit code 2 for an unknown model_type or a missing field (file, line, column and field named).");
    h->callback([hf, &action, command] { action = [hf, command] { return run_hf(*hf, command); }; });

    auto pd = std::make_shared<PipeDreamOptionsCli>();
    CLI::App* p = cmd->add_subcommand(
        "pipedream", "A PipeDream profile (graph.txt) as measured custom layers, branches kept as inputs");
    p->add_option("profile", pd->profile, "PipeDream graph.txt")->required();
    p->add_option("--out,-o", pd->out, "write the model here (atomically); default: standard output");
    p->add_option("--batch", pd->batch,
                  "samples in the profiled minibatch (not recorded in the profile); sizes per sample are the "
                  "profile's / batch. 1 keeps them exactly as profiled")
        ->check(CLI::Range(std::uint64_t{1}, std::uint64_t{1} << 32))
        ->capture_default_str();
    p->add_option("--dtype", pd->dtype, "bytes per parameter of parameter_size (PipeDream profiles fp32)")
        ->check(CLI::IsMember({"fp32", "bf16", "fp16"}))
        ->capture_default_str();
    p->add_option("--device", pd->device, "the device the profile was measured on (free text)")->capture_default_str();
    p->add_option("--tflops", pd->tflops,
                  "its matmul TFLOP/s: dpart's cost model scales the measured times by tflops / a device's TFLOP/s "
                  "(default: unknown, times used as measured on every device)")
        ->check(positive_number);
    p->add_option("--name", pd->name, "[model] name (default: the profile's file name without extension)");
    p->footer(
        "Examples:\n"
        "  dpart import pipedream ../shared/data/pipedream/vgg16_graph.txt --name vgg16 -o vgg16.toml\n"
        "  dpart plan vgg16.toml --cost-model pipedream --workers 4 --bandwidth-bytes 1e9");
    p->callback([pd, &action, command] { action = [pd, command] { return run_pipedream(*pd, command); }; });
}

}  // namespace dpart::cli
