// dpart profile: measure this machine and write the cluster.toml that dpart plan reads.
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <tuple>

#include "commands.hpp"
#include "dpart/core/cores.hpp"
#include "dpart/core/error.hpp"
#include "dpart/io/atomic_file.hpp"
#include "dpart/io/cluster_toml.hpp"
#include "dpart/io/csv.hpp"
#include "dpart/io/model_toml.hpp"
#include "dpart/profile/gpu.hpp"
#include "dpart/profile/gpu_measure.hpp"
#include "dpart/profile/layers.hpp"
#include "dpart/profile/probe.hpp"
#include "dpart/report/text_table.hpp"
#include "dpart/profile/host_links.hpp"
#include "dpart/profile/rank_nccl.hpp"
#include "dpart/runtime/cuda_backend.hpp"
#include "dpart/runtime/device.hpp"
#include "dpart/runtime/mpi.hpp"

namespace dpart::cli {
namespace {

struct ProfileOptions {
    std::string out;
    std::string csv;
    std::string name;
    bool list = false;
    std::vector<std::string> keys;
    std::vector<std::string> prefixes;
    int repeats = 5;
    double scale = 1.0;
    double timeout_s = 3600;
    std::string model;        ///< --model: time its layers
    std::string layer_times;  ///< where their times go
    std::string backend = "cpu";   ///< what times them: cpu, cuda, host-device
    std::string precision;         ///< the device layers' compute precision (default: the model's dtype)
    std::string cluster;           ///< --cluster and --device: time on this cluster device (a partition too)
    std::string device;
    bool tf32 = false;             ///< fp32 products on TF32 tensor cores, as run --tf32
};

/// The device layers' DeviceOps for --model and the kind its times are for: GPU 0 (its name),
/// or --device of --cluster (its kind; on a GPU, the GPU or green-context partition dpart run
/// would give it). `gpus` keeps the partitions cut while the ops live.
struct LayerTimingTarget {
    std::shared_ptr<rt::CudaDevices> gpus;
    std::unique_ptr<rt::DeviceOps> ops;
    std::string kind;
};
LayerTimingTarget layer_timing_target(const ProfileOptions& o, bool gpu) {
    LayerTimingTarget t;
    if (o.device.empty()) {
        if (!o.cluster.empty()) throw InputError("--cluster goes with --device (the cluster device to time the layers on)");
        t.ops = gpu ? rt::make_gpu_ops(0, o.tf32) : rt::make_host_ops();
        // The kind a cluster.toml from `dpart profile --out` gives this GPU (gpu.facts' name).
        t.kind = gpu ? profile::gpu::device_facts(0).name : std::string("host-device");
        return t;
    }
    if (o.cluster.empty()) throw InputError("--device names a device of a cluster: give --cluster");
    const Cluster cluster = load_cluster(o.cluster);
    std::size_t d = 0;
    while (d < cluster.devices.size() && cluster.devices[d].name != o.device) ++d;
    if (d == cluster.devices.size()) {
        std::string names;
        for (const Device& dev : cluster.devices) names += (names.empty() ? "" : ", ") + dev.name;
        throw InputError(fmt::format("{}: no device \"{}\" (its devices: {})", o.cluster, o.device, names));
    }
    const Device& dev = cluster.devices[d];
    if (dev.kind.empty())
        throw InputError(dev.where, fmt::format("device \"{}\" has no kind: the layer times would apply to no device",
                                                dev.name));
    if (gpu) {
        t.gpus = std::make_shared<rt::CudaDevices>(cluster);
        t.ops = t.gpus->ops(d, o.tf32);
    } else {
        t.ops = rt::make_host_ops();
    }
    t.kind = dev.kind;
    return t;
}


/// dpart profile --model M --layer-times FILE: every layer's forward and backward at the
/// microbatch sizes the planner considers, with the kernels dpart run would use (the CPU
/// kernels, one core each, or the device layers on GPU 0), written as the CSV plan, replay and
/// run take with --layer-times.
int run_layer_timing(const ProfileOptions& o) {
    if (o.layer_times.empty()) throw InputError("--model needs --layer-times FILE (where the layer times go)");
    const Model model = load_model(o.model);
    const auto sizes = profile::layer_timing_sizes(model.global_batch);
    const std::string& backend = o.backend;
    if (backend == "cpu" && !o.precision.empty())
        throw InputError("--precision is the device layers' (--backend cuda or host-device); the CPU kernels compute in fp32");
    if (o.tf32 && backend != "cuda") throw InputError("--tf32 is the GPU's (--backend cuda)");
    if (backend == "cpu" && (!o.device.empty() || !o.cluster.empty()))
        throw InputError("--cluster and --device choose a device for the device layers (--backend cuda or host-device)");
    LayerTimes t;
    std::string where;
    if (backend == "cpu") {
        // Every core at once, as dpart run's workers use them (one worker per core).
        const auto cores = static_cast<unsigned>(usable_cores());
        t = profile::time_layers(model, sizes, o.repeats, profile::cpu_kind(), 1, cores);
        where = fmt::format("on each of {} cores of {} at once", cores, t.kind);
    } else {
        const rt::Elem compute = rt::compute_precision(o.precision, model.dtype);
        const bool gpu = backend == "cuda";
        if (gpu && !rt::built_with_cuda_backend())
            throw RuntimeError("--backend cuda: this dpart was built without CUDA");
        if (gpu && !profile::gpu::unavailable().empty())
            throw RuntimeError("--backend cuda: " + profile::gpu::unavailable());
        const LayerTimingTarget target = layer_timing_target(o, gpu);
        if (!gpu && !o.device.empty())
            fmt::print(stderr, "note: host-device times are the host's, written under {}'s kind \"{}\" (a rehearsal: "
                               "plan would price that device with them)\n", o.device, target.kind);
        t = profile::time_device_layers(model, sizes, o.repeats, target.kind, *target.ops, compute);
        where = fmt::format("with the device layers on {} ({})", target.ops->name(), rt::to_string(compute));
    }
    double fwd = 0, bwd = 0;
    for (const auto& [layer, points] : t.layers) {
        fwd += points.back().forward_s;
        bwd += points.back().backward_s;
    }
    std::string list;
    for (std::uint64_t q : sizes) list += (list.empty() ? "" : ", ") + std::to_string(q);
    fmt::print("layers of {}: {} layers at {} samples {} (median of {}); at {} samples "
               "the whole model takes {:.4g} ms forward, {:.4g} ms backward\n",
               model.name, model.layers.size(), list, where, o.repeats, sizes.back(), fwd * 1e3, bwd * 1e3);
    layer_times_table(t, model).write(o.layer_times);
    fmt::print("wrote {}\n", o.layer_times);
    return 0;
}

/// This rank's index among the ranks of its host, and their count (1 of 1 outside mpirun):
/// OpenMPI's, MPICH's and Slurm's variables.
std::pair<int, int> local_rank() {
    auto env = [](const char* name) -> std::optional<int> {
        const char* v = std::getenv(name);
        if (v == nullptr || *v == '\0') return std::nullopt;
        char* end = nullptr;
        const long x = std::strtol(v, &end, 10);
        if (*end != '\0' || x < 0 || x > 1 << 20) return std::nullopt;
        return static_cast<int>(x);
    };
    for (auto [rank, size] : {std::pair{"OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"},
                              std::pair{"MPI_LOCALRANKID", "MPI_LOCALNRANKS"},
                              std::pair{"SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"}}) {
        const auto r = env(rank);
        const auto n = env(size);
        if (r && n && *n > 0 && *r < *n) return {*r, *n};
    }
    return {0, 1};
}

/// This rank's host: $DPART_HOST_NAME when set (to name hosts in the cluster file, or to try a
/// merge of several hosts on one machine), else the system's host name.
std::string host_name() {
    if (const char* given = std::getenv("DPART_HOST_NAME"); given != nullptr && *given != '\0') return given;
    char name[256] = {};
    if (gethostname(name, sizeof name - 1) != 0) return "localhost";
    return name;
}

/// The console line of a result: its first figures (every one is in --csv).
std::string result_line(const profile::ProbeResult& r, const std::string& who) {
    constexpr std::size_t shown = 8;
    std::string line = fmt::format("{}{:<20} {:<7}", who, r.key, to_string(r.status));
    for (std::size_t i = 0; i < r.figures.size() && i < shown; ++i)
        line += fmt::format(" {} {:.4g} {};", r.figures[i].name, r.figures[i].value, r.figures[i].unit);
    if (r.figures.size() > shown) line += fmt::format(" ... {} more figures in --csv;", r.figures.size() - shown);
    if (!r.text.empty()) line += " " + r.text;
    if (!r.reason.empty()) line += " (" + r.reason + ")";
    return line;
}

int run_profile(const ProfileOptions& o, const std::string& command) {
    if (!o.model.empty() && !o.list) return run_layer_timing(o);
    if (!o.layer_times.empty()) throw InputError("--layer-times names where --model's layer times go: give --model");
    if (o.backend != "cpu" || !o.precision.empty() || !o.device.empty() || !o.cluster.empty() || o.tf32)
        throw InputError(o.list ? "--list lists the probes: --backend, --precision, --tf32, --cluster and --device go with "
                                  "--model (without --list)"
                                : "--backend, --precision, --tf32, --cluster and --device choose what times --model's layers: "
                                  "give --model");
    profile::ProbeSettings settings{o.repeats, o.scale};
    // Under mpirun every rank measures its own devices (the ranks of one host share its GPUs
    // out by CUDA index) and rank 0 merges them into one cluster.toml.
    std::unique_ptr<rt::MpiSession> mpi;
    if (rt::launched_by_mpi() && !o.list) {
        mpi = std::make_unique<rt::MpiSession>(std::chrono::milliseconds(static_cast<std::int64_t>(o.timeout_s * 1e3)));
        std::tie(settings.gpu_offset, settings.gpu_stride) = local_rank();
    }
    const std::size_t rank = mpi ? mpi->transport().rank() : 0;
    const std::size_t ranks = mpi ? mpi->transport().size() : 1;
    const std::string who = ranks > 1 ? fmt::format("rank {} ({}): ", rank, host_name()) : "";

    const auto probes = profile::select_probes(profile::all_probes(settings), o.keys, o.prefixes);
    if (o.list) {
        for (const auto& p : probes) fmt::print("{:<20} {}\n", p.key, p.description);
        return 0;
    }
    profile::RankResults mine{rank, host_name(), {}};
    const bool terminal = isatty(STDERR_FILENO) != 0 && ranks == 1;
    for (std::size_t i = 0; i < probes.size(); ++i) {
        if (terminal) fmt::print(stderr, "[{}/{}] {} ...\r", i + 1, probes.size(), probes[i].key);
        mine.results.push_back(profile::run_probe(probes[i]));
        if (terminal) fmt::print(stderr, "\x1b[2K");
        fmt::print("{}\n", result_line(mine.results.back(), who));
        std::fflush(stdout);
    }
    auto failed = [](const std::vector<profile::ProbeResult>& results) {
        return std::any_of(results.begin(), results.end(),
                           [](const auto& r) { return r.status == profile::ProbeResult::Status::failed; });
    };

    // Between hosts: the first ranks of every two hosts ping-pong (every rank takes part; the
    // links are known to rank 0 only).
    std::optional<profile::Link> inter;
    std::vector<profile::NodeLink> node_links;
    if (ranks > 1 && (o.keys.empty() && o.prefixes.empty())) {
        profile::HostLinkSettings hs;
        hs.repeats = o.repeats;
        // At least 1 MiB, at most 1 GiB (an MPI message counts its bytes in an int).
        hs.bytes = std::clamp<std::size_t>(static_cast<std::size_t>(static_cast<double>(hs.bytes) * o.scale),
                                           std::size_t{1} << 20, std::size_t{1} << 30);
        const auto links = profile::measure_host_links(mpi->transport(), host_name(), hs);
        if (rank == 0) {
            profile::ProbeResult r;
            r.key = "mpi.host_link";
            if (links.empty()) {
                r.status = profile::ProbeResult::Status::waived;
                r.reason = "every rank runs on one host: no link between hosts to measure";
            }
            for (const auto& l : links) {
                const std::string pair = fmt::format("rank{}-rank{}", l.rank_a, l.rank_b);
                r.figures.push_back({pair + ".latency_us", l.latency_us, "us"});
                r.figures.push_back({pair + ".gbs", l.gbs, "GB/s"});
            }
            inter = profile::inter_node_link(links);
            node_links = profile::node_links(links);
            if (inter) r.text = inter->source;
            fmt::print("{}\n", result_line(r, who));
            mine.results.push_back(std::move(r));
        }
    }
    // NCCL between the ranks, one GPU each (every rank takes part; rank 0 reports).
    if (ranks > 1 && (o.keys.empty() && o.prefixes.empty())) {
        const std::size_t max_bytes = std::clamp<std::size_t>(
            static_cast<std::size_t>(static_cast<double>(std::size_t{1} << 30) * o.scale), 1024, std::size_t{1} << 30);
        for (profile::ProbeResult& r :
             profile::measure_rank_collectives(mpi->transport(), profile::gpu_rank_nccl(settings), max_bytes)) {
            fmt::print("{}\n", result_line(r, who));
            mine.results.push_back(std::move(r));
        }
    }

    std::vector<profile::RankResults> all;
    if (ranks > 1) {
        const rt::Tag tag{rt::Tag::Kind::report, 0, 0, 0};
        if (rank != 0) {
            mpi->transport().send(0, tag, profile::encode(mine));
            mpi->transport().flush();
            return failed(mine.results) ? static_cast<int>(ExitCode::runtime_failure) : 0;
        }
        all.push_back(std::move(mine));
        for (std::size_t src = 1; src < ranks; ++src)
            all.push_back(profile::decode_rank_results(mpi->transport().recv(src, tag)));
    } else {
        all.push_back(std::move(mine));
    }

    Meta meta;
    meta.command_line = command;
    if (!o.csv.empty()) {
        CsvTable csv(profile::result_columns());
        for (const auto& r : all)
            for (auto res : r.results) {
                // Several ranks: every figure says whose it is.
                if (ranks > 1) {
                    for (auto& f : res.figures) f.name = fmt::format("rank{}.{}", r.rank, f.name);
                    for (auto& l : res.labels) l.name = fmt::format("rank{}.{}", r.rank, l.name);
                }
                profile::add_result_rows(csv, res);
            }
        csv.write(o.csv);
    }
    if (!o.out.empty()) {
        const std::string name = o.name.empty() ? host_name() : o.name;
        const bool gpus = std::any_of(all.begin(), all.end(), [](const auto& r) { return profile::has_gpu_figures(r.results); });
        write_file_atomic(o.out, gpus || ranks > 1 ? profile::merged_cluster_toml(all, name, meta, inter, node_links)
                                                   : profile::cpu_cluster_toml(all[0].results, name, host_name(), meta));
        fmt::print("wrote {}\n", o.out);
    }
    const bool any_failed = std::any_of(all.begin(), all.end(), [&](const auto& r) { return failed(r.results); });
    return any_failed ? static_cast<int>(ExitCode::runtime_failure) : 0;
}

}  // namespace

void setup_profile(CLI::App& app, Action& action, const std::string& command) {
    auto o = std::make_shared<ProfileOptions>();
    CLI::App* cmd = app.add_subcommand("profile", "Measure this machine's devices and links, and write a cluster.toml");
    cmd->add_option("--out", o->out, "write the measured cluster.toml there (atomically)");
    cmd->add_option("--name", o->name, "the cluster's name in --out (default: this host's name)");
    cmd->add_option("--csv", o->csv, "write every figure there: key,status,figure,value,unit,reason");
    cmd->add_flag("--list", o->list, "list the probes (key and description) and exit");
    cmd->add_option("--model", o->model,
                    "time this model's layers (forward and backward, at the microbatch sizes the planner considers, "
                    "with the kernels dpart run uses: see --backend) instead of running the probes; with --layer-times");
    cmd->add_option("--layer-times", o->layer_times,
                    "with --model: write the layer times there (CSV), for plan, replay and run --layer-times");
    cmd->add_option("--backend", o->backend,
                    "with --model: what times the layers: cpu (the CPU kernels), cuda (the device layers on GPU 0, "
                    "its name as the kind, or on --device), host-device (the device layers on the host)")
        ->check(CLI::IsMember({"cpu", "cuda", "host-device"}))
        ->capture_default_str();
    cmd->add_option("--precision", o->precision,
                    "with --model and a device backend: fp32 or bf16 (default: the model's dtype)")
        ->check(CLI::IsMember({"fp32", "bf16"}));
    cmd->add_flag("--tf32", o->tf32, "with --model --backend cuda: fp32 products on TF32 tensor cores, as run --tf32");
    cmd->add_option("--cluster", o->cluster, "with --model and --device: the cluster file that declares the device");
    cmd->add_option("--device", o->device,
                    "with --model and a device backend: time on this device of --cluster (a GPU, or a green-context "
                    "partition with sm = N, as dpart run makes it); its kind is the times' kind");
    cmd->add_option("-t,--test", o->keys, "run this probe (repeatable)");
    cmd->add_option("-p,--prefix", o->prefixes, "run the probes whose key starts with this (repeatable)");
    cmd->add_option("--repeats", o->repeats, "timed repeats per figure after one warm-up; the median is reported")
        ->check(CLI::Range(1, 1000))
        ->capture_default_str();
    cmd->add_option("--scale", o->scale, "problem sizes relative to the defaults")
        ->check(CLI::Range(0.001, 100.0))
        ->check(finite_number)
        ->capture_default_str();
    cmd->add_option("--timeout", o->timeout_s, "under mpirun: seconds rank 0 waits for the other ranks' results")
        ->check(positive_number)
        ->capture_default_str();
    cmd->footer(
        "Probes that cannot run here are waived with the reason; one failing never stops the others.\n"
        "Examples:\n"
        "  dpart profile --list\n"
        "  dpart profile --out plans/clusters/this-host.toml --csv profile.csv\n"
        "  dpart profile -p cpu. --repeats 9\n"
        "  dpart profile -p gpu. -p nccl. --out cluster.toml --csv profile.csv\n"
        "  mpirun -np 2 dpart profile --out cluster.toml   (every rank measures its devices; rank 0 writes)\n"
        "Exit code 1 when a probe failed (the others still ran and were written).");
    cmd->callback([o, &action, command] { action = [o, command] { return run_profile(*o, command); }; });
}

}  // namespace dpart::cli
