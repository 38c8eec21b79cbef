// DeviceOps on the host: every operation of the device backend computed on the CPU, with bf16
// stored as bf16 (rounded to nearest even on every store, as the GPU stores it), so that the
// device layers' composition runs and is tested on any machine. Products go through OpenBLAS
// (cpu::gemm); reductions run in a fixed order.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#include "../cpu/blas.hpp"
#include "../cpu/common.hpp"
#include "dpart/core/error.hpp"
#include "dpart/runtime/device.hpp"

namespace dpart::rt {
namespace {

std::uint16_t to_bf16(float f) noexcept {
    std::uint32_t u = 0;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return static_cast<std::uint16_t>(u >> 16);
}

float from_bf16(std::uint16_t h) noexcept {
    const std::uint32_t u = static_cast<std::uint32_t>(h) << 16;
    float f = 0;
    std::memcpy(&f, &u, 4);
    return f;
}

float get(const DeviceSpan& s, std::size_t i) {
    switch (s.elem) {
    case Elem::f32: return static_cast<const float*>(s.ptr)[i];
    case Elem::bf16: return from_bf16(static_cast<const std::uint16_t*>(s.ptr)[i]);
    case Elem::i32: return static_cast<float>(static_cast<const std::int32_t*>(s.ptr)[i]);
    }
    return 0.0f;
}

void put(const DeviceSpan& s, std::size_t i, float v) {
    switch (s.elem) {
    case Elem::f32: static_cast<float*>(s.ptr)[i] = v; break;
    case Elem::bf16: static_cast<std::uint16_t*>(s.ptr)[i] = to_bf16(v); break;
    case Elem::i32: static_cast<std::int32_t*>(s.ptr)[i] = static_cast<std::int32_t>(v); break;
    }
}

std::int32_t id_at(const DeviceSpan& s, std::size_t i) {
    if (s.elem != Elem::i32) throw std::invalid_argument("host ops: token ids and labels must be i32");
    return static_cast<const std::int32_t*>(s.ptr)[i];
}

void need(const DeviceSpan& s, std::size_t count, const char* what) {
    if (s.count < count)
        throw std::invalid_argument(fmt::format("host ops: {} has {} elements, {} needed", what, s.count, count));
}

/// The span's first n values as floats.
std::vector<float> floats(const DeviceSpan& s, std::size_t n) {
    std::vector<float> out(n);
    if (s.elem == Elem::f32) std::memcpy(out.data(), s.ptr, n * 4);
    else
        for (std::size_t i = 0; i < n; ++i) out[i] = get(s, i);
    return out;
}

cpu::Op op(Trans t) { return t == Trans::trans ? cpu::Op::trans : cpu::Op::none; }

class HostOps final : public DeviceOps {
public:
    ~HostOps() override = default;
    [[nodiscard]] std::string name() const override { return "host"; }

    DeviceSpan allocate(std::size_t count, Elem elem) override {
        void* p = std::calloc(std::max<std::size_t>(count, 1), elem_bytes(elem));
        if (p == nullptr) throw RuntimeError(fmt::format("host ops: out of memory allocating {} elements", count));
        const DeviceSpan s{p, count, elem};
        meter_.add(allocation_bytes(s));
        return s;
    }
    /// Filled with NaN (i32: -1): a layer that reads a buffer it was meant to overwrite then
    /// fails its tests here instead of reading stale values on a GPU.
    DeviceSpan allocate_uninitialized(std::size_t count, Elem elem) override {
        const DeviceSpan s = allocate(count, elem);
        if (elem == Elem::i32) std::memset(s.ptr, 0xff, count * 4);
        else
            for (std::size_t i = 0; i < count; ++i) put(s, i, std::numeric_limits<float>::quiet_NaN());
        return s;
    }
    void release(DeviceSpan s) noexcept override {
        if (s.ptr == nullptr) return;
        meter_.add(-allocation_bytes(s));
        std::free(s.ptr);
    }
    MemoryMeter* meter() noexcept override { return &meter_; }

