#include "dpart/io/input_file.hpp"

#include <filesystem>
#include <fstream>
#include <sstream>
#include <system_error>

#include "dpart/core/error.hpp"

namespace dpart {

std::string read_input_file(const std::string& path) {
    std::error_code ec;
    if (std::filesystem::is_directory(path, ec)) throw InputError(SourceLocation{path}, "is a directory, not a file");
    std::ifstream in(path, std::ios::binary);
    if (!in) throw InputError(SourceLocation{path}, "cannot open the file for reading");
    std::ostringstream content;
    content << in.rdbuf();
    if (in.bad()) throw InputError(SourceLocation{path}, "cannot read the file");
    std::string text = std::move(content).str();
    if (text.starts_with("\xEF\xBB\xBF")) text.erase(0, 3);  // a UTF-8 byte-order mark, as some editors write
    return text;
}

}  // namespace dpart
