#include "dpart/io/meta.hpp"

#include <fmt/format.h>
#include <unistd.h>

#include <ctime>

#include "dpart/core/version.hpp"
#include "dpart/runtime/gpu_info.hpp"

namespace dpart {

std::string toml_string(const std::string& s) {
    std::string out = "\"";
    for (const char ch : s) {
        const auto c = static_cast<unsigned char>(ch);
        if (c == '"') out += "\\\"";
        else if (c == '\\') out += "\\\\";
        else if (c == '\n') out += "\\n";
        else if (c == '\t') out += "\\t";
        else if (c < 0x20 || c == 0x7f) out += fmt::format("\\u{:04X}", c);
        else out += ch;
    }
    return out + '"';
}

std::string ms_text(double seconds) { return fmt::format("{:.6g}", seconds * 1e3); }

std::string command_line(int argc, const char* const* argv) {
    std::string out;
    for (int i = 0; i < argc; ++i) {
        std::string a = argv[i];
        if (i > 0) out += ' ';
        if (a.empty() || a.find_first_of(" \t\"'\\$") != std::string::npos) {
            std::string q = "'";
            for (char c : a) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
            out += q + "'";
        } else {
            out += a;
        }
    }
    return out;
}

std::string meta_toml(const Meta& meta) {
    char host[256] = {};
    if (gethostname(host, sizeof host - 1) != 0) host[0] = '\0';
    const std::time_t now = std::time(nullptr);
    std::tm utc{};
    gmtime_r(&now, &utc);
    char created[32];
    std::strftime(created, sizeof created, "%Y-%m-%dT%H:%M:%SZ", &utc);
    const GpuSoftware gpu = gpu_software();
    const std::string libraries =
        gpu.built_with_cuda ? fmt::format("CUDA {}, cuBLAS {}, NCCL {}, cuDNN {}", gpu.cuda, gpu.cublas, gpu.nccl, gpu.cudnn)
                            : std::string("none (built without CUDA)");
    std::string out = "[meta]\n";
    out += fmt::format("schema = {}\n", schema_version);
    out += fmt::format("dpart = {}\n", toml_string(version));
    out += fmt::format("git = {}\n", toml_string(git_revision()));
    out += fmt::format("host = {}\n", toml_string(host));
    out += fmt::format("created = {}\n", toml_string(created));
    out += fmt::format("command = {}\n", toml_string(meta.command_line));
    out += fmt::format("libraries = {}\n", toml_string(libraries));
    for (const auto& [k, v] : meta.extra) out += fmt::format("{} = {}\n", k, toml_string(v));
    return out + "\n";
}

}  // namespace dpart