    void upload(std::span<const float> from, DeviceSpan to) override {
        need(to, from.size(), "upload's destination");
        for (std::size_t i = 0; i < from.size(); ++i) put(to, i, from[i]);
    }
    void download(DeviceSpan from, std::span<float> to) override {
        need(from, to.size(), "download's source");
        for (std::size_t i = 0; i < to.size(); ++i) to[i] = get(from, i);
    }
    void copy(DeviceSpan from, DeviceSpan to) override {
        need(to, from.count, "copy's destination");
        if (from.elem == to.elem) std::memmove(to.ptr, from.ptr, from.bytes());
        else
            for (std::size_t i = 0; i < from.count; ++i) put(to, i, get(from, i));
    }
    void fill(DeviceSpan s, float value) override {
        for (std::size_t i = 0; i < s.count; ++i) put(s, i, value);
    }
    void add(DeviceSpan from, DeviceSpan to) override {
        need(to, from.count, "add's destination");
        for (std::size_t i = 0; i < from.count; ++i) put(to, i, get(to, i) + get(from, i));
    }
    void mul(DeviceSpan a, DeviceSpan b, DeviceSpan out) override {
        need(b, a.count, "mul's b");
        need(out, a.count, "mul's output");
        for (std::size_t i = 0; i < a.count; ++i) put(out, i, get(a, i) * get(b, i));
    }
    void synchronize() override {}

    void gemm(Trans ta, Trans tb, std::size_t m, std::size_t n, std::size_t k, float alpha, DeviceSpan a,
              std::size_t lda, DeviceSpan b, std::size_t ldb, float beta, DeviceSpan c, std::size_t ldc) override {
        gemm_batched(ta, tb, m, n, k, alpha, a, lda, 0, b, ldb, 0, beta, c, ldc, 0, 1);
    }
    void gemm_batched(Trans ta, Trans tb, std::size_t m, std::size_t n, std::size_t k, float alpha, DeviceSpan a,
                      std::size_t lda, std::size_t stride_a, DeviceSpan b, std::size_t ldb, std::size_t stride_b,
                      float beta, DeviceSpan c, std::size_t ldc, std::size_t stride_c, std::size_t batch) override {
        if (a.elem != b.elem || (c.elem != a.elem && c.elem != Elem::f32) || a.elem == Elem::i32)
            throw std::invalid_argument("host ops: gemm on mismatched element types");
        if (batch == 0 || m == 0 || n == 0) return;
        const std::size_t a_rows = ta == Trans::none ? m : k;
        const std::size_t b_rows = tb == Trans::none ? k : n;
        const std::size_t a_need = (batch - 1) * stride_a + (a_rows - 1) * lda + (ta == Trans::none ? k : m);
        const std::size_t b_need = (batch - 1) * stride_b + (b_rows - 1) * ldb + (tb == Trans::none ? n : k);
        const std::size_t c_need = (batch - 1) * stride_c + (m - 1) * ldc + n;
        need(a, k == 0 ? 0 : a_need, "gemm's A");
        need(b, k == 0 ? 0 : b_need, "gemm's B");
        need(c, c_need, "gemm's C");
        // Products of bf16 values are exact in fp32: convert, multiply in fp32, round C once.
        const std::vector<float> af = floats(a, k == 0 ? 0 : a_need);
        const std::vector<float> bf = floats(b, k == 0 ? 0 : b_need);
        std::vector<float> cf = floats(c, c_need);
        for (std::size_t i = 0; i < batch; ++i)
            cpu::gemm(op(ta), op(tb), m, n, k, alpha, af.data() + i * stride_a, lda, bf.data() + i * stride_b, ldb,
                      beta, cf.data() + i * stride_c, ldc);
        for (std::size_t i = 0; i < batch; ++i)
            for (std::size_t r = 0; r < m; ++r)
                for (std::size_t j = 0; j < n; ++j) {
                    const std::size_t at = i * stride_c + r * ldc + j;
                    put(c, at, cf[at]);
                }
    }

