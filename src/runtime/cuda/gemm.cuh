#pragma once
// The one door to cuBLAS: every matrix product of the CUDA backend goes through Blas, with the
// row-major semantics of the CPU backend's cpu::gemm (src/runtime/cpu/blas.hpp).
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>

namespace dpart::rt::cuda {

enum class Op { none, trans };

/// A cuBLAS handle bound to one stream, with a 32 MiB workspace of its own (so that results do
/// not depend on cuBLAS's shared pool: cuBLAS is bitwise reproducible per handle, stream and
/// workspace on one GPU model). Calls enqueue on the stream and return; errors throw
/// dpart::RuntimeError. Create it with the target device current; destroy it before the stream.
class Blas {
public:
    explicit Blas(cudaStream_t stream);
    ~Blas();
    Blas(const Blas&) = delete;
    Blas& operator=(const Blas&) = delete;
    Blas(Blas&&) = delete;
    Blas& operator=(Blas&&) = delete;

    /// fp32 products on TF32 tensor cores (CUBLAS_COMPUTE_32F_FAST_TF32) when on; off by default
    /// (CUBLAS_COMPUTE_32F, full fp32). bf16 products always accumulate in fp32.
    void set_tf32(bool on) noexcept { tf32_ = on; }
    [[nodiscard]] bool tf32() const noexcept { return tf32_; }
    [[nodiscard]] cudaStream_t stream() const noexcept { return stream_; }
    /// Moves the handle to another stream (the caller has synchronised the old one).
    void set_stream(cudaStream_t stream);
    /// The SMs its kernels should size their grids for (a green-context partition's; 0: the GPU's).
    void set_sm_count_target(int sms);

    /// C = alpha * op(A) op(B) + beta * C on row-major matrices: op(A) is [m, k], op(B) is [k, n],
    /// C is [m, n]; lda, ldb and ldc are the row strides of A, B and C as stored (A is stored
    /// [m, k] or, with ta = trans, [k, m]). T is float or __nv_bfloat16; alpha and beta are fp32.
    /// Throws RuntimeError when a dimension or stride exceeds INT_MAX or a stride is shorter than
    /// the row it strides. m = 0 or n = 0 does nothing; k = 0 is passed on to cuBLAS (BLAS
    /// semantics: C = beta * C).
    template <class T>
    void gemm(Op ta, Op tb, std::size_t m, std::size_t n, std::size_t k, float alpha, const T* a, std::size_t lda,
              const T* b, std::size_t ldb, float beta, T* c, std::size_t ldc);

    /// `batch` independent gemm calls: the i-th reads a + i * stride_a, b + i * stride_b and
    /// writes c + i * stride_c (strides in elements).
    template <class T>
    void gemm_strided_batched(Op ta, Op tb, std::size_t m, std::size_t n, std::size_t k, float alpha, const T* a,
                              std::size_t lda, long long stride_a, const T* b, std::size_t ldb, long long stride_b,
                              float beta, T* c, std::size_t ldc, long long stride_c, std::size_t batch);

    /// The same, type-erased: A and B of one type (fp32 or bf16), C of theirs or fp32 (bf16
    /// products then accumulate into an fp32 C, as weight gradients do); `batch` products with
    /// the given element strides (batch 1: a plain product).
    void gemm_ex(Op ta, Op tb, std::size_t m, std::size_t n, std::size_t k, float alpha, const void* a,
                 cudaDataType ab_type, std::size_t lda, long long stride_a, const void* b, std::size_t ldb,
                 long long stride_b, float beta, void* c, cudaDataType c_type, std::size_t ldc, long long stride_c,
                 std::size_t batch);

private:
    cudaStream_t stream_ = nullptr;
    cublasHandle_t handle_ = nullptr;
    void* workspace_ = nullptr;
    bool tf32_ = false;
};

}  // namespace dpart::rt::cuda
