// How this process was started.
#include <cstdlib>

#include "dpart/runtime/mpi.hpp"

namespace dpart::rt {

bool launched_by_mpi() {
    // OpenMPI's mpirun, PMIx launchers (srun, prterun), and MPICH's Hydra.
    for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "MPI_LOCALNRANKS"})
        if (std::getenv(v) != nullptr) return true;
    return false;
}

}  // namespace dpart::rt