    void bias_add(DeviceSpan y, DeviceSpan bias, std::size_t rows, std::size_t cols) override {
        need(y, rows * cols, "bias_add's y");
        need(bias, cols, "bias_add's bias");
        for (std::size_t r = 0; r < rows; ++r)
            for (std::size_t j = 0; j < cols; ++j) put(y, r * cols + j, get(y, r * cols + j) + get(bias, j));
    }
    void column_sums(DeviceSpan dy, DeviceSpan dbias, std::size_t rows, std::size_t cols) override {
        need(dy, rows * cols, "column_sums' dy");
        need(dbias, cols, "column_sums' dbias");
        for (std::size_t j = 0; j < cols; ++j) {
            float s = get(dbias, j);
            for (std::size_t r = 0; r < rows; ++r) s += get(dy, r * cols + j);
            put(dbias, j, s);
        }
    }
    void activation_forward(Activation a, DeviceSpan x, DeviceSpan y) override {
        need(y, x.count, "activation's y");
        for (std::size_t i = 0; i < x.count; ++i) put(y, i, cpu::activate(a, get(x, i)));
    }
    void activation_backward(Activation a, DeviceSpan x, DeviceSpan dy, DeviceSpan dx) override {
        need(dy, x.count, "activation's dy");
        need(dx, x.count, "activation's dx");
        for (std::size_t i = 0; i < x.count; ++i) put(dx, i, get(dy, i) * cpu::activate_grad(a, get(x, i)));
    }

    void norm_forward(NormKind kind, DeviceSpan x, DeviceSpan gamma, std::optional<DeviceSpan> beta, DeviceSpan y,
                      DeviceSpan stats, std::size_t rows, std::size_t f) override {
        constexpr double eps = 1e-5;
        need(x, rows * f, "norm's x");
        need(y, rows * f, "norm's y");
        need(stats, rows * 2, "norm's stats");
        for (std::size_t r = 0; r < rows; ++r) {
            double mean = 0.0;
            if (kind == NormKind::layernorm) {
                for (std::size_t j = 0; j < f; ++j) mean += get(x, r * f + j);
                mean /= static_cast<double>(f);
            }
            double var = 0.0;
            for (std::size_t j = 0; j < f; ++j) {
                const double d = get(x, r * f + j) - mean;
                var += d * d;
            }
            const auto rstd = static_cast<float>(1.0 / std::sqrt(var / static_cast<double>(f) + eps));
            const auto m = static_cast<float>(mean);
            for (std::size_t j = 0; j < f; ++j) {
                float v = (get(x, r * f + j) - m) * rstd * get(gamma, j);
                if (beta) v += get(*beta, j);
                put(y, r * f + j, v);
            }
            put(stats, 2 * r, m);
            put(stats, 2 * r + 1, rstd);
        }
    }
    void norm_backward(NormKind kind, DeviceSpan x, DeviceSpan gamma, DeviceSpan stats, DeviceSpan dy, DeviceSpan dx,
                       DeviceSpan dgamma, std::optional<DeviceSpan> dbeta, std::size_t rows, std::size_t f) override {
        need(dx, rows * f, "norm's dx");
        std::vector<float> xhat(f), dxhat(f);
        for (std::size_t r = 0; r < rows; ++r) {
            const float m = get(stats, 2 * r);
            const float rstd = get(stats, 2 * r + 1);
            double mean_dxhat = 0.0, mean_dxhat_xhat = 0.0;
            for (std::size_t j = 0; j < f; ++j) {
                xhat[j] = (get(x, r * f + j) - m) * rstd;
                dxhat[j] = get(dy, r * f + j) * get(gamma, j);
                mean_dxhat += dxhat[j];
                mean_dxhat_xhat += dxhat[j] * xhat[j];
            }
            const auto a = kind == NormKind::layernorm ? static_cast<float>(mean_dxhat / static_cast<double>(f)) : 0.0f;
            const auto b = static_cast<float>(mean_dxhat_xhat / static_cast<double>(f));
            for (std::size_t j = 0; j < f; ++j) put(dx, r * f + j, rstd * (dxhat[j] - a - xhat[j] * b));
        }
        // Parameter gradients: per column, rows in order.
        for (std::size_t j = 0; j < f; ++j) {
            float g = get(dgamma, j);
            float bsum = dbeta ? get(*dbeta, j) : 0.0f;
            for (std::size_t r = 0; r < rows; ++r) {
                const float xh = (get(x, r * f + j) - get(stats, 2 * r)) * get(stats, 2 * r + 1);
                g += get(dy, r * f + j) * xh;
                bsum += get(dy, r * f + j);
            }
            put(dgamma, j, g);
            if (dbeta) put(*dbeta, j, bsum);
        }
    }

