#pragma once
#include <string>
#include <string_view>

namespace dpart {

/// Writes `content` to `path` so that the file appears whole or not at all, even if the process
/// is killed: the content goes into an unnamed file of the same directory (O_TMPFILE), is
/// fsync'ed, then named: linked at `path` when it is new, or linked at a temporary name and
/// renamed over `path` when it exists (a SIGKILL between those two calls alone can leave
/// `.NAME.dpart-tmp.PID`). Where O_TMPFILE is not supported, a named temporary file, fsync'ed and
/// renamed. Throws RuntimeError naming the path and the system error; no temporary file is left
/// behind on failure.
void write_file_atomic(const std::string& path, std::string_view content);

}  // namespace dpart
