#include "blas.hpp"

#include <cblas.h>

#include <limits>

#include "dpart/core/error.hpp"
#include "dpart/runtime/backend.hpp"

namespace dpart::rt::cpu {
namespace {

blasint dim(std::size_t v) {
    if (v > static_cast<std::size_t>(std::numeric_limits<blasint>::max()))
        throw RuntimeError("a matrix dimension exceeds what the BLAS library indexes");
    return static_cast<blasint>(v);
}

CBLAS_TRANSPOSE trans(Op op) { return op == Op::trans ? CblasTrans : CblasNoTrans; }

}  // namespace

void gemm(Op ta, Op tb, std::size_t m, std::size_t n, std::size_t k, float alpha, const float* a, std::size_t lda,
          const float* b, std::size_t ldb, float beta, float* c, std::size_t ldc) {
    if (m == 0 || n == 0) return;
    if (k == 0) {
        // BLAS leaves C alone when k = 0 only if beta = 1; make the empty product explicit.
        for (std::size_t i = 0; i < m; ++i)
            for (std::size_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
        return;
    }
    cblas_sgemm(CblasRowMajor, trans(ta), trans(tb), dim(m), dim(n), dim(k), alpha, a, dim(lda), b, dim(ldb), beta, c,
                dim(ldc));
}

}  // namespace dpart::rt::cpu

namespace dpart::rt {

void use_single_threaded_blas() { openblas_set_num_threads(1); }

}  // namespace dpart::rt