    void softmax_xent_forward(DeviceSpan logits, DeviceSpan labels, DeviceSpan loss, std::size_t rows,
                              std::size_t classes) override {
        need(logits, rows * classes, "softmax_xent's logits");
        need(loss, rows, "softmax_xent's loss");
        for (std::size_t r = 0; r < rows; ++r)
            put(loss, r, log_sum_exp(logits, r * classes, classes) - get(logits, r * classes + label(labels, r, classes)));
    }
    void softmax_xent_backward(DeviceSpan logits, DeviceSpan labels, float scale, DeviceSpan dlogits,
                               std::size_t rows, std::size_t classes) override {
        need(dlogits, rows * classes, "softmax_xent's dlogits");
        for (std::size_t r = 0; r < rows; ++r) {
            const std::size_t at = r * classes;
            const float lse = log_sum_exp(logits, at, classes);
            const std::size_t y = label(labels, r, classes);
            for (std::size_t c = 0; c < classes; ++c) {
                float g = scale * std::exp(get(logits, at + c) - lse);
                if (c == y) g -= scale;
                put(dlogits, at + c, g);
            }
        }
    }

    void embedding_forward(DeviceSpan ids, DeviceSpan table, DeviceSpan out, std::size_t n, std::size_t dim) override {
        need(out, n * dim, "embedding's output");
        for (std::size_t t = 0; t < n; ++t) {
            const auto row = static_cast<std::size_t>(id_at(ids, t));
            need(table, (row + 1) * dim, "embedding's table");
            for (std::size_t j = 0; j < dim; ++j) put(out, t * dim + j, get(table, row * dim + j));
        }
    }
    void embedding_backward(DeviceSpan ids, DeviceSpan dout, DeviceSpan dtable, std::size_t n,
                            std::size_t dim) override {
        for (std::size_t t = 0; t < n; ++t) {
            const auto row = static_cast<std::size_t>(id_at(ids, t));
            need(dtable, (row + 1) * dim, "embedding's table gradient");
            for (std::size_t j = 0; j < dim; ++j)
                put(dtable, row * dim + j, get(dtable, row * dim + j) + get(dout, t * dim + j));
        }
    }

    void embedding_backward_grouped(DeviceSpan grouping, std::size_t groups, DeviceSpan dout, DeviceSpan dtable,
                                    std::size_t n, std::size_t dim) override {
        need(grouping, 2 * groups + 1 + n, "the token grouping");
        need(dout, n * dim, "embedding's output gradient");
        for (std::size_t g = 0; g < groups; ++g) {
            const auto row = static_cast<std::size_t>(id_at(grouping, g));
            need(dtable, (row + 1) * dim, "embedding's table gradient");
            const auto first = static_cast<std::size_t>(id_at(grouping, groups + g));
            const auto last = static_cast<std::size_t>(id_at(grouping, groups + g + 1));
            for (std::size_t k = first; k < last; ++k) {
                const auto t = static_cast<std::size_t>(id_at(grouping, 2 * groups + 1 + k));
                for (std::size_t j = 0; j < dim; ++j)
                    put(dtable, row * dim + j, get(dtable, row * dim + j) + get(dout, t * dim + j));
            }
        }
    }

