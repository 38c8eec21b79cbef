// Built without MPI: runs under mpirun are refused with a message that says why.

#include "dpart/core/error.hpp"
#include "dpart/runtime/mpi.hpp"

namespace dpart::rt {

std::string mpi_version() { return ""; }

MpiSession::MpiSession(std::chrono::milliseconds) {
    throw RuntimeError("this dpart was built without MPI (install libopenmpi-dev and rebuild) but runs under mpirun");
}
MpiSession::~MpiSession() = default;
Transport& MpiSession::transport() { return *transport_; }

}  // namespace dpart::rt
