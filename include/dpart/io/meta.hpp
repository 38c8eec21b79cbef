#pragma once
// The [meta] table every TOML output starts with: schema version, dpart version, git revision,
// host, time, command line and library versions.
#include <string>
#include <vector>

namespace dpart {

struct Meta {
    std::string command_line;
    std::vector<std::pair<std::string, std::string>> extra;  ///< more string fields, e.g. model, cluster
};

/// "[meta]\n..." with a trailing blank line.
[[nodiscard]] std::string meta_toml(const Meta& meta);
/// A TOML basic string literal, quoted and escaped.
[[nodiscard]] std::string toml_string(const std::string& s);
/// Seconds as milliseconds with six significant digits, as the output files write them.
[[nodiscard]] std::string ms_text(double seconds);
/// The command line as typed, arguments quoted where needed.
[[nodiscard]] std::string command_line(int argc, const char* const* argv);

}  // namespace dpart