    void gather_rows(DeviceSpan src, DeviceSpan index, DeviceSpan dst, std::size_t n, std::size_t cols) override {
        need(index, n, "gather's index");
        need(dst, n * cols, "gather's destination");
        if (src.elem != dst.elem) throw std::invalid_argument("host ops: gather_rows between element types");
        for (std::size_t i = 0; i < n; ++i) {
            const auto from = static_cast<std::size_t>(id_at(index, i));
            need(src, (from + 1) * cols, "gather's source");
            std::memcpy(static_cast<char*>(dst.ptr) + i * cols * elem_bytes(dst.elem),
                        static_cast<const char*>(src.ptr) + from * cols * elem_bytes(src.elem), cols * elem_bytes(src.elem));
        }
    }
    void gather_sum_rows(DeviceSpan src, DeviceSpan index, std::optional<DeviceSpan> weight, DeviceSpan dst,
                         std::size_t rows, std::size_t k, std::size_t cols, bool accumulate) override {
        need(index, rows * k, "gather_sum's index");
        if (weight) need(*weight, rows * k, "gather_sum's weights");
        need(dst, rows * cols, "gather_sum's destination");
        if (src.elem != dst.elem) throw std::invalid_argument("host ops: gather_sum_rows between element types");
        for (std::size_t r = 0; r < rows; ++r)
            for (std::size_t c = 0; c < cols; ++c) {
                float acc = accumulate ? get(dst, r * cols + c) : 0.0f;
                for (std::size_t j = 0; j < k; ++j) {
                    const auto from = static_cast<std::size_t>(id_at(index, r * k + j));
                    need(src, (from + 1) * cols, "gather_sum's source");
                    const float w = weight ? get(*weight, r * k + j) : 1.0f;
                    acc += w * get(src, from * cols + c);
                }
                put(dst, r * cols + c, acc);
            }
    }
    void row_dots(DeviceSpan a, DeviceSpan b, DeviceSpan out, std::size_t rows, std::size_t cols) override {
        need(a, rows * cols, "row_dots' a");
        need(b, rows * cols, "row_dots' b");
        need(out, rows, "row_dots' output");
        if (a.elem != b.elem) throw std::invalid_argument("host ops: row_dots between element types");
        for (std::size_t r = 0; r < rows; ++r) {
            float dot = 0.0f;
            for (std::size_t c = 0; c < cols; ++c) dot += get(a, r * cols + c) * get(b, r * cols + c);
            put(out, r, dot);
        }
    }
    void scale_rows(DeviceSpan x, DeviceSpan scale, std::size_t rows, std::size_t cols) override {
        need(x, rows * cols, "scale_rows' rows");
        need(scale, rows, "scale_rows' scales");
        for (std::size_t r = 0; r < rows; ++r) {
            const float w = get(scale, r);
            for (std::size_t c = 0; c < cols; ++c) put(x, r * cols + c, w * get(x, r * cols + c));
        }
    }

