# NCCL and cuDNN as imported targets, found in the CUDA toolkit tree or the system.
# Hints: -DNCCL_ROOT=... / -DCUDNN_ROOT=...
set(_dpart_gpu_hints "${CUDAToolkit_LIBRARY_ROOT}" "${CUDAToolkit_LIBRARY_ROOT}/lib"
                     "${CUDAToolkit_LIBRARY_DIR}" "${CUDAToolkit_INCLUDE_DIRS}/..")

find_path(NCCL_INCLUDE_DIR nccl.h HINTS ${NCCL_ROOT} ${_dpart_gpu_hints} PATH_SUFFIXES include)
find_library(NCCL_LIBRARY nccl HINTS ${NCCL_ROOT} ${_dpart_gpu_hints} PATH_SUFFIXES lib lib64)
if(NOT NCCL_INCLUDE_DIR OR NOT NCCL_LIBRARY)
  message(FATAL_ERROR "dpart: nvcc was found but NCCL was not. Install NCCL (Debian: libnccl-dev), "
                      "point -DNCCL_ROOT at it, or build without CUDA: -DDPART_WITH_CUDA=OFF")
endif()
add_library(dpart::nccl UNKNOWN IMPORTED)
set_target_properties(dpart::nccl PROPERTIES IMPORTED_LOCATION "${NCCL_LIBRARY}"
                                             INTERFACE_INCLUDE_DIRECTORIES "${NCCL_INCLUDE_DIR}")

find_path(CUDNN_INCLUDE_DIR cudnn.h HINTS ${CUDNN_ROOT} ${_dpart_gpu_hints} PATH_SUFFIXES include)
find_library(CUDNN_LIBRARY cudnn HINTS ${CUDNN_ROOT} ${_dpart_gpu_hints} PATH_SUFFIXES lib lib64)
if(NOT CUDNN_INCLUDE_DIR OR NOT CUDNN_LIBRARY)
  message(FATAL_ERROR "dpart: nvcc was found but cuDNN was not. Install cuDNN 9, point -DCUDNN_ROOT "
                      "at it, or build without CUDA: -DDPART_WITH_CUDA=OFF")
endif()
add_library(dpart::cudnn UNKNOWN IMPORTED)
set_target_properties(dpart::cudnn PROPERTIES IMPORTED_LOCATION "${CUDNN_LIBRARY}"
                                              INTERFACE_INCLUDE_DIRECTORIES "${CUDNN_INCLUDE_DIR}")
message(STATUS "dpart: NCCL ${NCCL_LIBRARY}, cuDNN ${CUDNN_LIBRARY}")
