#pragma once
// The device kernels of the CUDA backend: everything but the matrix products (gemm.cuh).
//
// Contracts shared by every function here:
// - Pointers are device pointers; matrices are row-major and dense (row stride = columns).
// - Each call only enqueues work on `stream` (the last parameter) and returns; it checks the
//   launch with cudaGetLastError() and throws dpart::RuntimeError on failure. A size of 0 is a
//   no-op.
// - T is float or __nv_bfloat16 (explicit instantiations in device_ops.cu). Arithmetic inside the
//   kernels is fp32; parameters, their gradients, statistics and losses are fp32 whatever T is.
// - Deterministic: the same inputs give bitwise the same outputs on every run on the same GPU.
//   No floating-point atomics; every sum is taken in a fixed order (one block of 256 threads per
//   row with a fixed tree, or per-column threads walking the rows in order).
// - Outputs documented "+=" accumulate into what is there (gradients over micro-batches).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace dpart::rt::cuda {

/// fp32 -> bf16 (round to nearest even) and back, n elements.
void cast(const float* in, __nv_bfloat16* out, std::size_t n, cudaStream_t stream);
void cast(const __nv_bfloat16* in, float* out, std::size_t n, cudaStream_t stream);

/// y[r][c] += bias[c]; y is [rows, cols].
template <class T>
void bias_add(T* y, const float* bias, std::size_t rows, std::size_t cols, cudaStream_t stream);

/// dbias[c] += sum over r of dy[r][c] (rows summed in a fixed order); dy is [rows, cols].
template <class T>
void column_sums(const T* dy, float* dbias, std::size_t rows, std::size_t cols, cudaStream_t stream);

/// embedding_backward with the tokens grouped by id on the host (CSR: group g is id ids[g],
/// its tokens positions[offsets[g] .. offsets[g + 1]), in token order; ids unique): the same
/// sums in the same order, one block per id, for tables whose tokens are many.
template <class T>
void embedding_backward_grouped(const std::int32_t* ids, const std::int32_t* offsets, const std::int32_t* positions,
                                std::size_t groups, const T* dout, float* dtable, std::size_t dim,
                                cudaStream_t stream);

/// to += from, element-wise.
template <class T>
void add(const T* from, T* to, std::size_t n, cudaStream_t stream);
/// out = a * b, element-wise (out may be a or b).
template <class T>
void mul(const T* a, const T* b, T* out, std::size_t n, cudaStream_t stream);

enum class Act { relu, gelu, silu };

/// y = act(x), n elements. GELU is the exact erf form 0.5 x (1 + erf(x / sqrt 2)), with the
/// constants of the CPU kernel (src/runtime/cpu/common.cpp). y may alias x.
template <class T>
void activation_forward(Act act, const T* x, T* y, std::size_t n, cudaStream_t stream);

/// dx = dy * act'(x), n elements; x is the forward input. GELU: act'(x) = Phi(x) + x phi(x).
/// dx may alias dy.
template <class T>
void activation_backward(Act act, const T* x, const T* dy, T* dx, std::size_t n, cudaStream_t stream);

enum class Norm { layernorm, rmsnorm };

/// Per row of x [rows, f]: layernorm y = (x - mean) * rstd * gamma + beta with
/// rstd = 1 / sqrt(var + eps) (biased variance); rmsnorm the same with mean = 0 and no beta.
/// gamma is [f]; beta is [f] or nullptr (always ignored for rmsnorm). stats is [rows, 2]:
/// (mean, rstd) per row, mean = 0 for rmsnorm; norm_backward reads it. The CPU kernel uses
/// eps = 1e-5 (src/runtime/cpu/norm.cpp).
template <class T>
void norm_forward(Norm kind, const T* x, const float* gamma, const float* beta, T* y, float* stats, std::size_t rows,
                  std::size_t f, float eps, cudaStream_t stream);

