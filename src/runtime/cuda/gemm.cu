// Row-major products through column-major cuBLAS. A row-major matrix X [r, c] with row stride
// ld is, read column-major, X^T [c, r] with leading dimension ld. So the row-major
//   C = alpha op(A) op(B) + beta C            (C [m, n])
// is, column-major, the product
//   C^T = alpha op(B)^T op(A)^T + beta C^T    (C^T [n, m], leading dimension ldc)
// that is cublasGemmEx with the operands swapped: (transa, transb) = (tb, ta), (m, n, k) =
// (n, m, k), A = b with ldb, B = a with lda. op(B)^T is B's buffer as stored when tb = none
// (column-major [n, k]) and its transpose when tb = trans (stored [n, k] row-major = [k, n]
// column-major); likewise for A. cuBLAS's leading-dimension rules then read: ldb >= the
// stored row length of B, lda >= that of A, ldc >= n, which checked() enforces.
#include "gemm.cuh"

#include <algorithm>
#include <climits>
#include <cstddef>
#include <string>

#include "check.cuh"

namespace dpart::rt::cuda {
namespace {

/// cuBLAS's recommendation for Hopper (32 MiB); smaller GPUs are fine with it too.
constexpr std::size_t kWorkspaceBytes = std::size_t{32} << 20;

cublasOperation_t to_cublas(Op op) noexcept { return op == Op::trans ? CUBLAS_OP_T : CUBLAS_OP_N; }

template <class T>
cudaDataType data_type() noexcept;
template <>
cudaDataType data_type<float>() noexcept {
    return CUDA_R_32F;
}
template <>
cudaDataType data_type<__nv_bfloat16>() noexcept {
    return CUDA_R_16BF;
}

int to_int(std::size_t v, const char* name, const char* fn) {
    if (v > static_cast<std::size_t>(INT_MAX))
        throw RuntimeError(std::string(fn) + ": " + name + " = " + std::to_string(v) +
                           " exceeds INT_MAX, the limit of cuBLAS's 32-bit interface");
    return static_cast<int>(v);
}

/// The sizes as cuBLAS's ints, after checking the row strides against the stored row lengths.
struct Dims {
    int m, n, k, lda, ldb, ldc;
};

Dims checked(Op ta, Op tb, std::size_t m, std::size_t n, std::size_t k, std::size_t lda, std::size_t ldb,
             std::size_t ldc, const char* fn) {
    const std::size_t a_row = ta == Op::none ? k : m;  // A stored [m, k] or [k, m]
    const std::size_t b_row = tb == Op::none ? n : k;  // B stored [k, n] or [n, k]
    const auto too_short = [&](const char* name, std::size_t ld, std::size_t row) {
        if (ld < row)
            throw RuntimeError(std::string(fn) + ": " + name + " = " + std::to_string(ld) +
                               " is shorter than the row it strides (" + std::to_string(row) + " elements)");
    };
    too_short("lda", lda, a_row);
    too_short("ldb", ldb, b_row);
    too_short("ldc", ldc, n);
    // A zero-length row (k = 0) still needs a leading dimension of at least 1 in cuBLAS.
    return Dims{to_int(m, "m", fn),
                to_int(n, "n", fn),
                to_int(k, "k", fn),
                to_int(std::max<std::size_t>(lda, 1), "lda", fn),
                to_int(std::max<std::size_t>(ldb, 1), "ldb", fn),
                to_int(std::max<std::size_t>(ldc, 1), "ldc", fn)};
}

}  // namespace

Blas::Blas(cudaStream_t stream) : stream_(stream) {
    check_cublas(cublasCreate(&handle_), "cublasCreate");
    try {
        check_cublas(cublasSetStream(handle_, stream_), "cublasSetStream");
        check_cuda(cudaMalloc(&workspace_, kWorkspaceBytes), "cudaMalloc (cuBLAS workspace)");
        // After cublasSetStream, which resets the handle to cuBLAS's own workspace pool.
        check_cublas(cublasSetWorkspace(handle_, workspace_, kWorkspaceBytes), "cublasSetWorkspace");
    } catch (...) {
        cublasDestroy(handle_);
        if (workspace_ != nullptr) cudaFree(workspace_);
        throw;
    }
}

void Blas::set_stream(cudaStream_t stream) {
    check_cublas(cublasSetStream(handle_, stream), "cublasSetStream");
    // cublasSetStream resets the workspace to cuBLAS's pool: give it ours again.
    check_cublas(cublasSetWorkspace(handle_, workspace_, kWorkspaceBytes), "cublasSetWorkspace");
    stream_ = stream;
}

void Blas::set_sm_count_target(int sms) {
    check_cublas(cublasSetSmCountTarget(handle_, sms), "cublasSetSmCountTarget");
}

Blas::~Blas() {
    // cublasDestroy synchronises the device, so no product still uses the workspace; errors
    // cannot be reported from a destructor.
    cublasDestroy(handle_);
    cudaFree(workspace_);
}

template <class T>
void Blas::gemm(Op ta, Op tb, std::size_t m, std::size_t n, std::size_t k, float alpha, const T* a, std::size_t lda,
                const T* b, std::size_t ldb, float beta, T* c, std::size_t ldc) {
    const Dims d = checked(ta, tb, m, n, k, lda, ldb, ldc, "gemm");
    if (m == 0 || n == 0) return;
    const cublasComputeType_t compute =
        data_type<T>() == CUDA_R_32F && tf32_ ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    check_cublas(cublasGemmEx(handle_, to_cublas(tb), to_cublas(ta), d.n, d.m, d.k, &alpha, b, data_type<T>(), d.ldb,
                              a, data_type<T>(), d.lda, &beta, c, data_type<T>(), d.ldc, compute, CUBLAS_GEMM_DEFAULT),
                 "cublasGemmEx");
}

template <class T>
void Blas::gemm_strided_batched(Op ta, Op tb, std::size_t m, std::size_t n, std::size_t k, float alpha, const T* a,
                                std::size_t lda, long long stride_a, const T* b, std::size_t ldb, long long stride_b,
                                float beta, T* c, std::size_t ldc, long long stride_c, std::size_t batch) {
    const Dims d = checked(ta, tb, m, n, k, lda, ldb, ldc, "gemm_strided_batched");
    const int count = to_int(batch, "batch", "gemm_strided_batched");
    if (m == 0 || n == 0 || batch == 0) return;
    const cublasComputeType_t compute =
        data_type<T>() == CUDA_R_32F && tf32_ ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    check_cublas(cublasGemmStridedBatchedEx(handle_, to_cublas(tb), to_cublas(ta), d.n, d.m, d.k, &alpha, b,
                                            data_type<T>(), d.ldb, stride_b, a, data_type<T>(), d.lda, stride_a, &beta,
                                            c, data_type<T>(), d.ldc, stride_c, count, compute, CUBLAS_GEMM_DEFAULT),
                 "cublasGemmStridedBatchedEx");
}

void Blas::gemm_ex(Op ta, Op tb, std::size_t m, std::size_t n, std::size_t k, float alpha, const void* a,
                   cudaDataType ab_type, std::size_t lda, long long stride_a, const void* b, std::size_t ldb,
                   long long stride_b, float beta, void* c, cudaDataType c_type, std::size_t ldc, long long stride_c,
                   std::size_t batch) {
    const Dims d = checked(ta, tb, m, n, k, lda, ldb, ldc, "gemm_ex");
    const int count = to_int(batch, "batch", "gemm_ex");
    if (m == 0 || n == 0 || batch == 0) return;
    if ((ab_type != CUDA_R_32F && ab_type != CUDA_R_16BF) || (c_type != ab_type && c_type != CUDA_R_32F))
        throw RuntimeError("gemm_ex: A and B must be fp32 or bf16, and C of their type or fp32");
    const cublasComputeType_t compute =
        ab_type == CUDA_R_32F && tf32_ ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    if (count == 1) {
        check_cublas(cublasGemmEx(handle_, to_cublas(tb), to_cublas(ta), d.n, d.m, d.k, &alpha, b, ab_type, d.ldb, a,
                                  ab_type, d.lda, &beta, c, c_type, d.ldc, compute, CUBLAS_GEMM_DEFAULT),
                     "cublasGemmEx");
        return;
    }
    check_cublas(cublasGemmStridedBatchedEx(handle_, to_cublas(tb), to_cublas(ta), d.n, d.m, d.k, &alpha, b, ab_type,
                                            d.ldb, stride_b, a, ab_type, d.lda, stride_a, &beta, c, c_type, d.ldc,
                                            stride_c, count, compute, CUBLAS_GEMM_DEFAULT),
                 "cublasGemmStridedBatchedEx");
}

template void Blas::gemm<float>(Op, Op, std::size_t, std::size_t, std::size_t, float, const float*, std::size_t,
                                const float*, std::size_t, float, float*, std::size_t);
template void Blas::gemm<__nv_bfloat16>(Op, Op, std::size_t, std::size_t, std::size_t, float, const __nv_bfloat16*,
                                        std::size_t, const __nv_bfloat16*, std::size_t, float, __nv_bfloat16*,
                                        std::size_t);
template void Blas::gemm_strided_batched<float>(Op, Op, std::size_t, std::size_t, std::size_t, float, const float*,
                                                std::size_t, long long, const float*, std::size_t, long long, float,
                                                float*, std::size_t, long long, std::size_t);
template void Blas::gemm_strided_batched<__nv_bfloat16>(Op, Op, std::size_t, std::size_t, std::size_t, float,
                                                        const __nv_bfloat16*, std::size_t, long long,
                                                        const __nv_bfloat16*, std::size_t, long long, float,
                                                        __nv_bfloat16*, std::size_t, long long, std::size_t);

}  // namespace dpart::rt::cuda
