#pragma once
// Ranks launched by mpirun: an MPI transport with the same semantics as the in-process one
// (messages matched by source and tag, waits with a timeout). Built when MPI is found;
// otherwise a run under mpirun stops with a clear message.
#include <chrono>
#include <memory>

#include "dpart/runtime/transport.hpp"

namespace dpart::rt {

/// True when this process was started by mpirun (its environment says so).
[[nodiscard]] bool launched_by_mpi();
/// The library version this binary was built with, or "" without MPI.
[[nodiscard]] std::string mpi_version();

/// Initialises MPI on construction and finalises it on destruction.
class MpiSession {
public:
    explicit MpiSession(std::chrono::milliseconds timeout);
    ~MpiSession();
    MpiSession(const MpiSession&) = delete;
    MpiSession& operator=(const MpiSession&) = delete;
    [[nodiscard]] Transport& transport();

private:
    std::unique_ptr<Transport> transport_;
};

}  // namespace dpart::rt