/// The gradients of norm_forward, the formulas of src/runtime/cpu/norm.cpp:
///   xhat = (x - mean) * rstd, dxhat = dy * gamma,
///   dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))   (no mean(dxhat) for rmsnorm),
///   dgamma[j] += sum_r dy[r][j] * xhat[r][j],  dbeta[j] += sum_r dy[r][j].
/// stats is norm_forward's output for the same x. dx is written (not accumulated) and may alias
/// dy. dbeta may be nullptr (rmsnorm, or a layernorm without bias). dgamma and dbeta are summed
/// over rows first (per-column sums by chunks of rows, in a fixed order, with a stream-ordered
/// scratch buffer of chunks x f floats); then one block per row computes dx.
template <class T>
void norm_backward(Norm kind, const T* x, const float* gamma, const float* stats, const T* dy, T* dx, float* dgamma,
                   float* dbeta, std::size_t rows, std::size_t f, cudaStream_t stream);

/// loss[r] = logsumexp(logits[r]) - logits[r][labels[r]] per row of logits [rows, classes]
/// (max subtracted first). Per ROW, not averaged: the CPU kernel (src/runtime/cpu/kernels.cpp,
/// SoftmaxXentKernel) reports per sample the mean over its positions, so the caller averages
/// the rows of a sample. A label outside [0, classes) gives a NaN loss.
template <class T>
void softmax_xent_forward(const T* logits, const std::int32_t* labels, float* loss, std::size_t rows,
                          std::size_t classes, cudaStream_t stream);

/// dlogits[r][c] = scale * (softmax(logits[r])[c] - (c == labels[r])), written (not accumulated).
/// For the CPU kernel's mean over positions, scale = dloss_of_sample / positions. dlogits may
/// alias logits. A label outside [0, classes) gives a row of NaN.
template <class T>
void softmax_xent_backward(const T* logits, const std::int32_t* labels, float scale, T* dlogits, std::size_t rows,
                           std::size_t classes, cudaStream_t stream);

/// out[t][c] = table[ids[t]][c]: n token ids, table is [vocab, dim] fp32 master weights, out is
/// [n, dim]. An id must be in [0, vocab); a negative id gives a row of NaN (the vocabulary size
/// is not passed, so a too-large id is the caller's bug).
template <class T>
void embedding_forward(const std::int32_t* ids, const float* table, T* out, std::size_t n, std::size_t dim,
                       cudaStream_t stream);

/// dtable[ids[t]][c] += dout[t][c] for t = 0 .. n-1 in order (a repeated id sums its rows in
/// token order, as the CPU kernel does). One thread per column walks the tokens: deterministic
/// without atomics, at the price of parallelism limited to `dim` threads. Negative ids skipped.
template <class T>
void embedding_backward(const std::int32_t* ids, const T* dout, float* dtable, std::size_t n, std::size_t dim,
                        cudaStream_t stream);

/// In place on scores [batch_heads, s, s] (raw Q K^T): row i of each matrix becomes
/// softmax(scale * scores[i][0..i]) over its visible columns j <= i, and 0 for j > i (with
/// causal = false, every column is visible).
template <class T>
void causal_softmax_forward(T* scores, std::size_t batch_heads, std::size_t s, float scale, bool causal,
                            cudaStream_t stream);

/// The gradient with respect to the RAW scores of causal_softmax_forward (the scale included):
/// in: dscores holds dprobs; out: dscores[i][j] = scale * P[i][j] * (dP[i][j] - sum_k<=i P[i][k] dP[i][k])
/// for j <= i, 0 for j > i. probs is causal_softmax_forward's output.
template <class T>
void causal_softmax_backward(const T* probs, T* dscores, std::size_t batch_heads, std::size_t s, float scale,
                             bool causal, cudaStream_t stream);

/// Batch normalisation of x [samples, channels, plane], one block per channel: the mean, then
/// the variance about it (two passes, fp32 sums in a fixed order), eps 1e-5; y = (x - mean) *
/// rstd * gamma + beta; stats [channels, 2] = (mean, rstd).
template <class T>
void batchnorm_forward(const T* x, const float* gamma, const float* beta, T* y, float* stats, std::size_t samples,
                       std::size_t channels, std::size_t plane, cudaStream_t stream);
