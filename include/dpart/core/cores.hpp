#pragma once
// How many cores this process may run on.
#include <cstddef>

namespace dpart {

/// The cores in this process's CPU affinity (as a container's cpuset sets it), else the
/// machine's hardware threads; at least 1.
[[nodiscard]] std::size_t usable_cores();

}  // namespace dpart