    void attention_softmax_forward(DeviceSpan scores, std::size_t batch_heads, std::size_t s, float scale,
                                   bool causal) override {
        need(scores, batch_heads * s * s, "attention's scores");
        std::vector<float> row(s);
        for (std::size_t b = 0; b < batch_heads; ++b)
            for (std::size_t i = 0; i < s; ++i) {
                const std::size_t at = (b * s + i) * s;
                const std::size_t visible = causal ? i + 1 : s;
                float max = -INFINITY;
                for (std::size_t j = 0; j < visible; ++j) {
                    row[j] = get(scores, at + j) * scale;
                    max = std::max(max, row[j]);
                }
                float sum = 0.0f;
                for (std::size_t j = 0; j < visible; ++j) {
                    row[j] = std::exp(row[j] - max);
                    sum += row[j];
                }
                for (std::size_t j = 0; j < s; ++j) put(scores, at + j, j < visible ? row[j] / sum : 0.0f);
            }
    }
    void attention_softmax_backward(DeviceSpan probs, DeviceSpan dprobs, std::size_t batch_heads, std::size_t s,
                                    float scale) override {
        need(probs, batch_heads * s * s, "attention's probabilities");
        need(dprobs, batch_heads * s * s, "attention's dprobs");
        for (std::size_t b = 0; b < batch_heads; ++b)
            for (std::size_t i = 0; i < s; ++i) {
                const std::size_t at = (b * s + i) * s;
                float dot = 0.0f;
                for (std::size_t j = 0; j < s; ++j) dot += get(probs, at + j) * get(dprobs, at + j);
                for (std::size_t j = 0; j < s; ++j)
                    put(dprobs, at + j, scale * get(probs, at + j) * (get(dprobs, at + j) - dot));
            }
    }

    void batchnorm_forward(DeviceSpan x, DeviceSpan gamma, DeviceSpan beta, DeviceSpan y, DeviceSpan stats,
                           std::size_t samples, std::size_t channels, std::size_t plane) override {
        need(x, samples * channels * plane, "batchnorm's x");
        need(y, samples * channels * plane, "batchnorm's y");
        need(stats, channels * 2, "batchnorm's statistics");
        const double count = static_cast<double>(samples * plane);
        for (std::size_t c = 0; c < channels; ++c) {
            double mean = 0.0, var = 0.0;
            for_channel(samples, channels, plane, c, [&](std::size_t i) { mean += get(x, i); });
            mean /= count;
            for_channel(samples, channels, plane, c, [&](std::size_t i) { var += (get(x, i) - mean) * (get(x, i) - mean); });
            const auto m = static_cast<float>(mean);
            const auto rstd = static_cast<float>(1.0 / std::sqrt(var / count + 1e-5));
            const float g = get(gamma, c), b = get(beta, c);
            for_channel(samples, channels, plane, c, [&](std::size_t i) { put(y, i, (get(x, i) - m) * rstd * g + b); });
            put(stats, 2 * c, m);
            put(stats, 2 * c + 1, rstd);
        }
    }
    void batchnorm_backward(DeviceSpan x, DeviceSpan gamma, DeviceSpan stats, DeviceSpan dy, DeviceSpan dx,
                            DeviceSpan dgamma, DeviceSpan dbeta, std::size_t samples, std::size_t channels,
                            std::size_t plane) override {
        need(dx, samples * channels * plane, "batchnorm's dx");
        need(dy, samples * channels * plane, "batchnorm's dy");
        const double count = static_cast<double>(samples * plane);
        for (std::size_t c = 0; c < channels; ++c) {
            const float m = get(stats, 2 * c), rstd = get(stats, 2 * c + 1), g = get(gamma, c);
            double sum_dy = 0.0, sum_dy_xhat = 0.0;
            for_channel(samples, channels, plane, c, [&](std::size_t i) {
                sum_dy += get(dy, i);
                sum_dy_xhat += get(dy, i) * (get(x, i) - m) * rstd;
            });
            put(dgamma, c, get(dgamma, c) + static_cast<float>(sum_dy_xhat));
            put(dbeta, c, get(dbeta, c) + static_cast<float>(sum_dy));
            const auto a = static_cast<float>(sum_dy / count);
            const auto b = static_cast<float>(sum_dy_xhat / count);
            for_channel(samples, channels, plane, c, [&](std::size_t i) {
                const float xhat = (get(x, i) - m) * rstd;
                put(dx, i, g * rstd * (get(dy, i) - a - xhat * b));
            });
        }
    }

