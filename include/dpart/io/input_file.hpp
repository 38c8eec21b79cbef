#pragma once
// Reading an input file whole, with the errors every reader reports the same way.
#include <string>

namespace dpart {

/// The bytes of the file at `path`, less a UTF-8 byte-order mark at the start (some editors
/// write one; line and column numbers then count from the first character after it). Throws
/// InputError naming the file when it is a directory, cannot be opened or cannot be read.
[[nodiscard]] std::string read_input_file(const std::string& path);

}  // namespace dpart
