#include "dpart/core/error.hpp"

namespace dpart {

std::string SourceLocation::str() const {
    std::string s = file.empty() ? std::string("<input>") : file;
    if (line > 0) {
        s += ':' + std::to_string(line);
        if (column > 0) s += ':' + std::to_string(column);
    }
    return s;
}

InputError::InputError(SourceLocation where, const std::string& message)
    : Error(ExitCode::bad_input, where.str() + ": " + message), where_(std::move(where)), detail_(message) {}

}  // namespace dpart