    void im2col(DeviceSpan x, std::size_t samples, std::size_t total, std::size_t first, std::size_t channels,
                const Window2d& g, DeviceSpan cols) override {
        const std::size_t plane = g.oh * g.ow, field = channels * g.kh * g.kw;
        need(x, samples * total * g.h * g.w, "im2col's x");
        need(cols, samples * field * plane, "im2col's columns");
        if (x.elem != cols.elem) throw std::invalid_argument("host ops: im2col between element types");
        for_each_tap(samples, total, first, channels, g, [&](std::size_t col, std::size_t in) {
            put(cols, col, in == npos ? 0.0f : get(x, in));
        });
    }
    void col2im(DeviceSpan cols, std::size_t samples, std::size_t total, std::size_t first, std::size_t channels,
                const Window2d& g, DeviceSpan dx) override {
        need(dx, samples * total * g.h * g.w, "col2im's dx");
        need(cols, samples * channels * g.kh * g.kw * g.oh * g.ow, "col2im's columns");
        for_each_tap(samples, total, first, channels, g, [&](std::size_t col, std::size_t in) {
            if (in != npos) put(dx, in, get(dx, in) + get(cols, col));
        });
    }
    void pool_forward(bool max, DeviceSpan x, DeviceSpan y, std::size_t planes, const Window2d& g) override {
        need(x, planes * g.h * g.w, "pool's x");
        need(y, planes * g.oh * g.ow, "pool's y");
        for_each_window(planes, g, [&](std::size_t out, const std::vector<std::size_t>& in) {
            if (max) {
                put(y, out, in.empty() ? 0.0f : get(x, first_largest(x, in)));
                return;
            }
            float sum = 0.0f;
            for (std::size_t i : in) sum += get(x, i);
            put(y, out, sum / static_cast<float>(g.kh * g.kw));
        });
    }
    void pool_backward(bool max, DeviceSpan x, DeviceSpan dy, DeviceSpan dx, std::size_t planes,
                       const Window2d& g) override {
        need(x, planes * g.h * g.w, "pool's x");
        need(dx, planes * g.h * g.w, "pool's dx");
        need(dy, planes * g.oh * g.ow, "pool's dy");
        for_each_window(planes, g, [&](std::size_t out, const std::vector<std::size_t>& in) {
            if (in.empty()) return;
            if (max) {
                const std::size_t i = first_largest(x, in);
                put(dx, i, get(dx, i) + get(dy, out));
                return;
            }
            for (std::size_t i : in) put(dx, i, get(dx, i) + get(dy, out) / static_cast<float>(g.kh * g.kw));
        });
    }

    void optimizer_step(const OptimizerOptions& opt, std::uint64_t step, DeviceSpan params, DeviceSpan grads,
                        DeviceSpan m, DeviceSpan v) override {
        if (params.elem != Elem::f32 || grads.elem != Elem::f32)
            throw std::invalid_argument("host ops: the optimizer steps f32 parameters with f32 gradients");
        const std::span<float> p(static_cast<float*>(params.ptr), params.count);
        const std::span<const float> g(static_cast<const float*>(grads.ptr), params.count);
        if (opt.kind == OptimizerKind::sgd) {
            sgd_step(p, g, opt.lr);
            return;
        }
        adam_step(p, g, {static_cast<float*>(m.ptr), params.count}, {static_cast<float*>(v.ptr), params.count}, step,
                  opt);
    }

private:
    MemoryMeter meter_;
    /// f(element index) over channel c of every sample, in sample order.
    template <class F>
    static void for_channel(std::size_t samples, std::size_t channels, std::size_t plane, std::size_t c, F&& f) {
        for (std::size_t s = 0; s < samples; ++s)
            for (std::size_t i = 0; i < plane; ++i) f((s * channels + c) * plane + i);
    }
    static constexpr std::size_t npos = Window2d::npos;
    /// f(column element, input element or npos) over im2col's layout.
    template <class F>
    static void for_each_tap(std::size_t samples, std::size_t total, std::size_t first, std::size_t channels,
                             const Window2d& g, F&& f) {
        std::size_t col = 0;
        for (std::size_t s = 0; s < samples; ++s)
            for (std::size_t c = 0; c < channels; ++c)
                for (std::size_t ki = 0; ki < g.kh; ++ki)
                    for (std::size_t kj = 0; kj < g.kw; ++kj)
                        for (std::size_t oy = 0; oy < g.oh; ++oy) {
                            const std::size_t iy = Window2d::at(oy, ki, g.stride, g.pad, g.h);
                            for (std::size_t ox = 0; ox < g.ow; ++ox, ++col) {
                                const std::size_t ix = Window2d::at(ox, kj, g.stride, g.pad, g.w);
                                f(col, iy == npos || ix == npos ? npos
                                                                : ((s * total + first + c) * g.h + iy) * g.w + ix);
                            }
                        }
    }
    static std::size_t first_largest(const DeviceSpan& x, const std::vector<std::size_t>& in) {
        std::size_t best = in.front();
        for (std::size_t i : in)
            if (get(x, i) > get(x, best)) best = i;
        return best;
    }

