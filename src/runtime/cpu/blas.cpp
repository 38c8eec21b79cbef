#include "blas.hpp"

#include <cblas.h>
#include <malloc.h>

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

void prepare_cpu_workers() {
    openblas_set_num_threads(1);
    // A fixed threshold also stops glibc moving it on its own. A failure would only cost
    // speed (glibc 2.36 accepts both).
    (void)mallopt(M_MMAP_THRESHOLD, 256 << 20);
    (void)mallopt(M_TRIM_THRESHOLD, 512 << 20);
    // One arena for every thread: a thread's own arena grows in 64 MiB heaps, and a heap that
    // empties is unmapped at once whatever the trim threshold, so a worker holding more than
    // 64 MiB faulted its all-reduce buffers in again every iteration (116 ms instead of 11 ms
    // for cpu-mlp's 17 MB of gradients). Workers allocate few, large blocks: one lock is cheap.
    (void)mallopt(M_ARENA_MAX, 1);
}

}  // namespace dpart::rt