/// dx = gamma * rstd * (dy - mean(dy) - xhat * mean(dy * xhat)); dgamma += sum(dy * xhat), dbeta
/// += sum(dy), per channel.
template <class T>
void batchnorm_backward(const T* x, const float* gamma, const float* stats, const T* dy, T* dx, float* dgamma,
                        float* dbeta, std::size_t samples, std::size_t channels, std::size_t plane,
                        cudaStream_t stream);

/// Mixtures of experts: rows moved between tokens and their experts' slots (index i32).
/// dst[i][c] = src[index[i]][c] for n rows of cols: one thread per element.
template <class T>
void gather_rows(const T* src, const std::int32_t* index, T* dst, std::size_t n, std::size_t cols,
                 cudaStream_t stream);
/// dst[r][c] = (accumulate ? dst[r][c] : 0) + sum over j < k, in order, of weight[r k + j] *
/// src[index[r k + j]][c] (weight nullptr: 1), in fp32: one thread per element, no atomics.
template <class T>
void gather_sum_rows(const T* src, const std::int32_t* index, const float* weight, T* dst, std::size_t rows,
                     std::size_t k, std::size_t cols, bool accumulate, cudaStream_t stream);
/// out[r] = sum over c of a[r][c] * b[r][c] (fp32): one block per row, block_reduce.
template <class T>
void row_dots(const T* a, const T* b, float* out, std::size_t rows, std::size_t cols, cudaStream_t stream);
/// x[r][c] *= scale[r].
template <class T>
void scale_rows(T* x, const float* scale, std::size_t rows, std::size_t cols, cudaStream_t stream);

/// A sliding window over [h, w] planes: kernel kh x kw, stride, zero padding, [oh, ow] output.
struct Window {
    std::size_t h, w, kh, kw, stride, pad, oh, ow;
};

/// cols [samples, channels x kh x kw, oh x ow] from channels [first, first + channels) of x
/// [samples, total, h, w] (zeros in the padding): one thread per column element.
template <class T>
void im2col(const T* x, std::size_t samples, std::size_t total, std::size_t first, std::size_t channels,
            const Window& g, T* cols, cudaStream_t stream);
/// dx += the adjoint of im2col, gathered: one thread per element of dx's channels [first, first +
/// channels), adding its column entries in the order (ki, kj, oy, ox) the host's col2im adds them.
template <class T>
void col2im(const T* cols, std::size_t samples, std::size_t total, std::size_t first, std::size_t channels,
            const Window& g, T* dx, cudaStream_t stream);
/// y [planes, oh, ow]: each window's first largest element (an empty window: 0), or its sum /
/// (kh x kw). One thread per output.
template <class T>
void pool_forward(bool max, const T* x, T* y, std::size_t planes, const Window& g, cudaStream_t stream);
/// dx += the pooling's gradient, gathered: one thread per input, adding the gradient of every
/// window that holds it (and, for max, picks it) in row-major window order; no atomics.
template <class T>
void pool_backward(bool max, const T* x, const T* dy, T* dx, std::size_t planes, const Window& g,
                   cudaStream_t stream);

/// One Adam step, the arithmetic of dpart::rt::adam_step (src/runtime/optimizer.cpp, PyTorch's
/// single-tensor Adam): bias corrections computed in double on the host, then per element in
/// fp32 without fused multiply-adds (bitwise the CPU result):
///   m = m*beta1 + g*(1-beta1); v = v*beta2 + g*g*(1-beta2);
///   p += -(lr / (1-beta1^step)) * (m / (sqrt(v) / sqrt(1-beta2^step) + eps)).
/// weight_decay is PyTorch Adam's coupled L2 term (g += weight_decay * p before the moments; not
/// AdamW's decoupled decay); the CPU optimizer has none, so pass 0 to match it. step is 1-based
/// (0 throws RuntimeError).
void adam_step(float* p, const float* g, float* m, float* v, std::size_t n, float lr, float beta1, float beta2,
               float eps, float weight_decay, std::uint64_t step, cudaStream_t stream);

/// p += -lr * g, as dpart::rt::sgd_step (no fused multiply-add).
void sgd_step(float* p, const float* g, std::size_t n, float lr, cudaStream_t stream);

/// p[i] = value, n elements.
void fill(float* p, float value, std::size_t n, cudaStream_t stream);

}  // namespace dpart::rt::cuda
