#pragma once
#include <string>
#include <string_view>

namespace dpart {

/// Writes `content` to `path` so that the file appears whole or not at all: a temporary file
/// in the same directory, flushed and fsync'ed, then renamed over `path`. Throws RuntimeError
/// naming the path and the system error; no temporary file is left behind on failure.
void write_file_atomic(const std::string& path, std::string_view content);

}  // namespace dpart