    static float log_sum_exp(const DeviceSpan& x, std::size_t at, std::size_t n) {
        float max = -INFINITY;
        for (std::size_t c = 0; c < n; ++c) max = std::max(max, get(x, at + c));
        float sum = 0.0f;
        for (std::size_t c = 0; c < n; ++c) sum += std::exp(get(x, at + c) - max);
        return max + std::log(sum);
    }
    static std::size_t label(const DeviceSpan& labels, std::size_t r, std::size_t classes) {
        const std::int32_t y = id_at(labels, r);
        if (y < 0 || static_cast<std::size_t>(y) >= classes)
            throw std::invalid_argument(fmt::format("host ops: label {} of row {} is not a class below {}", y, r, classes));
        return static_cast<std::size_t>(y);
    }
};

}  // namespace

Elem compute_precision(std::string_view precision, DType model_dtype) noexcept {
    if (precision == "fp32") return Elem::f32;
    if (precision == "bf16") return Elem::bf16;
    return model_dtype == DType::fp32 ? Elem::f32 : Elem::bf16;
}

const char* to_string(Elem e) noexcept {
    switch (e) {
    case Elem::f32: return "f32";
    case Elem::bf16: return "bf16";
    case Elem::i32: return "i32";
    }
    return "?";
}

DeviceSpan DeviceSpan::sub(std::size_t first, std::size_t n) const {
    if (first > count || n > count - first)
        throw std::out_of_range(fmt::format("DeviceSpan::sub: [{}, {}) of {} elements", first, first + n, count));
    return {static_cast<char*>(ptr) + first * elem_bytes(elem), n, elem};
}

void DeviceOps::copy_2d(DeviceSpan from, std::size_t from_ld, DeviceSpan to, std::size_t to_ld, std::size_t rows,
                        std::size_t cols) {
    if (rows == 0 || cols == 0) return;
    if (from.elem != to.elem) throw RuntimeError(fmt::format("{}: a 2-d copy between element types", name()));
    if (cols > from_ld || cols > to_ld)
        throw RuntimeError(fmt::format("{}: a 2-d copy of {} columns with strides {} and {}", name(), cols, from_ld, to_ld));
    for (std::size_t r = 0; r < rows; ++r) copy(from.sub(r * from_ld, cols), to.sub(r * to_ld, cols));
}

void HostStagedGroup::allreduce_sum(DeviceOps& ops, DeviceSpan data) {
    std::vector<float> v(data.count);
    ops.download(data, v);
    group_->allreduce_sum(v);
    ops.upload(v, data);
}

void HostStagedGroup::allgather(DeviceOps& ops, DeviceSpan mine, DeviceSpan all) {
    std::vector<float> m(mine.count), a(all.count);
    ops.download(mine, m);
    group_->allgather(m, a);
    ops.upload(a, all);
}

std::unique_ptr<DeviceOps> make_host_ops() { return std::make_unique<HostOps>(); }

}  // namespace dpart::rt
