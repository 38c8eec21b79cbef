#pragma once
// CUDA and cuBLAS status codes turned into dpart::RuntimeError (exit code 1). The message
// carries what was called, the library's text and the error's name, e.g.
//   "cudaMemcpyAsync: an illegal memory access was encountered (cudaErrorIllegalAddress)".
// Kernel launches are checked with check_cuda(cudaGetLastError(), "<kernel> launch"); an
// earlier asynchronous failure is sticky and surfaces at the next check.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <string>

#include "dpart/core/error.hpp"

namespace dpart::rt::cuda {

inline void check_cuda(cudaError_t status, const char* what) {
    if (status == cudaSuccess) return;
    throw RuntimeError(std::string(what) + ": " + cudaGetErrorString(status) + " (" + cudaGetErrorName(status) + ")");
}

inline void check_cublas(cublasStatus_t status, const char* what) {
    if (status == CUBLAS_STATUS_SUCCESS) return;
    throw RuntimeError(std::string(what) + ": " + cublasGetStatusString(status) + " (" + cublasGetStatusName(status) +
                       ")");
}

}  // namespace dpart::rt::cuda

#define DPART_CUDA_STR2(x) #x
#define DPART_CUDA_STR(x) DPART_CUDA_STR2(x)
/// DPART_CUDA(cudaMemcpyAsync(...)): throws with the failing expression and file:line.
#define DPART_CUDA(call) ::dpart::rt::cuda::check_cuda((call), #call " at " __FILE__ ":" DPART_CUDA_STR(__LINE__))
/// DPART_CUBLAS(cublasGemmEx(...)): the same for cuBLAS.
#define DPART_CUBLAS(call) ::dpart::rt::cuda::check_cublas((call), #call " at " __FILE__ ":" DPART_CUDA_STR(__LINE__))
