// The device kernels of the CUDA backend (contracts in device_ops.cuh).
//
// Three launch shapes only, chosen to be obviously correct rather than fast:
// - elementwise: 1-D grid-stride loops, 256 threads, at most 65535 blocks;
// - per row: one block of 256 threads per row (grid-stride over rows, at most 65535 blocks),
//   each thread walking the row with stride 256 in order, then block_reduce (a fixed
//   butterfly in each warp, then across the 8 warps): the same order on every run;
// - per column: rows cut into chunks of 256; blocks of 32 x 8 threads take 32 columns of one
//   chunk, each of the 8 thread rows summing rows r = y, y + 8, ... of the chunk in order, the
//   8 partial sums added in order into the chunk's partial sum (a scratch buffer); a second
//   kernel adds every column's chunk sums in chunk order. Fixed order, and parallel over rows
//   too (a column of 8192 rows is 32 chunks, not one thread walking 1024 rows).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "check.cuh"
#include "device_ops.cuh"

namespace dpart::rt::cuda {
namespace {

constexpr unsigned kThreads = 256;          // every 1-D launch; block_reduce relies on it
constexpr unsigned kWarps = kThreads / 32;  // partial sums per block_reduce
constexpr std::size_t kMaxBlocks = 65535;   // well under every grid limit; loops cover the rest
constexpr unsigned kColX = 32;              // per-column launches: columns per block
constexpr unsigned kColY = 8;               //                      row slices per block

// --- Element access: fp32 arithmetic whatever the stored type -----------------------------

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) {
    return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

__device__ __forceinline__ std::size_t global_index() {
    return static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ std::size_t grid_stride() { return static_cast<std::size_t>(gridDim.x) * blockDim.x; }

// --- Block reduction ------------------------------------------------------------------------

struct SumOp {
    __device__ float operator()(float a, float b) const { return a + b; }
    __device__ static float identity() { return 0.0f; }
};
struct MaxOp {
    __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
    __device__ static float identity() { return __int_as_float(0xff800000); }  // -inf
};

/// The reduction of v over the block's kThreads threads, returned to every thread. Every
/// thread of the block must call it (it synchronises). The order is fixed: a butterfly inside
/// each warp, then a butterfly over the warps' results; every lane ends with the same value
/// because a + b == b + a exactly.
template <class Op>
__device__ float block_reduce(float v, Op op) {
    __shared__ float partial[kWarps];
    const unsigned lane = threadIdx.x % 32;
    const unsigned warp = threadIdx.x / 32;
    for (int o = 16; o > 0; o /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();  // the previous call's readers are done with partial
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < kWarps ? partial[lane] : Op::identity();
    for (int o = 16; o > 0; o /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// --- Launch helpers (host) ------------------------------------------------------------------

unsigned elementwise_blocks(std::size_t n) {
    return static_cast<unsigned>(std::min((n + kThreads - 1) / kThreads, kMaxBlocks));
}
unsigned row_blocks(std::size_t rows) { return static_cast<unsigned>(std::min(rows, kMaxBlocks)); }
unsigned column_blocks(std::size_t cols) {
    return static_cast<unsigned>(std::min((cols + kColX - 1) / kColX, kMaxBlocks));
}
void launched(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

// --- Per-column sums --------------------------------------------------------------------------

constexpr std::size_t kRowChunk = 256;  // rows per partial column sum

/// partial[chunk][c] = sum over the chunk's rows of f(r, c), in a fixed order (see the file
/// comment). Launch with blocks of (kColX, kColY) threads, grid (column blocks, chunks).
template <class F>
__global__ void column_partial_kernel(F f, float* partial, std::size_t rows, std::size_t cols, std::size_t chunks) {
    __shared__ float part[kColY][kColX + 1];
    for (std::size_t c0 = static_cast<std::size_t>(blockIdx.x) * kColX; c0 < cols;
         c0 += static_cast<std::size_t>(gridDim.x) * kColX)
        for (std::size_t chunk = blockIdx.y; chunk < chunks; chunk += gridDim.y) {
            const std::size_t c = c0 + threadIdx.x;
            const std::size_t begin = chunk * kRowChunk;
            const std::size_t end = begin + kRowChunk < rows ? begin + kRowChunk : rows;
            float acc = 0.0f;
            if (c < cols)
                for (std::size_t r = begin + threadIdx.y; r < end; r += kColY) acc += f(r, c);
            part[threadIdx.y][threadIdx.x] = acc;
            __syncthreads();
            if (threadIdx.y == 0 && c < cols) {
                float sum = part[0][threadIdx.x];
                for (unsigned k = 1; k < kColY; ++k) sum += part[k][threadIdx.x];
                partial[chunk * cols + c] = sum;
            }
            __syncthreads();
        }
}

/// out[c] += the chunks' partial sums of column c, in chunk order.
__global__ void column_finish_kernel(const float* partial, float* out, std::size_t chunks, std::size_t cols) {
    for (std::size_t c = global_index(); c < cols; c += grid_stride()) {
        float sum = 0.0f;
        for (std::size_t k = 0; k < chunks; ++k) sum += partial[k * cols + c];
        out[c] += sum;
    }
}

template <class F>
void column_reduce(F f, float* out, std::size_t rows, std::size_t cols, cudaStream_t stream, const char* kernel) {
    if (rows == 0 || cols == 0) return;
    const std::size_t chunks = (rows + kRowChunk - 1) / kRowChunk;
    float* partial = nullptr;
    check_cuda(cudaMallocAsync(reinterpret_cast<void**>(&partial), chunks * cols * sizeof(float), stream),
               "cudaMallocAsync (column sums)");
    const dim3 grid(column_blocks(cols), static_cast<unsigned>(std::min<std::size_t>(chunks, kMaxBlocks)));
    column_partial_kernel<<<grid, dim3(kColX, kColY), 0, stream>>>(f, partial, rows, cols, chunks);
    launched(kernel);
    column_finish_kernel<<<elementwise_blocks(cols), kThreads, 0, stream>>>(partial, out, chunks, cols);
    launched(kernel);
    check_cuda(cudaFreeAsync(partial, stream), "cudaFreeAsync (column sums)");
}

template <class T>
struct ElementOf {
    const T* a;
    std::size_t cols;
    __device__ float operator()(std::size_t r, std::size_t c) const { return to_f(a[r * cols + c]); }
};

/// dy * xhat with xhat = (x - mean) * rstd, as the CPU kernel computes it.
template <class T>
struct DyXhat {
    const T* x;
    const T* dy;
    const float* stats;
    std::size_t f;
    __device__ float operator()(std::size_t r, std::size_t c) const {
        const float xhat = (to_f(x[r * f + c]) - stats[2 * r]) * stats[2 * r + 1];
        return to_f(dy[r * f + c]) * xhat;
    }
};

// --- Elementwise kernels ----------------------------------------------------------------------

template <class In, class Out>
__global__ void cast_kernel(const In* in, Out* out, std::size_t n) {
    for (std::size_t i = global_index(); i < n; i += grid_stride()) out[i] = from_f<Out>(to_f(in[i]));
}

template <class T>
__global__ void bias_add_kernel(T* y, const float* bias, std::size_t rows, std::size_t cols) {
    const std::size_t n = rows * cols;
    for (std::size_t i = global_index(); i < n; i += grid_stride()) y[i] = from_f<T>(to_f(y[i]) + bias[i % cols]);
}

// The constants of the CPU kernel (src/runtime/cpu/common.cpp, activate / activate_grad).
__device__ __forceinline__ float act_forward(Act act, float x) {
    if (act == Act::relu) return x > 0.0f ? x : 0.0f;
    if (act == Act::silu) return x / (1.0f + expf(-x));
    return 0.5f * x * (1.0f + erff(x * 0.70710678f));
}
__device__ __forceinline__ float act_grad(Act act, float x) {
    if (act == Act::relu) return x > 0.0f ? 1.0f : 0.0f;
    if (act == Act::silu) {
        const float sig = 1.0f / (1.0f + expf(-x));
        return sig * (1.0f + x * (1.0f - sig));
    }
    const float cdf = 0.5f * (1.0f + erff(x * 0.70710678f));
    const float pdf = 0.39894228f * expf(-0.5f * x * x);
    return cdf + x * pdf;
}

template <class T>
__global__ void activation_forward_kernel(Act act, const T* x, T* y, std::size_t n) {
    for (std::size_t i = global_index(); i < n; i += grid_stride()) y[i] = from_f<T>(act_forward(act, to_f(x[i])));
}

template <class T>
__global__ void activation_backward_kernel(Act act, const T* x, const T* dy, T* dx, std::size_t n) {
    for (std::size_t i = global_index(); i < n; i += grid_stride())
        dx[i] = from_f<T>(to_f(dy[i]) * act_grad(act, to_f(x[i])));
}

template <class T>
__global__ void embedding_forward_kernel(const std::int32_t* ids, const float* table, T* out, std::size_t n,
                                         std::size_t dim) {
    const std::size_t total = n * dim;
    for (std::size_t i = global_index(); i < total; i += grid_stride()) {
        const std::int32_t id = ids[i / dim];
        const float v = id < 0 ? quiet_nan() : table[static_cast<std::size_t>(id) * dim + i % dim];
        out[i] = from_f<T>(v);
    }
}

/// One thread per column, the tokens in order: deterministic with no atomics.
template <class T>
__global__ void embedding_backward_kernel(const std::int32_t* ids, const T* dout, float* dtable, std::size_t n,
                                          std::size_t dim) {
    for (std::size_t c = global_index(); c < dim; c += grid_stride())
        for (std::size_t t = 0; t < n; ++t) {
            const std::int32_t id = ids[t];
            if (id >= 0) dtable[static_cast<std::size_t>(id) * dim + c] += to_f(dout[t * dim + c]);
        }
}

/// The same sums with the tokens grouped by id (CSR: group g is token id ids[g], its tokens
/// positions[offsets[g] .. offsets[g + 1]) in token order): one block per id, threads over the
/// columns, so every row of the table is summed in parallel, in the same order as above.
template <class T>
__global__ void embedding_backward_grouped_kernel(const std::int32_t* ids, const std::int32_t* offsets,
                                                  const std::int32_t* positions, std::size_t groups, const T* dout,
                                                  float* dtable, std::size_t dim) {
    for (std::size_t g = blockIdx.x; g < groups; g += gridDim.x) {
        float* row = dtable + static_cast<std::size_t>(ids[g]) * dim;
        for (std::size_t c = threadIdx.x; c < dim; c += blockDim.x) {
            float acc = row[c];
            for (std::int32_t k = offsets[g]; k < offsets[g + 1]; ++k)
                acc += to_f(dout[static_cast<std::size_t>(positions[k]) * dim + c]);
            row[c] = acc;
        }
    }
}

/// PyTorch's single-tensor Adam in the order of src/runtime/optimizer.cpp; the _rn intrinsics
/// keep nvcc from fusing multiply-adds, so the result is bitwise the CPU's.
__global__ void adam_kernel(float* p, const float* g, float* m, float* v, std::size_t n, float beta1, float beta2,
                            float one_minus_b1, float one_minus_b2, float eps, float weight_decay, float step_size,
                            float correction2_sqrt) {
    for (std::size_t i = global_index(); i < n; i += grid_stride()) {
        float gi = g[i];
        if (weight_decay != 0.0f) gi = __fadd_rn(gi, __fmul_rn(weight_decay, p[i]));
        const float mi = __fadd_rn(__fmul_rn(m[i], beta1), __fmul_rn(gi, one_minus_b1));
        const float vi = __fadd_rn(__fmul_rn(v[i], beta2), __fmul_rn(__fmul_rn(gi, gi), one_minus_b2));
        m[i] = mi;
        v[i] = vi;
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), correction2_sqrt), eps);
        p[i] = __fadd_rn(p[i], __fmul_rn(-step_size, __fdiv_rn(mi, denom)));
    }
}

__global__ void sgd_kernel(float* p, const float* g, std::size_t n, float lr) {
    for (std::size_t i = global_index(); i < n; i += grid_stride()) p[i] = __fadd_rn(p[i], __fmul_rn(-lr, g[i]));
}

__global__ void fill_kernel(float* p, float value, std::size_t n) {
    for (std::size_t i = global_index(); i < n; i += grid_stride()) p[i] = value;
}

// --- Per-row kernels (one block of kThreads per row) ------------------------------------------

template <class T>
__global__ void norm_forward_kernel(bool subtract_mean, const T* x, const float* gamma, const float* beta, T* y,
                                    float* stats, std::size_t rows, std::size_t f, float eps) {
    for (std::size_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* in = x + r * f;
        T* out = y + r * f;
        float mean = 0.0f;
        if (subtract_mean) {  // uniform over the block: block_reduce is reached by all threads
            float s = 0.0f;
            for (std::size_t j = threadIdx.x; j < f; j += kThreads) s += to_f(in[j]);
            mean = block_reduce(s, SumOp{}) / static_cast<float>(f);
        }
        float sq = 0.0f;
        for (std::size_t j = threadIdx.x; j < f; j += kThreads) {
            const float d = to_f(in[j]) - mean;
            sq += d * d;
        }
        const float var = block_reduce(sq, SumOp{}) / static_cast<float>(f);
        const float rstd = 1.0f / sqrtf(var + eps);
        for (std::size_t j = threadIdx.x; j < f; j += kThreads)
            out[j] = from_f<T>((to_f(in[j]) - mean) * rstd * gamma[j] + (beta != nullptr ? beta[j] : 0.0f));
        if (threadIdx.x == 0) {
            stats[2 * r] = mean;
            stats[2 * r + 1] = rstd;
        }
    }
}

template <class T>
__global__ void norm_backward_dx_kernel(bool subtract_mean, const T* x, const float* gamma, const float* stats,
                                        const T* dy, T* dx, std::size_t rows, std::size_t f) {
    for (std::size_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* in = x + r * f;
        const T* g = dy + r * f;
        T* out = dx + r * f;
        const float m = stats[2 * r];
        const float rstd = stats[2 * r + 1];
        float s1 = 0.0f, s2 = 0.0f;
        for (std::size_t j = threadIdx.x; j < f; j += kThreads) {
            const float xhat = (to_f(in[j]) - m) * rstd;
            const float dxhat = to_f(g[j]) * gamma[j];
            s1 += dxhat;
            s2 += dxhat * xhat;
        }
        const float sum_dxhat = block_reduce(s1, SumOp{});
        const float sum_dxhat_xhat = block_reduce(s2, SumOp{});
        // rmsnorm subtracts no mean, so its gradient has no mean term either.
        const float a = subtract_mean ? sum_dxhat / static_cast<float>(f) : 0.0f;
        const float b = sum_dxhat_xhat / static_cast<float>(f);
        for (std::size_t j = threadIdx.x; j < f; j += kThreads) {
            const float xhat = (to_f(in[j]) - m) * rstd;
            const float dxhat = to_f(g[j]) * gamma[j];
            out[j] = from_f<T>(rstd * (dxhat - a - xhat * b));
        }
    }
}

/// The row's maximum and sum of exp(x - max), over its first `visible` entries times `scale`.
template <class T>
__device__ void row_softmax_stats(const T* row, std::size_t visible, float scale, float& max, float& sum) {
    float mx = MaxOp::identity();
    for (std::size_t j = threadIdx.x; j < visible; j += kThreads) mx = fmaxf(mx, scale * to_f(row[j]));
    max = block_reduce(mx, MaxOp{});
    float s = 0.0f;
    for (std::size_t j = threadIdx.x; j < visible; j += kThreads) s += expf(scale * to_f(row[j]) - max);
    sum = block_reduce(s, SumOp{});
}

template <class T>
__global__ void xent_forward_kernel(const T* logits, const std::int32_t* labels, float* loss, std::size_t rows,
                                    std::size_t classes) {
    for (std::size_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* row = logits + r * classes;
        float max = 0.0f, sum = 0.0f;
        row_softmax_stats(row, classes, 1.0f, max, sum);
        if (threadIdx.x == 0) {
            const std::int32_t label = labels[r];
            const bool valid = label >= 0 && static_cast<std::size_t>(label) < classes;
            loss[r] = valid ? (max + logf(sum)) - to_f(row[label]) : quiet_nan();
        }
    }
}

template <class T>
__global__ void xent_backward_kernel(const T* logits, const std::int32_t* labels, float scale, T* dlogits,
                                     std::size_t rows, std::size_t classes) {
    for (std::size_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* row = logits + r * classes;
        T* out = dlogits + r * classes;
        float max = 0.0f, sum = 0.0f;
        row_softmax_stats(row, classes, 1.0f, max, sum);
        const std::int32_t label = labels[r];
        const bool valid = label >= 0 && static_cast<std::size_t>(label) < classes;
        const float lse = max + logf(sum);
        // Each element is read and written by the same thread, after the reductions: dlogits
        // may alias logits.
        for (std::size_t j = threadIdx.x; j < classes; j += kThreads) {
            float gj = scale * expf(to_f(row[j]) - lse);
            if (j == static_cast<std::size_t>(label)) gj -= scale;
            out[j] = from_f<T>(valid ? gj : quiet_nan());
        }
    }
}

template <class T>
__global__ void causal_softmax_forward_kernel(T* scores, std::size_t total_rows, std::size_t s, float scale,
                                              bool causal) {
    for (std::size_t r = blockIdx.x; r < total_rows; r += gridDim.x) {
        T* row = scores + r * s;
        const std::size_t visible = causal ? r % s + 1 : s;
        float max = 0.0f, sum = 0.0f;
        row_softmax_stats(row, visible, scale, max, sum);
        for (std::size_t j = threadIdx.x; j < s; j += kThreads)
            row[j] = from_f<T>(j < visible ? expf(scale * to_f(row[j]) - max) / sum : 0.0f);
    }
}

template <class T>
__global__ void causal_softmax_backward_kernel(const T* probs, T* dscores, std::size_t total_rows, std::size_t s,
                                               float scale, bool causal) {
    for (std::size_t r = blockIdx.x; r < total_rows; r += gridDim.x) {
        const T* p = probs + r * s;
        T* d = dscores + r * s;
        const std::size_t visible = causal ? r % s + 1 : s;
        float dot = 0.0f;
        for (std::size_t j = threadIdx.x; j < visible; j += kThreads) dot += to_f(p[j]) * to_f(d[j]);
        dot = block_reduce(dot, SumOp{});
        for (std::size_t j = threadIdx.x; j < s; j += kThreads)
            d[j] = from_f<T>(j < visible ? scale * to_f(p[j]) * (to_f(d[j]) - dot) : 0.0f);
    }
}

template <class T>
__global__ void add_kernel(const T* from, T* to, std::size_t n) {
    for (std::size_t i = global_index(); i < n; i += grid_stride()) to[i] = from_f<T>(to_f(to[i]) + to_f(from[i]));
}

template <class T>
__global__ void mul_kernel(const T* a, const T* b, T* out, std::size_t n) {
    for (std::size_t i = global_index(); i < n; i += grid_stride()) out[i] = from_f<T>(to_f(a[i]) * to_f(b[i]));
}

// --- Batch normalisation -------------------------------------------------------------------

/// The sum of f(i) over channel c's elements (every sample's plane), by the whole block.
template <class F>
__device__ float channel_sum(std::size_t samples, std::size_t channels, std::size_t plane, std::size_t c, F&& f) {
    float acc = 0.0f;
    const std::size_t n = samples * plane;
    for (std::size_t k = threadIdx.x; k < n; k += blockDim.x) acc += f((k / plane * channels + c) * plane + k % plane);
    return block_reduce(acc, SumOp{});
}

template <class T>
__global__ void batchnorm_forward_kernel(const T* x, const float* gamma, const float* beta, T* y, float* stats,
                                         std::size_t samples, std::size_t channels, std::size_t plane) {
    const float count = static_cast<float>(samples * plane);
    for (std::size_t c = blockIdx.x; c < channels; c += gridDim.x) {
        const float mean = channel_sum(samples, channels, plane, c, [&](std::size_t i) { return to_f(x[i]); }) / count;
        const float var = channel_sum(samples, channels, plane, c, [&](std::size_t i) {
                              const float d = to_f(x[i]) - mean;
                              return d * d;
                          }) / count;
        const float rstd = 1.0f / sqrtf(var + 1e-5f);
        const float g = gamma[c], b = beta[c];
        const std::size_t n = samples * plane;
        for (std::size_t k = threadIdx.x; k < n; k += blockDim.x) {
            const std::size_t i = (k / plane * channels + c) * plane + k % plane;
            y[i] = from_f<T>((to_f(x[i]) - mean) * rstd * g + b);
        }
        if (threadIdx.x == 0) {
            stats[2 * c] = mean;
            stats[2 * c + 1] = rstd;
        }
    }
}

template <class T>
__global__ void batchnorm_backward_kernel(const T* x, const float* gamma, const float* stats, const T* dy, T* dx,
                                          float* dgamma, float* dbeta, std::size_t samples, std::size_t channels,
                                          std::size_t plane) {
    const float count = static_cast<float>(samples * plane);
    for (std::size_t c = blockIdx.x; c < channels; c += gridDim.x) {
        const float mean = stats[2 * c], rstd = stats[2 * c + 1], g = gamma[c];
        const float sum_dy = channel_sum(samples, channels, plane, c, [&](std::size_t i) { return to_f(dy[i]); });
        const float sum_dy_xhat = channel_sum(samples, channels, plane, c, [&](std::size_t i) {
            return to_f(dy[i]) * (to_f(x[i]) - mean) * rstd;
        });
        const float a = sum_dy / count, b = sum_dy_xhat / count;
        const std::size_t n = samples * plane;
        for (std::size_t k = threadIdx.x; k < n; k += blockDim.x) {
            const std::size_t i = (k / plane * channels + c) * plane + k % plane;
            const float xhat = (to_f(x[i]) - mean) * rstd;
            dx[i] = from_f<T>(g * rstd * (to_f(dy[i]) - a - xhat * b));
        }
        if (threadIdx.x == 0) {
            dgamma[c] += sum_dy_xhat;
            dbeta[c] += sum_dy;
        }
    }
}

// --- Images ---------------------------------------------------------------------------------

/// Input coordinate of output o at kernel offset k, or -1 in the padding.
__device__ __forceinline__ long long tap(std::size_t o, std::size_t k, std::size_t stride, std::size_t pad,
                                         std::size_t size) {
    const long long at = static_cast<long long>(o * stride + k) - static_cast<long long>(pad);
    return at < 0 || at >= static_cast<long long>(size) ? -1 : at;
}

template <class T>
__global__ void im2col_kernel(const T* x, std::size_t samples, std::size_t total, std::size_t first,
                              std::size_t channels, Window g, T* cols) {
    const std::size_t plane = g.oh * g.ow, field = channels * g.kh * g.kw, n = samples * field * plane;
    for (std::size_t i = global_index(); i < n; i += grid_stride()) {
        const std::size_t pos = i % plane, row = (i / plane) % field, s = i / (plane * field);
        const std::size_t c = row / (g.kh * g.kw), ki = (row / g.kw) % g.kh, kj = row % g.kw;
        const long long iy = tap(pos / g.ow, ki, g.stride, g.pad, g.h), ix = tap(pos % g.ow, kj, g.stride, g.pad, g.w);
        cols[i] = iy < 0 || ix < 0 ? from_f<T>(0.0f)
                                   : x[((s * total + first + c) * g.h + static_cast<std::size_t>(iy)) * g.w +
                                       static_cast<std::size_t>(ix)];
    }
}

/// The outputs o (along one axis) whose window holds input coordinate `at` at offset k: o with
/// o * stride + k - pad == at.
__device__ __forceinline__ long long output_at(std::size_t at, std::size_t k, const Window& g, std::size_t outputs) {
    const long long padded = static_cast<long long>(at + g.pad) - static_cast<long long>(k);
    if (padded < 0 || padded % static_cast<long long>(g.stride) != 0) return -1;
    const long long o = padded / static_cast<long long>(g.stride);
    return o < static_cast<long long>(outputs) ? o : -1;
}

template <class T>
__global__ void col2im_kernel(const T* cols, std::size_t samples, std::size_t total, std::size_t first,
                              std::size_t channels, Window g, T* dx) {
    const std::size_t plane = g.oh * g.ow, field = channels * g.kh * g.kw, image = g.h * g.w;
    const std::size_t n = samples * channels * image;
    for (std::size_t i = global_index(); i < n; i += grid_stride()) {
        const std::size_t ix = i % g.w, iy = (i / g.w) % g.h, c = (i / image) % channels, s = i / (image * channels);
        T* out = dx + ((s * total + first + c) * g.h + iy) * g.w + ix;
        float acc = to_f(*out);
        for (std::size_t ki = 0; ki < g.kh; ++ki) {
            const long long oy = output_at(iy, ki, g, g.oh);
            if (oy < 0) continue;
            for (std::size_t kj = 0; kj < g.kw; ++kj) {
                const long long ox = output_at(ix, kj, g, g.ow);
                if (ox < 0) continue;
                const std::size_t row = (c * g.kh + ki) * g.kw + kj;
                acc += to_f(cols[(s * field + row) * plane + static_cast<std::size_t>(oy) * g.ow +
                                 static_cast<std::size_t>(ox)]);
            }
        }
        *out = from_f<T>(acc);
    }
}

/// The first largest element of output (oy, ox)'s window in plane p (row-major), or -1 when the
/// window holds no input.
template <class T>
__device__ long long window_argmax(const T* x, std::size_t p, std::size_t oy, std::size_t ox, const Window& g) {
    long long best = -1;
    float best_value = 0.0f;
    for (std::size_t ki = 0; ki < g.kh; ++ki) {
        const long long iy = tap(oy, ki, g.stride, g.pad, g.h);
        if (iy < 0) continue;
        for (std::size_t kj = 0; kj < g.kw; ++kj) {
            const long long ix = tap(ox, kj, g.stride, g.pad, g.w);
            if (ix < 0) continue;
            const long long at = static_cast<long long>((p * g.h + static_cast<std::size_t>(iy)) * g.w) + ix;
            const float v = to_f(x[at]);
            if (best < 0 || v > best_value) {
                best = at;
                best_value = v;
            }
        }
    }
    return best;
}

template <class T>
__global__ void pool_forward_kernel(bool max, const T* x, T* y, std::size_t planes, Window g) {
    const std::size_t n = planes * g.oh * g.ow;
    const float area = static_cast<float>(g.kh * g.kw);
    for (std::size_t i = global_index(); i < n; i += grid_stride()) {
        const std::size_t ox = i % g.ow, oy = (i / g.ow) % g.oh, p = i / (g.oh * g.ow);
        if (max) {
            const long long at = window_argmax(x, p, oy, ox, g);
            y[i] = at < 0 ? from_f<T>(0.0f) : x[at];
            continue;
        }
        float sum = 0.0f;
        for (std::size_t ki = 0; ki < g.kh; ++ki) {
            const long long iy = tap(oy, ki, g.stride, g.pad, g.h);
            if (iy < 0) continue;
            for (std::size_t kj = 0; kj < g.kw; ++kj) {
                const long long ix = tap(ox, kj, g.stride, g.pad, g.w);
                if (ix >= 0) sum += to_f(x[(p * g.h + static_cast<std::size_t>(iy)) * g.w + static_cast<std::size_t>(ix)]);
            }
        }
        y[i] = from_f<T>(__fdiv_rn(sum, area));
    }
}

template <class T>
__global__ void pool_backward_kernel(bool max, const T* x, const T* dy, T* dx, std::size_t planes, Window g) {
    const std::size_t image = g.h * g.w, n = planes * image;
    const float area = static_cast<float>(g.kh * g.kw);
    for (std::size_t i = global_index(); i < n; i += grid_stride()) {
        const std::size_t ix = i % g.w, iy = (i / g.w) % g.h, p = i / image;
        float acc = to_f(dx[i]);
        // The windows holding (iy, ix), in row-major order: oy * stride - pad <= iy < oy * stride
        // - pad + kh, likewise for ox.
        const long long lo_y = (static_cast<long long>(iy + g.pad) - static_cast<long long>(g.kh) + static_cast<long long>(g.stride)) /
                               static_cast<long long>(g.stride);
        const long long lo_x = (static_cast<long long>(ix + g.pad) - static_cast<long long>(g.kw) + static_cast<long long>(g.stride)) /
                               static_cast<long long>(g.stride);
        for (long long oy = lo_y < 0 ? 0 : lo_y; oy < static_cast<long long>(g.oh); ++oy) {
            const long long top = oy * static_cast<long long>(g.stride) - static_cast<long long>(g.pad);
            if (top > static_cast<long long>(iy)) break;
            if (top + static_cast<long long>(g.kh) <= static_cast<long long>(iy)) continue;
            for (long long ox = lo_x < 0 ? 0 : lo_x; ox < static_cast<long long>(g.ow); ++ox) {
                const long long left = ox * static_cast<long long>(g.stride) - static_cast<long long>(g.pad);
                if (left > static_cast<long long>(ix)) break;
                if (left + static_cast<long long>(g.kw) <= static_cast<long long>(ix)) continue;
                const std::size_t out = (p * g.oh + static_cast<std::size_t>(oy)) * g.ow + static_cast<std::size_t>(ox);
                if (max) {
                    if (window_argmax(x, p, static_cast<std::size_t>(oy), static_cast<std::size_t>(ox), g) ==
                        static_cast<long long>(i))
                        acc += to_f(dy[out]);
                } else {
                    acc += __fdiv_rn(to_f(dy[out]), area);
                }
            }
        }
        dx[i] = from_f<T>(acc);
    }
}

}  // namespace

// --- Host entry points ------------------------------------------------------------------------

template <class T>
void batchnorm_forward(const T* x, const float* gamma, const float* beta, T* y, float* stats, std::size_t samples,
                       std::size_t channels, std::size_t plane, cudaStream_t stream) {
    if (channels == 0 || samples * plane == 0) return;
    batchnorm_forward_kernel<<<row_blocks(channels), kThreads, 0, stream>>>(x, gamma, beta, y, stats, samples, channels,
                                                                            plane);
    launched("batchnorm_forward kernel launch");
}

template <class T>
void batchnorm_backward(const T* x, const float* gamma, const float* stats, const T* dy, T* dx, float* dgamma,
                        float* dbeta, std::size_t samples, std::size_t channels, std::size_t plane,
                        cudaStream_t stream) {
    if (channels == 0 || samples * plane == 0) return;
    batchnorm_backward_kernel<<<row_blocks(channels), kThreads, 0, stream>>>(x, gamma, stats, dy, dx, dgamma, dbeta,
                                                                             samples, channels, plane);
    launched("batchnorm_backward kernel launch");
}

template <class T>
void im2col(const T* x, std::size_t samples, std::size_t total, std::size_t first, std::size_t channels,
            const Window& g, T* cols, cudaStream_t stream) {
    const std::size_t n = samples * channels * g.kh * g.kw * g.oh * g.ow;
    if (n == 0) return;
    im2col_kernel<<<elementwise_blocks(n), kThreads, 0, stream>>>(x, samples, total, first, channels, g, cols);
    launched("im2col kernel launch");
}

template <class T>
void col2im(const T* cols, std::size_t samples, std::size_t total, std::size_t first, std::size_t channels,
            const Window& g, T* dx, cudaStream_t stream) {
    const std::size_t n = samples * channels * g.h * g.w;
    if (n == 0) return;
    col2im_kernel<<<elementwise_blocks(n), kThreads, 0, stream>>>(cols, samples, total, first, channels, g, dx);
    launched("col2im kernel launch");
}

template <class T>
void pool_forward(bool max, const T* x, T* y, std::size_t planes, const Window& g, cudaStream_t stream) {
    const std::size_t n = planes * g.oh * g.ow;
    if (n == 0) return;
    pool_forward_kernel<<<elementwise_blocks(n), kThreads, 0, stream>>>(max, x, y, planes, g);
    launched("pool_forward kernel launch");
}

template <class T>
void pool_backward(bool max, const T* x, const T* dy, T* dx, std::size_t planes, const Window& g,
                   cudaStream_t stream) {
    const std::size_t n = planes * g.h * g.w;
    if (n == 0 || g.stride == 0) return;
    pool_backward_kernel<<<elementwise_blocks(n), kThreads, 0, stream>>>(max, x, dy, dx, planes, g);
    launched("pool_backward kernel launch");
}

template <class T>
void embedding_backward_grouped(const std::int32_t* ids, const std::int32_t* offsets, const std::int32_t* positions,
                                std::size_t groups, const T* dout, float* dtable, std::size_t dim,
                                cudaStream_t stream) {
    if (groups == 0 || dim == 0) return;
    embedding_backward_grouped_kernel<<<row_blocks(groups), kThreads, 0, stream>>>(ids, offsets, positions, groups,
                                                                                  dout, dtable, dim);
    launched("embedding_backward_grouped kernel launch");
}

template <class T>
void add(const T* from, T* to, std::size_t n, cudaStream_t stream) {
    if (n == 0) return;
    add_kernel<<<elementwise_blocks(n), kThreads, 0, stream>>>(from, to, n);
    launched("add kernel launch");
}

template <class T>
void mul(const T* a, const T* b, T* out, std::size_t n, cudaStream_t stream) {
    if (n == 0) return;
    mul_kernel<<<elementwise_blocks(n), kThreads, 0, stream>>>(a, b, out, n);
    launched("mul kernel launch");
}

void cast(const float* in, __nv_bfloat16* out, std::size_t n, cudaStream_t stream) {
    if (n == 0) return;
    cast_kernel<<<elementwise_blocks(n), kThreads, 0, stream>>>(in, out, n);
    launched("cast fp32->bf16 kernel launch");
}

void cast(const __nv_bfloat16* in, float* out, std::size_t n, cudaStream_t stream) {
    if (n == 0) return;
    cast_kernel<<<elementwise_blocks(n), kThreads, 0, stream>>>(in, out, n);
    launched("cast bf16->fp32 kernel launch");
}

template <class T>
void bias_add(T* y, const float* bias, std::size_t rows, std::size_t cols, cudaStream_t stream) {
    if (rows == 0 || cols == 0) return;
    bias_add_kernel<<<elementwise_blocks(rows * cols), kThreads, 0, stream>>>(y, bias, rows, cols);
    launched("bias_add kernel launch");
}

template <class T>
void column_sums(const T* dy, float* dbias, std::size_t rows, std::size_t cols, cudaStream_t stream) {
    column_reduce(ElementOf<T>{dy, cols}, dbias, rows, cols, stream, "column_sums kernel launch");
}

template <class T>
void activation_forward(Act act, const T* x, T* y, std::size_t n, cudaStream_t stream) {
    if (n == 0) return;
    activation_forward_kernel<<<elementwise_blocks(n), kThreads, 0, stream>>>(act, x, y, n);
    launched("activation_forward kernel launch");
}

template <class T>
void activation_backward(Act act, const T* x, const T* dy, T* dx, std::size_t n, cudaStream_t stream) {
    if (n == 0) return;
    activation_backward_kernel<<<elementwise_blocks(n), kThreads, 0, stream>>>(act, x, dy, dx, n);
    launched("activation_backward kernel launch");
}

template <class T>
void norm_forward(Norm kind, const T* x, const float* gamma, const float* beta, T* y, float* stats, std::size_t rows,
                  std::size_t f, float eps, cudaStream_t stream) {
    if (rows == 0 || f == 0) return;
    const bool layer = kind == Norm::layernorm;
    norm_forward_kernel<<<row_blocks(rows), kThreads, 0, stream>>>(layer, x, gamma, layer ? beta : nullptr, y, stats,
                                                                    rows, f, eps);
    launched("norm_forward kernel launch");
}

template <class T>
void norm_backward(Norm kind, const T* x, const float* gamma, const float* stats, const T* dy, T* dx, float* dgamma,
                   float* dbeta, std::size_t rows, std::size_t f, cudaStream_t stream) {
    if (rows == 0 || f == 0) return;
    // The parameter gradients first: they read x and dy, which dx may then overwrite.
    column_reduce(DyXhat<T>{x, dy, stats, f}, dgamma, rows, f, stream, "norm_backward dgamma kernel launch");
    if (dbeta != nullptr) column_reduce(ElementOf<T>{dy, f}, dbeta, rows, f, stream, "norm_backward dbeta kernel launch");
    norm_backward_dx_kernel<<<row_blocks(rows), kThreads, 0, stream>>>(kind == Norm::layernorm, x, gamma, stats, dy,
                                                                        dx, rows, f);
    launched("norm_backward dx kernel launch");
}

template <class T>
void softmax_xent_forward(const T* logits, const std::int32_t* labels, float* loss, std::size_t rows,
                          std::size_t classes, cudaStream_t stream) {
    if (rows == 0 || classes == 0) return;
    xent_forward_kernel<<<row_blocks(rows), kThreads, 0, stream>>>(logits, labels, loss, rows, classes);
    launched("softmax_xent_forward kernel launch");
}

template <class T>
void softmax_xent_backward(const T* logits, const std::int32_t* labels, float scale, T* dlogits, std::size_t rows,
                           std::size_t classes, cudaStream_t stream) {
    if (rows == 0 || classes == 0) return;
    xent_backward_kernel<<<row_blocks(rows), kThreads, 0, stream>>>(logits, labels, scale, dlogits, rows, classes);
    launched("softmax_xent_backward kernel launch");
}

template <class T>
void embedding_forward(const std::int32_t* ids, const float* table, T* out, std::size_t n, std::size_t dim,
                       cudaStream_t stream) {
    if (n == 0 || dim == 0) return;
    embedding_forward_kernel<<<elementwise_blocks(n * dim), kThreads, 0, stream>>>(ids, table, out, n, dim);
    launched("embedding_forward kernel launch");
}

template <class T>
void embedding_backward(const std::int32_t* ids, const T* dout, float* dtable, std::size_t n, std::size_t dim,
                        cudaStream_t stream) {
    if (n == 0 || dim == 0) return;
    embedding_backward_kernel<<<elementwise_blocks(dim), kThreads, 0, stream>>>(ids, dout, dtable, n, dim);
    launched("embedding_backward kernel launch");
}

template <class T>
void causal_softmax_forward(T* scores, std::size_t batch_heads, std::size_t s, float scale, bool causal,
                            cudaStream_t stream) {
    if (batch_heads == 0 || s == 0) return;
    const std::size_t rows = batch_heads * s;
    causal_softmax_forward_kernel<<<row_blocks(rows), kThreads, 0, stream>>>(scores, rows, s, scale, causal);
    launched("causal_softmax_forward kernel launch");
}

template <class T>
void causal_softmax_backward(const T* probs, T* dscores, std::size_t batch_heads, std::size_t s, float scale,
                             bool causal, cudaStream_t stream) {
    if (batch_heads == 0 || s == 0) return;
    const std::size_t rows = batch_heads * s;
    causal_softmax_backward_kernel<<<row_blocks(rows), kThreads, 0, stream>>>(probs, dscores, rows, s, scale, causal);
    launched("causal_softmax_backward kernel launch");
}

void adam_step(float* p, const float* g, float* m, float* v, std::size_t n, float lr, float beta1, float beta2,
               float eps, float weight_decay, std::uint64_t step, cudaStream_t stream) {
    if (step == 0) throw RuntimeError("adam_step: step is 1-based, got 0");
    if (n == 0) return;
    // As src/runtime/optimizer.cpp: the bias corrections in double, then fp32 scalars.
    const double correction1 = 1.0 - std::pow(static_cast<double>(beta1), static_cast<double>(step));
    const double correction2 = 1.0 - std::pow(static_cast<double>(beta2), static_cast<double>(step));
    const auto step_size = static_cast<float>(static_cast<double>(lr) / correction1);
    const auto correction2_sqrt = static_cast<float>(std::sqrt(correction2));
    const float one_minus_b1 = 1.0f - beta1;
    const float one_minus_b2 = 1.0f - beta2;
    adam_kernel<<<elementwise_blocks(n), kThreads, 0, stream>>>(p, g, m, v, n, beta1, beta2, one_minus_b1, one_minus_b2,
                                                                eps, weight_decay, step_size, correction2_sqrt);
    launched("adam_step kernel launch");
}

void sgd_step(float* p, const float* g, std::size_t n, float lr, cudaStream_t stream) {
    if (n == 0) return;
    sgd_kernel<<<elementwise_blocks(n), kThreads, 0, stream>>>(p, g, n, lr);
    launched("sgd_step kernel launch");
}

void fill(float* p, float value, std::size_t n, cudaStream_t stream) {
    if (n == 0) return;
    fill_kernel<<<elementwise_blocks(n), kThreads, 0, stream>>>(p, value, n);
    launched("fill kernel launch");
}

// --- Mixtures of experts ------------------------------------------------------------------------

namespace {

template <class T>
__global__ void gather_rows_kernel(const T* src, const std::int32_t* index, T* dst, std::size_t n, std::size_t cols) {
    for (std::size_t i = global_index(); i < n * cols; i += grid_stride()) {
        const std::size_t r = i / cols, c = i % cols;
        dst[i] = src[static_cast<std::size_t>(index[r]) * cols + c];
    }
}

template <class T>
__global__ void gather_sum_rows_kernel(const T* src, const std::int32_t* index, const float* weight, T* dst,
                                       std::size_t rows, std::size_t k, std::size_t cols, bool accumulate) {
    for (std::size_t i = global_index(); i < rows * cols; i += grid_stride()) {
        const std::size_t r = i / cols, c = i % cols;
        float acc = accumulate ? to_f(dst[i]) : 0.0f;
        for (std::size_t j = 0; j < k; ++j) {
            const float w = weight != nullptr ? weight[r * k + j] : 1.0f;
            acc = __fadd_rn(acc, __fmul_rn(w, to_f(src[static_cast<std::size_t>(index[r * k + j]) * cols + c])));
        }
        dst[i] = from_f<T>(acc);
    }
}

template <class T>
__global__ void row_dots_kernel(const T* a, const T* b, float* out, std::size_t rows, std::size_t cols) {
    for (std::size_t r = blockIdx.x; r < rows; r += gridDim.x) {
        float dot = 0.0f;
        for (std::size_t c = threadIdx.x; c < cols; c += kThreads) dot += to_f(a[r * cols + c]) * to_f(b[r * cols + c]);
        dot = block_reduce(dot, SumOp{});
        if (threadIdx.x == 0) out[r] = dot;
    }
}

template <class T>
__global__ void scale_rows_kernel(T* x, const float* scale, std::size_t rows, std::size_t cols) {
    for (std::size_t i = global_index(); i < rows * cols; i += grid_stride())
        x[i] = from_f<T>(__fmul_rn(scale[i / cols], to_f(x[i])));
}

}  // namespace

template <class T>
void gather_rows(const T* src, const std::int32_t* index, T* dst, std::size_t n, std::size_t cols,
                 cudaStream_t stream) {
    if (n == 0 || cols == 0) return;
    gather_rows_kernel<<<elementwise_blocks(n * cols), kThreads, 0, stream>>>(src, index, dst, n, cols);
    launched("gather_rows kernel launch");
}

template <class T>
void gather_sum_rows(const T* src, const std::int32_t* index, const float* weight, T* dst, std::size_t rows,
                     std::size_t k, std::size_t cols, bool accumulate, cudaStream_t stream) {
    if (rows == 0 || cols == 0) return;
    gather_sum_rows_kernel<<<elementwise_blocks(rows * cols), kThreads, 0, stream>>>(src, index, weight, dst, rows, k,
                                                                                     cols, accumulate);
    launched("gather_sum_rows kernel launch");
}

template <class T>
void row_dots(const T* a, const T* b, float* out, std::size_t rows, std::size_t cols, cudaStream_t stream) {
    if (rows == 0) return;
    row_dots_kernel<<<row_blocks(rows), kThreads, 0, stream>>>(a, b, out, rows, cols);
    launched("row_dots kernel launch");
}

template <class T>
void scale_rows(T* x, const float* scale, std::size_t rows, std::size_t cols, cudaStream_t stream) {
    if (rows == 0 || cols == 0) return;
    scale_rows_kernel<<<elementwise_blocks(rows * cols), kThreads, 0, stream>>>(x, scale, rows, cols);
    launched("scale_rows kernel launch");
}

// --- Explicit instantiations: float and __nv_bfloat16 ------------------------------------------

#define DPART_DEVICE_OPS_INSTANTIATE(T)                                                                              \
    template void bias_add<T>(T*, const float*, std::size_t, std::size_t, cudaStream_t);                             \
    template void column_sums<T>(const T*, float*, std::size_t, std::size_t, cudaStream_t);                          \
    template void activation_forward<T>(Act, const T*, T*, std::size_t, cudaStream_t);                               \
    template void activation_backward<T>(Act, const T*, const T*, T*, std::size_t, cudaStream_t);                    \
    template void norm_forward<T>(Norm, const T*, const float*, const float*, T*, float*, std::size_t, std::size_t,  \
                                  float, cudaStream_t);                                                              \
    template void norm_backward<T>(Norm, const T*, const float*, const float*, const T*, T*, float*, float*,         \
                                   std::size_t, std::size_t, cudaStream_t);                                          \
    template void softmax_xent_forward<T>(const T*, const std::int32_t*, float*, std::size_t, std::size_t,           \
                                          cudaStream_t);                                                             \
    template void softmax_xent_backward<T>(const T*, const std::int32_t*, float, T*, std::size_t, std::size_t,       \
                                           cudaStream_t);                                                            \
    template void embedding_forward<T>(const std::int32_t*, const float*, T*, std::size_t, std::size_t,              \
                                       cudaStream_t);                                                                \
    template void embedding_backward<T>(const std::int32_t*, const T*, float*, std::size_t, std::size_t,             \
                                        cudaStream_t);                                                               \
    template void embedding_backward_grouped<T>(const std::int32_t*, const std::int32_t*, const std::int32_t*,        \
                                                std::size_t, const T*, float*, std::size_t, cudaStream_t);           \
    template void batchnorm_forward<T>(const T*, const float*, const float*, T*, float*, std::size_t, std::size_t,    \
                                       std::size_t, cudaStream_t);                                                   \
    template void batchnorm_backward<T>(const T*, const float*, const float*, const T*, T*, float*, float*,          \
                                        std::size_t, std::size_t, std::size_t, cudaStream_t);                        \
    template void im2col<T>(const T*, std::size_t, std::size_t, std::size_t, std::size_t, const Window&, T*,         \
                            cudaStream_t);                                                                           \
    template void col2im<T>(const T*, std::size_t, std::size_t, std::size_t, std::size_t, const Window&, T*,         \
                            cudaStream_t);                                                                           \
    template void pool_forward<T>(bool, const T*, T*, std::size_t, const Window&, cudaStream_t);                     \
    template void pool_backward<T>(bool, const T*, const T*, T*, std::size_t, const Window&, cudaStream_t);          \
    template void add<T>(const T*, T*, std::size_t, cudaStream_t);                                                   \
    template void mul<T>(const T*, const T*, T*, std::size_t, cudaStream_t);                                         \
    template void causal_softmax_forward<T>(T*, std::size_t, std::size_t, float, bool, cudaStream_t);                \
    template void causal_softmax_backward<T>(const T*, T*, std::size_t, std::size_t, float, bool, cudaStream_t);     \
    template void gather_rows<T>(const T*, const std::int32_t*, T*, std::size_t, std::size_t, cudaStream_t);          \
    template void gather_sum_rows<T>(const T*, const std::int32_t*, const float*, T*, std::size_t, std::size_t,       \
                                     std::size_t, bool, cudaStream_t);                                               \
    template void row_dots<T>(const T*, const T*, float*, std::size_t, std::size_t, cudaStream_t);                   \
    template void scale_rows<T>(T*, const float*, std::size_t, std::size_t, cudaStream_t);

DPART_DEVICE_OPS_INSTANTIATE(float)
DPART_DEVICE_OPS_INSTANTIATE(__nv_bfloat16)
#undef DPART_DEVICE_OPS_INSTANTIATE

}  // namespace dpart::rt::cuda
