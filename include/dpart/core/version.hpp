#pragma once
#include <string>

namespace dpart {

/// Version of the dpart program.
inline constexpr const char* version = "0.1.0";
/// Version of the file formats dpart reads and writes (the `schema` field of [meta]).
inline constexpr int schema_version = 1;

/// `git describe` of the source tree the binary was built from ("unknown" outside git).
[[nodiscard]] const char* git_revision() noexcept;

}  // namespace dpart
