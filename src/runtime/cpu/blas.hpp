#pragma once
// The one door to OpenBLAS: every matrix product of the CPU kernels is a call to gemm().
#include <cstddef>

namespace dpart::rt::cpu {

enum class Op { none, trans };

/// C = alpha * op(A) op(B) + beta * C on row-major matrices: op(A) is [m, k], op(B) is [k, n],
/// C is [m, n]; lda, ldb and ldc are the row strides of A, B and C as stored.
void gemm(Op ta, Op tb, std::size_t m, std::size_t n, std::size_t k, float alpha, const float* a, std::size_t lda,
          const float* b, std::size_t ldb, float beta, float* c, std::size_t ldc);

}  // namespace dpart::rt::cpu
