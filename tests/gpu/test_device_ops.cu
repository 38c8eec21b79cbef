// dpart_gpu_tests: the CUDA backend's device kernels and cuBLAS products against naive host
// references (double accumulation), on random inputs from a fixed seed.
//
// Exit codes: 0 all passed, 1 a check failed, 77 no CUDA device (CTest's SKIP_RETURN_CODE).
// One line per check on stdout, then a summary.
//
// Tolerances: a check passes when |got - ref| <= rtol * (|ref| + rms(ref)) for every element
// (rms over the whole output, so entries near zero are judged against the output's scale):
// rtol 1e-5 for fp32 (gemm with TF32 off), 2e-2 for bf16 outputs, 5e-3 for TF32 gemm. The
// optimizer steps, casts and fill are compared bitwise. bf16 references are computed from the
// bf16-rounded inputs, so only the kernels' own arithmetic and output rounding are measured.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "runtime/cuda/check.cuh"

namespace dpart::rt {
// tests/gpu/test_nccl.cpp, tests/gpu/test_conv.cpp
void nccl_checks(const std::function<void(bool, const std::string&, const std::string&)>& record);
void conv_checks(const std::function<void(bool, const std::string&, const std::string&)>& record);
}  // namespace dpart::rt

#include "runtime/cuda/device_ops.cuh"
#include "runtime/cuda/gemm.cuh"

namespace {

using namespace dpart::rt::cuda;
using bf16 = __nv_bfloat16;

// --- Reporting ----------------------------------------------------------------------------

struct Report {
    int passed = 0;
    int failed = 0;

    void record(bool ok, const std::string& name, const std::string& detail) {
        std::printf("%s %s%s%s\n", ok ? "PASS" : "FAIL", name.c_str(), detail.empty() ? "" : ": ", detail.c_str());
        std::fflush(stdout);
        (ok ? passed : failed)++;
    }
};

Report report;

/// Runs one group of checks; an exception (a CUDA error, a RuntimeError) fails the group.
void group(const std::string& name, const std::function<void()>& body) {
    try {
        body();
    } catch (const std::exception& e) {
        report.record(false, name, std::string("exception: ") + e.what());
    }
}

// --- Types ----------------------------------------------------------------------------------

template <class T>
struct Type;
template <>
struct Type<float> {
    static constexpr const char* name = "fp32";
    static constexpr double rtol = 1e-5;
};
template <>
struct Type<bf16> {
    static constexpr const char* name = "bf16";
    static constexpr double rtol = 2e-2;
};

double to_d(float x) { return x; }
double to_d(bf16 x) { return static_cast<double>(__bfloat162float(x)); }

template <class T>
T from_f(float x);
template <>
float from_f<float>(float x) {
    return x;
}
template <>
bf16 from_f<bf16>(float x) {
    return __float2bfloat16(x);
}

template <class T>
std::string label(const std::string& what) {
    return std::string(Type<T>::name) + " " + what;
}

// --- Host data ------------------------------------------------------------------------------

std::mt19937 rng(20261126);

std::vector<float> random_floats(std::size_t n, float lo, float hi) {
    std::uniform_real_distribution<float> dist(lo, hi);
    std::vector<float> v(n);
    for (float& x : v) x = dist(rng);
    return v;
}

template <class T>
std::vector<T> random_vec(std::size_t n, float lo = -1.0f, float hi = 1.0f) {
    const std::vector<float> f = random_floats(n, lo, hi);
    std::vector<T> v(n);
    for (std::size_t i = 0; i < n; ++i) v[i] = from_f<T>(f[i]);
    return v;
}

template <class T>
std::vector<double> as_double(const std::vector<T>& v) {
    std::vector<double> d(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) d[i] = to_d(v[i]);
    return d;
}

template <class T>
std::vector<T> from_double(const std::vector<double>& v) {
    std::vector<T> out(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) out[i] = from_f<T>(static_cast<float>(v[i]));
    return out;
}

// --- Device buffers -------------------------------------------------------------------------

template <class T>
class DevBuf {
public:
    explicit DevBuf(std::size_t n) : n_(n) { DPART_CUDA(cudaMalloc(&p_, std::max<std::size_t>(n, 1) * sizeof(T))); }
    explicit DevBuf(const std::vector<T>& h) : DevBuf(h.size()) { upload(h); }
    ~DevBuf() { cudaFree(p_); }
    DevBuf(const DevBuf&) = delete;
    DevBuf& operator=(const DevBuf&) = delete;

    T* get() const { return p_; }
    void upload(const std::vector<T>& h) {
        DPART_CUDA(cudaDeviceSynchronize());
        DPART_CUDA(cudaMemcpy(p_, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
    }
    std::vector<T> download() const {
        DPART_CUDA(cudaDeviceSynchronize());  // the kernels ran on a stream of their own
        std::vector<T> h(n_);
        DPART_CUDA(cudaMemcpy(h.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
        return h;
    }

private:
    T* p_ = nullptr;
    std::size_t n_ = 0;
};

cudaStream_t stream = nullptr;

// --- Comparisons ------------------------------------------------------------------------------

/// |got - ref| <= rtol * (|ref| + rms(ref)) everywhere; prints the worst element.
template <class T>
void expect_close(const std::string& name, const std::vector<T>& got, const std::vector<double>& ref, double rtol) {
    if (got.size() != ref.size()) {
        report.record(false, name, "size " + std::to_string(got.size()) + " != " + std::to_string(ref.size()));
        return;
    }
    double ss = 0.0;
    for (double r : ref) ss += r * r;
    const double rms = ref.empty() ? 0.0 : std::sqrt(ss / static_cast<double>(ref.size()));
    double worst = 0.0;  // largest |got - ref| / allowed
    std::size_t at = 0;
    bool finite = true;
    for (std::size_t i = 0; i < ref.size(); ++i) {
        const double g = to_d(got[i]);
        if (!std::isfinite(g)) finite = false;
        const double allowed = rtol * (std::fabs(ref[i]) + rms) + 1e-30;
        const double ratio = std::fabs(g - ref[i]) / allowed;
        if (!(ratio <= worst)) {  // also catches NaN
            worst = std::isnan(ratio) ? INFINITY : ratio;
            at = i;
        }
    }
    char detail[256];
    if (ref.empty()) {
        std::snprintf(detail, sizeof detail, "empty");
    } else {
        std::snprintf(detail, sizeof detail, "n=%zu worst at %zu: got %.9g ref %.9g (%.3g of tolerance, rtol %.0e)",
                      ref.size(), at, to_d(got[at]), ref[at], worst, rtol);
    }
    report.record(finite && worst <= 1.0, name, detail);
}

template <class T>
void expect_bitwise(const std::string& name, const std::vector<T>& a, const std::vector<T>& b) {
    std::size_t diff = 0;
    std::size_t first = a.size();
    if (a.size() != b.size()) {
        report.record(false, name, "sizes differ");
        return;
    }
    for (std::size_t i = 0; i < a.size(); ++i)
        if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0) {
            if (diff++ == 0) first = i;
        }
    char detail[160];
    if (diff == 0) std::snprintf(detail, sizeof detail, "n=%zu bitwise equal", a.size());
    else
        std::snprintf(detail, sizeof detail, "%zu of %zu differ, first at %zu: %.9g vs %.9g", diff, a.size(), first,
                      to_d(a[first]), to_d(b[first]));
    report.record(diff == 0, name, detail);
}

// --- Checks -------------------------------------------------------------------------------------

void check_casts() {
    group("cast", [] {
        std::vector<float> f = random_floats(100003, -100.0f, 100.0f);
        f[0] = 0.0f;
        f[1] = -0.0f;
        f[2] = 1e-40f;  // subnormal
        f[3] = 3.0e38f;
        DevBuf<float> df(f);
        DevBuf<bf16> db(f.size());
        cast(df.get(), db.get(), f.size(), stream);
        std::vector<bf16> want(f.size());
        for (std::size_t i = 0; i < f.size(); ++i) want[i] = __float2bfloat16_rn(f[i]);
        const std::vector<bf16> got = db.download();
        expect_bitwise("cast fp32->bf16 (round to nearest even)", got, want);
        DevBuf<float> back(f.size());
        cast(db.get(), back.get(), f.size(), stream);
        std::vector<float> want_back(f.size());
        for (std::size_t i = 0; i < f.size(); ++i) want_back[i] = __bfloat162float(want[i]);
        expect_bitwise("cast bf16->fp32 (exact)", back.download(), want_back);
    });
}

template <class T>
void check_bias_and_column_sums() {
    group(label<T>("bias_add"), [] {
        const std::size_t rows = 37, cols = 300;
        const std::vector<T> y = random_vec<T>(rows * cols);
        const std::vector<float> bias = random_floats(cols, -1.0f, 1.0f);
        DevBuf<T> dy(y);
        DevBuf<float> db(bias);
        bias_add(dy.get(), db.get(), rows, cols, stream);
        std::vector<double> ref = as_double(y);
        for (std::size_t r = 0; r < rows; ++r)
            for (std::size_t c = 0; c < cols; ++c) ref[r * cols + c] += bias[c];
        expect_close(label<T>("bias_add"), dy.download(), ref, Type<T>::rtol);
    });
    group(label<T>("column_sums"), [] {
        const std::size_t rows = 1000, cols = 77;
        const std::vector<T> dy = random_vec<T>(rows * cols);
        const std::vector<float> start = random_floats(cols, -1.0f, 1.0f);
        DevBuf<T> d(dy);
        DevBuf<float> out(start);
        column_sums(d.get(), out.get(), rows, cols, stream);
        std::vector<double> ref(start.begin(), start.end());
        for (std::size_t r = 0; r < rows; ++r)
            for (std::size_t c = 0; c < cols; ++c) ref[c] += to_d(dy[r * cols + c]);
        expect_close(label<T>("column_sums (accumulates)"), out.download(), ref, 1e-5);
    });
}

double gelu_ref(double x) { return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0))); }
double gelu_grad_ref(double x) {
    const double cdf = 0.5 * (1.0 + std::erf(x / std::sqrt(2.0)));
    const double pdf = std::exp(-0.5 * x * x) / std::sqrt(2.0 * 3.14159265358979323846);
    return cdf + x * pdf;
}

template <class T>
void check_activations() {
    for (Act act : {Act::relu, Act::gelu, Act::silu}) {
        const std::string an = act == Act::relu ? "relu" : act == Act::gelu ? "gelu" : "silu";
        group(label<T>("activation " + an), [&] {
            const std::size_t n = 100003;
            const std::vector<T> x = random_vec<T>(n, -4.0f, 4.0f);
            const std::vector<T> g = random_vec<T>(n);
            DevBuf<T> dx_in(x), dg(g), dy(n), ddx(n);
            activation_forward(act, dx_in.get(), dy.get(), n, stream);
            activation_backward(act, dx_in.get(), dg.get(), ddx.get(), n, stream);
            std::vector<double> yref(n), dref(n);
            for (std::size_t i = 0; i < n; ++i) {
                const double v = to_d(x[i]);
                const double sig = 1.0 / (1.0 + std::exp(-v));
                yref[i] = act == Act::relu ? std::max(v, 0.0) : act == Act::gelu ? gelu_ref(v) : v * sig;
                dref[i] = to_d(g[i]) * (act == Act::relu   ? (v > 0.0 ? 1.0 : 0.0)
                                        : act == Act::gelu ? gelu_grad_ref(v)
                                                           : sig * (1.0 + v * (1.0 - sig)));
            }
            expect_close(label<T>(an + " forward"), dy.download(), yref, Type<T>::rtol);
            expect_close(label<T>(an + " backward"), ddx.download(), dref, Type<T>::rtol);
        });
    }
}

struct NormRef {
    std::vector<double> y, dx, dgamma, dbeta;
    std::vector<float> stats;
};

/// The CPU kernel's formulas (src/runtime/cpu/norm.cpp) in double; backward uses `stats`.
NormRef norm_ref(bool layer, const std::vector<double>& x, const std::vector<float>& gamma,
                 const std::vector<float>* beta, const std::vector<double>& dy, std::size_t rows, std::size_t f,
                 double eps) {
    NormRef r;
    r.y.resize(rows * f);
    r.dx.resize(rows * f);
    r.dgamma.assign(f, 0.0);
    r.dbeta.assign(f, 0.0);
    r.stats.resize(2 * rows);
    for (std::size_t i = 0; i < rows; ++i) {
        const double* in = x.data() + i * f;
        double mean = 0.0;
        if (layer) {
            for (std::size_t j = 0; j < f; ++j) mean += in[j];
            mean /= static_cast<double>(f);
        }
        double var = 0.0;
        for (std::size_t j = 0; j < f; ++j) var += (in[j] - mean) * (in[j] - mean);
        const double rstd = 1.0 / std::sqrt(var / static_cast<double>(f) + eps);
        for (std::size_t j = 0; j < f; ++j)
            r.y[i * f + j] = (in[j] - mean) * rstd * gamma[j] + (beta != nullptr ? (*beta)[j] : 0.0);
        r.stats[2 * i] = static_cast<float>(mean);
        r.stats[2 * i + 1] = static_cast<float>(rstd);
    }
    for (std::size_t i = 0; i < rows; ++i) {
        const double* in = x.data() + i * f;
        const double* g = dy.data() + i * f;
        const double m = r.stats[2 * i];
        const double rstd = r.stats[2 * i + 1];
        double s1 = 0.0, s2 = 0.0;
        for (std::size_t j = 0; j < f; ++j) {
            const double xhat = (in[j] - m) * rstd;
            const double dxhat = g[j] * gamma[j];
            r.dgamma[j] += g[j] * xhat;
            r.dbeta[j] += g[j];
            s1 += dxhat;
            s2 += dxhat * xhat;
        }
        const double a = layer ? s1 / static_cast<double>(f) : 0.0;
        const double b = s2 / static_cast<double>(f);
        for (std::size_t j = 0; j < f; ++j) {
            const double xhat = (in[j] - m) * rstd;
            r.dx[i * f + j] = rstd * (g[j] * gamma[j] - a - xhat * b);
        }
    }
    return r;
}

template <class T>
void check_norm(Norm kind, bool with_beta, std::size_t rows, std::size_t f) {
    const bool layer = kind == Norm::layernorm;
    const std::string name = std::string(layer ? "layernorm" : "rmsnorm") + (with_beta ? "+beta" : "") + " " +
                             std::to_string(rows) + "x" + std::to_string(f);
    group(label<T>(name), [&] {
        const float eps = 1e-5f;
        // An offset on x so that layernorm's mean subtraction matters.
        const std::vector<T> x = random_vec<T>(rows * f, -1.0f, 3.0f);
        const std::vector<T> dy = random_vec<T>(rows * f);
        const std::vector<float> gamma = random_floats(f, 0.5f, 1.5f);
        const std::vector<float> beta = random_floats(f, -0.5f, 0.5f);
        const std::vector<float> dgamma0 = random_floats(f, -1.0f, 1.0f);
        const std::vector<float> dbeta0 = random_floats(f, -1.0f, 1.0f);
        const NormRef ref =
            norm_ref(layer, as_double(x), gamma, with_beta ? &beta : nullptr, as_double(dy), rows, f, eps);

        DevBuf<T> dx_in(x), ddy(dy), dyout(rows * f), ddx(rows * f);
        DevBuf<float> dgam(gamma), dbet(beta), dstats(2 * rows), ddgamma(dgamma0), ddbeta(dbeta0);
        norm_forward(kind, dx_in.get(), dgam.get(), with_beta ? dbet.get() : nullptr, dyout.get(), dstats.get(), rows,
                     f, eps, stream);
        expect_close(label<T>(name + " forward y"), dyout.download(), ref.y, Type<T>::rtol);
        std::vector<double> stats_ref(ref.stats.begin(), ref.stats.end());
        expect_close(label<T>(name + " forward stats"), dstats.download(), stats_ref, 1e-5);

        // Backward from the reference statistics, so that it is tested on its own.
        dstats.upload(ref.stats);
        norm_backward(kind, dx_in.get(), dgam.get(), dstats.get(), ddy.get(), ddx.get(), ddgamma.get(),
                      layer ? ddbeta.get() : nullptr, rows, f, stream);
        const std::vector<T> dx_got = ddx.download();
        expect_close(label<T>(name + " backward dx"), dx_got, ref.dx, Type<T>::rtol);
        std::vector<double> dgamma_ref(f), dbeta_ref(f);
        for (std::size_t j = 0; j < f; ++j) {
            dgamma_ref[j] = dgamma0[j] + ref.dgamma[j];
            dbeta_ref[j] = layer ? dbeta0[j] + ref.dbeta[j] : dbeta0[j];
        }
        // Parameter gradients are fp32 sums of fp32 products of the (rounded) inputs.
        expect_close(label<T>(name + " backward dgamma (accumulates)"), ddgamma.download(), dgamma_ref, 1e-5);
        expect_close(label<T>(name + " backward dbeta (accumulates)"), ddbeta.download(), dbeta_ref, 1e-5);

        // dx may alias dy: the same bits as the separate buffer.
        DevBuf<T> alias(dy);
        DevBuf<float> scratch_g(dgamma0), scratch_b(dbeta0);
        norm_backward(kind, dx_in.get(), dgam.get(), dstats.get(), alias.get(), alias.get(), scratch_g.get(),
                      layer ? scratch_b.get() : nullptr, rows, f, stream);
        expect_bitwise(label<T>(name + " backward dx aliasing dy"), alias.download(), dx_got);
    });
}

template <class T>
void check_softmax_xent() {
    group(label<T>("softmax_xent"), [] {
        const std::size_t rows = 50, classes = 1000;
        const float scale = 0.37f;
        const std::vector<T> logits = random_vec<T>(rows * classes, -5.0f, 5.0f);
        std::vector<std::int32_t> labels(rows);
        std::uniform_int_distribution<std::int32_t> pick(0, static_cast<std::int32_t>(classes) - 1);
        for (auto& l : labels) l = pick(rng);
        labels[0] = 0;
        labels[1] = static_cast<std::int32_t>(classes) - 1;
        DevBuf<T> dl(logits), dgrad(rows * classes);
        DevBuf<std::int32_t> dlab(labels);
        DevBuf<float> dloss(rows);
        softmax_xent_forward(dl.get(), dlab.get(), dloss.get(), rows, classes, stream);
        softmax_xent_backward(dl.get(), dlab.get(), scale, dgrad.get(), rows, classes, stream);
        std::vector<double> loss_ref(rows), grad_ref(rows * classes);
        for (std::size_t r = 0; r < rows; ++r) {
            double mx = -INFINITY;
            for (std::size_t c = 0; c < classes; ++c) mx = std::max(mx, to_d(logits[r * classes + c]));
            double sum = 0.0;
            for (std::size_t c = 0; c < classes; ++c) sum += std::exp(to_d(logits[r * classes + c]) - mx);
            const double lse = mx + std::log(sum);
            loss_ref[r] = lse - to_d(logits[r * classes + static_cast<std::size_t>(labels[r])]);
            for (std::size_t c = 0; c < classes; ++c)
                grad_ref[r * classes + c] =
                    scale * (std::exp(to_d(logits[r * classes + c]) - lse) - (c == static_cast<std::size_t>(labels[r])));
        }
        expect_close(label<T>("softmax_xent forward loss"), dloss.download(), loss_ref, 1e-5);
        const std::vector<T> grad = dgrad.download();
        expect_close(label<T>("softmax_xent backward"), grad, grad_ref, Type<T>::rtol);
        // dlogits may alias logits.
        DevBuf<T> alias(logits);
        softmax_xent_backward(alias.get(), dlab.get(), scale, alias.get(), rows, classes, stream);
        expect_bitwise(label<T>("softmax_xent backward in place"), alias.download(), grad);
        // A label out of range gives NaN, not a read out of bounds.
        std::vector<std::int32_t> bad = labels;
        bad[3] = -1;
        bad[4] = static_cast<std::int32_t>(classes);
        DevBuf<std::int32_t> dbad(bad);
        softmax_xent_forward(dl.get(), dbad.get(), dloss.get(), rows, classes, stream);
        const std::vector<float> l = dloss.download();
        report.record(std::isnan(l[3]) && std::isnan(l[4]) && std::isfinite(l[5]),
                      label<T>("softmax_xent bad label gives NaN"), "");
    });
}

template <class T>
void check_embedding() {
    group(label<T>("embedding"), [] {
        const std::size_t vocab = 37, dim = 300, n = 500;  // many repeated ids
        const std::vector<float> table = random_floats(vocab * dim, -1.0f, 1.0f);
        std::vector<std::int32_t> ids(n);
        std::uniform_int_distribution<std::int32_t> pick(0, static_cast<std::int32_t>(vocab) - 1);
        for (auto& id : ids) id = pick(rng);
        const std::vector<T> dout = random_vec<T>(n * dim);
        const std::vector<float> dtable0 = random_floats(vocab * dim, -1.0f, 1.0f);
        DevBuf<float> dtab(table), ddtab(dtable0);
        DevBuf<std::int32_t> dids(ids);
        DevBuf<T> dout_d(dout), dfwd(n * dim);
        embedding_forward(dids.get(), dtab.get(), dfwd.get(), n, dim, stream);
        embedding_backward(dids.get(), dout_d.get(), ddtab.get(), n, dim, stream);
        std::vector<double> fwd_ref(n * dim), bwd_ref(dtable0.begin(), dtable0.end());
        for (std::size_t t = 0; t < n; ++t)
            for (std::size_t c = 0; c < dim; ++c) {
                const auto id = static_cast<std::size_t>(ids[t]);
                fwd_ref[t * dim + c] = to_d(from_f<T>(table[id * dim + c]));  // exact: a copy, rounded to T
                bwd_ref[id * dim + c] += to_d(dout[t * dim + c]);
            }
        expect_close(label<T>("embedding forward"), dfwd.download(), fwd_ref, 0.0);
        expect_close(label<T>("embedding backward (accumulates)"), ddtab.download(), bwd_ref, 1e-5);
    });
}

/// A mixture of experts' row moves against double references: gather (exact), the weighted sum
/// of k gathered rows (overwriting, then accumulating; unweighted too), row dot products (more
/// columns than a block's threads) and row scaling.
template <class T>
void check_moe_rows() {
    group(label<T>("moe rows"), [] {
        const std::size_t src_rows = 70, cols = 300, n = 130, k = 2, tokens = n / k;
        const std::vector<T> src = random_vec<T>(src_rows * cols);
        std::vector<std::int32_t> index(n);
        std::uniform_int_distribution<std::int32_t> pick(0, static_cast<std::int32_t>(src_rows) - 1);
        for (auto& i : index) i = pick(rng);
        const std::vector<float> weight = random_floats(n, 0.0f, 1.0f);
        const std::vector<T> base = random_vec<T>(tokens * cols);
        DevBuf<T> dsrc(src), dgathered(n * cols), dsum(tokens * cols), dacc(base);
        DevBuf<std::int32_t> dindex(index);
        DevBuf<float> dweight(weight), ddots(n);
        gather_rows(dsrc.get(), dindex.get(), dgathered.get(), n, cols, stream);
        gather_sum_rows(dsrc.get(), dindex.get(), dweight.get(), dsum.get(), tokens, k, cols, false, stream);
        gather_sum_rows(dsrc.get(), dindex.get(), static_cast<const float*>(nullptr), dacc.get(), tokens, k, cols, true,
                        stream);
        std::vector<double> gathered(n * cols), sum(tokens * cols, 0.0), acc = as_double(base);
        for (std::size_t i = 0; i < n; ++i)
            for (std::size_t c = 0; c < cols; ++c) {
                const double v = to_d(src[static_cast<std::size_t>(index[i]) * cols + c]);
                gathered[i * cols + c] = v;
                sum[(i / k) * cols + c] += weight[i] * v;
                acc[(i / k) * cols + c] += v;
            }
        expect_close(label<T>("gather_rows"), dgathered.download(), gathered, 0.0);
        expect_close(label<T>("gather_sum_rows (weighted)"), dsum.download(), sum, Type<T>::rtol);
        expect_close(label<T>("gather_sum_rows (accumulating)"), dacc.download(), acc, Type<T>::rtol);

        const std::vector<T> other = random_vec<T>(n * cols);
        DevBuf<T> dother(other);
        row_dots(dgathered.get(), dother.get(), ddots.get(), n, cols, stream);
        std::vector<double> dots(n, 0.0);
        for (std::size_t i = 0; i < n; ++i)
            for (std::size_t c = 0; c < cols; ++c) dots[i] += gathered[i * cols + c] * to_d(other[i * cols + c]);
        expect_close(label<T>("row_dots"), ddots.download(), dots, 1e-5);
        scale_rows(dother.get(), dweight.get(), n, cols, stream);
        std::vector<double> scaled(n * cols);
        for (std::size_t i = 0; i < n * cols; ++i) scaled[i] = weight[i / cols] * to_d(other[i]);
        expect_close(label<T>("scale_rows"), dother.download(), scaled, Type<T>::rtol);
    });
}

/// Batch normalisation against a double reference: y and the statistics, then dx, and dgamma and
/// dbeta accumulated onto random values; more than one block's worth of elements per channel.
template <class T>
void check_batchnorm(std::size_t samples, std::size_t channels, std::size_t plane) {
    group(label<T>("batchnorm"), [&] {
        const std::size_t n = samples * channels * plane, count = samples * plane;
        const std::vector<T> x = random_vec<T>(n, -2.0f, 3.0f), dy = random_vec<T>(n);
        const std::vector<float> gamma = random_floats(channels, 0.5f, 1.5f), beta = random_floats(channels, -1.0f, 1.0f);
        const std::vector<float> dgamma0 = random_floats(channels, -1.0f, 1.0f), dbeta0 = random_floats(channels, -1.0f, 1.0f);
        std::vector<double> y_ref(n), stats_ref(2 * channels), dx_ref(n);
        std::vector<double> dgamma_ref(dgamma0.begin(), dgamma0.end()), dbeta_ref(dbeta0.begin(), dbeta0.end());
        for (std::size_t c = 0; c < channels; ++c) {
            const auto at = [&](std::size_t k) { return (k / plane * channels + c) * plane + k % plane; };
            double mean = 0.0, var = 0.0;
            for (std::size_t k = 0; k < count; ++k) mean += to_d(x[at(k)]);
            mean /= static_cast<double>(count);
            for (std::size_t k = 0; k < count; ++k) var += (to_d(x[at(k)]) - mean) * (to_d(x[at(k)]) - mean);
            const double rstd = 1.0 / std::sqrt(var / static_cast<double>(count) + 1e-5);
            stats_ref[2 * c] = mean;
            stats_ref[2 * c + 1] = rstd;
            double sum_dy = 0.0, sum_dy_xhat = 0.0;
            for (std::size_t k = 0; k < count; ++k) {
                const double xhat = (to_d(x[at(k)]) - mean) * rstd;
                y_ref[at(k)] = xhat * gamma[c] + beta[c];
                sum_dy += to_d(dy[at(k)]);
                sum_dy_xhat += to_d(dy[at(k)]) * xhat;
            }
            dgamma_ref[c] += sum_dy_xhat;
            dbeta_ref[c] += sum_dy;
            for (std::size_t k = 0; k < count; ++k) {
                const double xhat = (to_d(x[at(k)]) - mean) * rstd;
                dx_ref[at(k)] = gamma[c] * rstd *
                                (to_d(dy[at(k)]) - sum_dy / static_cast<double>(count) -
                                 xhat * sum_dy_xhat / static_cast<double>(count));
            }
        }
        DevBuf<T> dx_in(x), ddy(dy), dy_out(n), ddx(n);
        DevBuf<float> dgam(gamma), dbet(beta), dstats(2 * channels), ddgam(dgamma0), ddbet(dbeta0);
        batchnorm_forward(dx_in.get(), dgam.get(), dbet.get(), dy_out.get(), dstats.get(), samples, channels, plane, stream);
        batchnorm_backward(dx_in.get(), dgam.get(), dstats.get(), ddy.get(), ddx.get(), ddgam.get(), ddbet.get(), samples,
                           channels, plane, stream);
        expect_close(label<T>("batchnorm forward"), dy_out.download(), y_ref, Type<T>::rtol);
        expect_close(label<T>("batchnorm statistics"), dstats.download(), stats_ref, 1e-5);
        expect_close(label<T>("batchnorm backward dx"), ddx.download(), dx_ref, Type<T>::rtol);
        expect_close(label<T>("batchnorm dgamma (accumulates)"), ddgam.download(), dgamma_ref, 1e-4);
        expect_close(label<T>("batchnorm dbeta (accumulates)"), ddbet.download(), dbeta_ref, 1e-4);
    });
}

/// im2col, col2im and pooling against direct host loops (double), on a window with stride,
/// padding and overlap, over a channel range of a larger tensor.
template <class T>
void check_images() {
    group(label<T>("images"), [] {
        const std::size_t samples = 3, total = 5, first = 1, channels = 3;
        const Window g{11, 9, 3, 2, 2, 1, (11 + 2 - 3) / 2 + 1, (9 + 2 - 2) / 2 + 1};
        const std::size_t image = g.h * g.w, plane = g.oh * g.ow, field = channels * g.kh * g.kw;
        const std::vector<T> x = random_vec<T>(samples * total * image);
        const auto tap = [](std::size_t o, std::size_t k, std::size_t stride, std::size_t pad, std::size_t size) {
            const long long at = static_cast<long long>(o * stride + k) - static_cast<long long>(pad);
            return at < 0 || at >= static_cast<long long>(size) ? -1LL : at;
        };
        // im2col, and col2im of random columns added into a random dx.
        std::vector<double> cols_ref(samples * field * plane, 0.0);
        const std::vector<T> cols_in = random_vec<T>(cols_ref.size());
        const std::vector<T> dx0 = random_vec<T>(x.size());
        std::vector<double> dx_ref = as_double(dx0);
        for (std::size_t s = 0; s < samples; ++s)
            for (std::size_t c = 0; c < channels; ++c)
                for (std::size_t ki = 0; ki < g.kh; ++ki)
                    for (std::size_t kj = 0; kj < g.kw; ++kj)
                        for (std::size_t oy = 0; oy < g.oh; ++oy)
                            for (std::size_t ox = 0; ox < g.ow; ++ox) {
                                const std::size_t col =
                                    ((s * field) + (c * g.kh + ki) * g.kw + kj) * plane + oy * g.ow + ox;
                                const long long iy = tap(oy, ki, g.stride, g.pad, g.h), ix = tap(ox, kj, g.stride, g.pad, g.w);
                                if (iy < 0 || ix < 0) continue;
                                const std::size_t at = ((s * total + first + c) * g.h + iy) * g.w + ix;
                                cols_ref[col] = to_d(x[at]);
                                dx_ref[at] += to_d(cols_in[col]);
                            }
        DevBuf<T> dx_d(x), dcols(cols_ref.size()), dcols_in(cols_in), ddx(dx0);
        im2col(dx_d.get(), samples, total, first, channels, g, dcols.get(), stream);
        col2im(dcols_in.get(), samples, total, first, channels, g, ddx.get(), stream);
        expect_close(label<T>("im2col"), dcols.download(), cols_ref, 0.0);
        expect_close(label<T>("col2im (accumulates)"), ddx.download(), dx_ref, Type<T>::rtol);
        // Pooling over every plane of x.
        const std::size_t planes = samples * total;
        const std::vector<T> dy = random_vec<T>(planes * plane);
        for (const bool max : {true, false}) {
            std::vector<double> y_ref(planes * plane, 0.0), dpool_ref(x.size(), 0.0);
            for (std::size_t p = 0; p < planes; ++p)
                for (std::size_t oy = 0; oy < g.oh; ++oy)
                    for (std::size_t ox = 0; ox < g.ow; ++ox) {
                        const std::size_t out = (p * g.oh + oy) * g.ow + ox;
                        long long best = -1;
                        double sum = 0.0;
                        std::vector<std::size_t> in;
                        for (std::size_t ki = 0; ki < g.kh; ++ki)
                            for (std::size_t kj = 0; kj < g.kw; ++kj) {
                                const long long iy = tap(oy, ki, g.stride, g.pad, g.h), ix = tap(ox, kj, g.stride, g.pad, g.w);
                                if (iy < 0 || ix < 0) continue;
                                const std::size_t at = (p * g.h + iy) * g.w + ix;
                                in.push_back(at);
                                sum += to_d(x[at]);
                                if (best < 0 || to_d(x[at]) > to_d(x[static_cast<std::size_t>(best)])) best = static_cast<long long>(at);
                            }
                        const double area = static_cast<double>(g.kh * g.kw);
                        y_ref[out] = max ? (best < 0 ? 0.0 : to_d(x[static_cast<std::size_t>(best)])) : sum / area;
                        if (max && best >= 0) dpool_ref[static_cast<std::size_t>(best)] += to_d(dy[out]);
                        if (!max)
                            for (std::size_t at : in) dpool_ref[at] += to_d(dy[out]) / area;
                    }
            DevBuf<T> dy_d(dy), dyout(planes * plane), dpool(std::vector<T>(x.size(), from_f<T>(0.0f)));
            pool_forward(max, dx_d.get(), dyout.get(), planes, g, stream);
            pool_backward(max, dx_d.get(), dy_d.get(), dpool.get(), planes, g, stream);
            const std::string kind = max ? "max pool" : "average pool";
            expect_close(label<T>(kind + " forward"), dyout.download(), y_ref, max ? 0.0 : Type<T>::rtol);
            expect_close(label<T>(kind + " backward"), dpool.download(), dpool_ref, Type<T>::rtol);
        }
    });
}

/// softmax(scale * s) over j <= i per row, 0 above the diagonal; in double.
std::vector<double> causal_softmax_ref(const std::vector<double>& s, std::size_t bh, std::size_t n, double scale,
                                       bool causal) {
    std::vector<double> p(s.size(), 0.0);
    for (std::size_t b = 0; b < bh; ++b)
        for (std::size_t i = 0; i < n; ++i) {
            const double* row = s.data() + (b * n + i) * n;
            double* out = p.data() + (b * n + i) * n;
            const std::size_t visible = causal ? i + 1 : n;
            double mx = -INFINITY;
            for (std::size_t j = 0; j < visible; ++j) mx = std::max(mx, scale * row[j]);
            double sum = 0.0;
            for (std::size_t j = 0; j < visible; ++j) sum += std::exp(scale * row[j] - mx);
            for (std::size_t j = 0; j < visible; ++j) out[j] = std::exp(scale * row[j] - mx) / sum;
        }
    return p;
}

template <class T>
void check_causal_softmax(std::size_t bh, std::size_t n, bool causal = true) {
    const std::string name = std::string(causal ? "causal_softmax " : "softmax (not causal) ") + std::to_string(bh) + "x" + std::to_string(n) + "x" + std::to_string(n);
    group(label<T>(name), [&] {
        const float scale = 0.125f;
        // Masked entries hold huge values: they must not leak into the softmax.
        std::vector<T> s = random_vec<T>(bh * n * n, -30.0f, 30.0f);
        if (causal)
            for (std::size_t r = 0; r < bh * n; ++r)
                for (std::size_t j = r % n + 1; j < n; ++j) s[r * n + j] = from_f<T>(1e30f);
        DevBuf<T> ds(s);
        causal_softmax_forward(ds.get(), bh, n, scale, causal, stream);
        const std::vector<double> pref = causal_softmax_ref(as_double(s), bh, n, scale, causal);
        expect_close(label<T>(name + " forward"), ds.download(), pref, Type<T>::rtol);

        // Backward on the reference probabilities (rounded to T) and random dprobs, with NaN
        // above the diagonal: the output there must be 0, not NaN.
        const std::vector<T> probs = from_double<T>(pref);
        const std::vector<double> p = as_double(probs);
        std::vector<T> dp = random_vec<T>(bh * n * n);
        if (causal)
            for (std::size_t r = 0; r < bh * n; ++r)
                for (std::size_t j = r % n + 1; j < n; ++j) dp[r * n + j] = from_f<T>(NAN);
        std::vector<double> dref(bh * n * n, 0.0);
        for (std::size_t r = 0; r < bh * n; ++r) {
            const std::size_t visible = causal ? r % n + 1 : n;
            double dot = 0.0;
            for (std::size_t j = 0; j < visible; ++j) dot += p[r * n + j] * to_d(dp[r * n + j]);
            for (std::size_t j = 0; j < visible; ++j)
                dref[r * n + j] = scale * p[r * n + j] * (to_d(dp[r * n + j]) - dot);
        }
        DevBuf<T> dprobs(probs), dd(dp);
        causal_softmax_backward(dprobs.get(), dd.get(), bh, n, scale, causal, stream);
        expect_close(label<T>(name + " backward"), dd.download(), dref, Type<T>::rtol);
    });
}

/// src/runtime/optimizer.cpp's arithmetic, copied (fp32, no fused multiply-add on x86-64), plus
/// PyTorch Adam's coupled weight decay.
void adam_host(std::vector<float>& p, const std::vector<float>& g, std::vector<float>& m, std::vector<float>& v,
               float lr, float beta1, float beta2, float eps, float wd, std::uint64_t step) {
    const double correction1 = 1.0 - std::pow(static_cast<double>(beta1), static_cast<double>(step));
    const double correction2 = 1.0 - std::pow(static_cast<double>(beta2), static_cast<double>(step));
    const auto step_size = static_cast<float>(static_cast<double>(lr) / correction1);
    const auto correction2_sqrt = static_cast<float>(std::sqrt(correction2));
    const float one_minus_b1 = 1.0f - beta1;
    const float one_minus_b2 = 1.0f - beta2;
    for (std::size_t i = 0; i < p.size(); ++i) {
        float gi = g[i];
        if (wd != 0.0f) gi = gi + wd * p[i];
        m[i] = m[i] * beta1 + gi * one_minus_b1;
        v[i] = v[i] * beta2 + gi * gi * one_minus_b2;
        const float denom = std::sqrt(v[i]) / correction2_sqrt + eps;
        p[i] += -step_size * (m[i] / denom);
    }
}

void check_optimizers() {
    for (float wd : {0.0f, 0.01f}) {
        const std::string name = wd == 0.0f ? "adam_step" : "adam_step weight_decay 0.01";
        group(name, [&] {
            const std::size_t n = 10007;
            std::vector<float> p = random_floats(n, -1.0f, 1.0f);
            std::vector<float> m(n, 0.0f), v(n, 0.0f);
            DevBuf<float> dp(p), dg(n), dm(m), dv(v);
            for (std::uint64_t step = 1; step <= 3; ++step) {
                const std::vector<float> g = random_floats(n, -0.1f, 0.1f);
                dg.upload(g);
                adam_step(dp.get(), dg.get(), dm.get(), dv.get(), n, 1e-3f, 0.9f, 0.999f, 1e-8f, wd, step, stream);
                adam_host(p, g, m, v, 1e-3f, 0.9f, 0.999f, 1e-8f, wd, step);
            }
            expect_bitwise(name + " params after 3 steps", dp.download(), p);
            expect_bitwise(name + " m", dm.download(), m);
            expect_bitwise(name + " v", dv.download(), v);
        });
    }
    group("adam_step step 0", [] {
        bool threw = false;
        try {
            adam_step(nullptr, nullptr, nullptr, nullptr, 1, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.0f, 0, stream);
        } catch (const dpart::RuntimeError&) {
            threw = true;
        }
        report.record(threw, "adam_step step 0 throws RuntimeError", "");
    });
    group("sgd_step", [] {
        const std::size_t n = 10007;
        std::vector<float> p = random_floats(n, -1.0f, 1.0f);
        const std::vector<float> g = random_floats(n, -1.0f, 1.0f);
        DevBuf<float> dp(p), dg(g);
        sgd_step(dp.get(), dg.get(), n, 0.05f, stream);
        for (std::size_t i = 0; i < n; ++i) p[i] += -0.05f * g[i];
        expect_bitwise("sgd_step", dp.download(), p);
    });
}

void check_fill_and_grid_stride() {
    group("fill (grid-stride beyond 65535 blocks)", [] {
        const std::size_t n = std::size_t{65535} * 256 * 2 + 123;  // every thread loops twice or more
        DevBuf<float> d(n);
        fill(d.get(), 0.0f, n, stream);
        fill(d.get(), 2.5f, n, stream);
        const std::vector<float> got = d.download();
        const bool ok = std::all_of(got.begin(), got.end(), [](float x) { return x == 2.5f; });
        report.record(ok, "fill 33.5M elements", "");
    });
    group("column_sums (more than 65535 * 32 columns)", [] {
        const std::size_t rows = 3, cols = std::size_t{65535} * 32 + 1000;
        const std::vector<float> x = random_floats(rows * cols, -1.0f, 1.0f);
        DevBuf<float> dx(x), out(cols);
        fill(out.get(), 0.0f, cols, stream);
        column_sums(dx.get(), out.get(), rows, cols, stream);
        std::vector<double> ref(cols, 0.0);
        for (std::size_t r = 0; r < rows; ++r)
            for (std::size_t c = 0; c < cols; ++c) ref[c] += x[r * cols + c];
        expect_close("fp32 column_sums 3x2.1M (grid-stride over columns)", out.download(), ref, 1e-5);
    });
}

void check_determinism() {
    group("determinism", [] {
        const std::size_t rows = 5000, cols = 700;
        const std::vector<float> x = random_floats(rows * cols, -1.0f, 3.0f);
        const std::vector<float> dy = random_floats(rows * cols, -1.0f, 1.0f);
        const std::vector<float> gamma = random_floats(cols, 0.5f, 1.5f);
        DevBuf<float> dx(x), ddy(dy), dgam(gamma), stats(2 * rows), y(rows * cols), dxo(rows * cols);
        DevBuf<float> sums(cols), dgamma(cols), dbeta(cols), loss(rows);
        std::vector<std::int32_t> labels(rows);
        for (std::size_t r = 0; r < rows; ++r) labels[r] = static_cast<std::int32_t>((r * 7919) % cols);
        DevBuf<std::int32_t> dlab(labels);
        const auto run = [&] {
            fill(sums.get(), 0.0f, cols, stream);
            fill(dgamma.get(), 0.0f, cols, stream);
            fill(dbeta.get(), 0.0f, cols, stream);
            column_sums(ddy.get(), sums.get(), rows, cols, stream);
            norm_forward(Norm::layernorm, dx.get(), dgam.get(), nullptr, y.get(), stats.get(), rows, cols, 1e-5f,
                         stream);
            norm_backward(Norm::layernorm, dx.get(), dgam.get(), stats.get(), ddy.get(), dxo.get(), dgamma.get(),
                          dbeta.get(), rows, cols, stream);
            softmax_xent_forward(dx.get(), dlab.get(), loss.get(), rows, cols, stream);
            return std::vector<std::vector<float>>{sums.download(), stats.download(), dxo.download(),
                                                   dgamma.download(), dbeta.download(), loss.download()};
        };
        const auto a = run();
        const auto b = run();
        const char* names[] = {"column_sums", "norm_forward stats", "norm_backward dx", "norm_backward dgamma",
                               "norm_backward dbeta", "softmax_xent loss"};
        for (std::size_t i = 0; i < a.size(); ++i)
            expect_bitwise(std::string("determinism: ") + names[i] + " twice", a[i], b[i]);

        // Embedding gradients with many repeated ids.
        const std::size_t n = 4000, dim = 512, vocab = 11;
        std::vector<std::int32_t> ids(n);
        for (std::size_t t = 0; t < n; ++t) ids[t] = static_cast<std::int32_t>((t * 31) % vocab);
        DevBuf<std::int32_t> did(ids);
        DevBuf<float> dout(random_floats(n * dim, -1.0f, 1.0f)), table(vocab * dim);
        const auto emb = [&] {
            fill(table.get(), 0.0f, vocab * dim, stream);
            embedding_backward(did.get(), dout.get(), table.get(), n, dim, stream);
            return table.download();
        };
        const std::vector<float> e1 = emb();
        expect_bitwise("determinism: embedding_backward twice", e1, emb());

        // The grouped form (tokens grouped by id on the host, as the backend calls it): the same
        // sums in the same order, so bitwise the plain kernel's result.
        std::vector<std::int32_t> unique, offsets{0}, positions;
        for (std::size_t id = 0; id < vocab; ++id) {
            bool any = false;
            for (std::size_t t = 0; t < n; ++t)
                if (ids[t] == static_cast<std::int32_t>(id)) positions.push_back(static_cast<std::int32_t>(t)), any = true;
            if (any) unique.push_back(static_cast<std::int32_t>(id)), offsets.push_back(static_cast<std::int32_t>(positions.size()));
        }
        DevBuf<std::int32_t> gid(unique), goff(offsets), gpos(positions);
        fill(table.get(), 0.0f, vocab * dim, stream);
        embedding_backward_grouped(gid.get(), goff.get(), gpos.get(), unique.size(), dout.get(), table.get(), dim, stream);
        expect_bitwise("embedding_backward_grouped equals embedding_backward", table.download(), e1);
    });
}

// --- gemm -----------------------------------------------------------------------------------------

const char* op_name(Op o) { return o == Op::none ? "N" : "T"; }

/// C = alpha op(A) op(B) + beta C on the [m, n] block; padding left as it was.
std::vector<double> gemm_ref(Op ta, Op tb, std::size_t m, std::size_t n, std::size_t k, double alpha,
                             const std::vector<double>& a, std::size_t lda, const std::vector<double>& b,
                             std::size_t ldb, double beta, const std::vector<double>& c, std::size_t ldc) {
    std::vector<double> out = c;
    for (std::size_t i = 0; i < m; ++i)
        for (std::size_t j = 0; j < n; ++j) {
            double s = 0.0;
            for (std::size_t p = 0; p < k; ++p) {
                const double av = ta == Op::none ? a[i * lda + p] : a[p * lda + i];
                const double bv = tb == Op::none ? b[p * ldb + j] : b[j * ldb + p];
                s += av * bv;
            }
            out[i * ldc + j] = alpha * s + beta * c[i * ldc + j];
        }
    return out;
}

template <class T>
void check_gemm(Blas& blas, bool tf32) {
    const std::size_t m = 37, n = 53, k = 71;
    const float alpha = 0.7f, beta = 0.3f;
    const double rtol = tf32 ? 5e-3 : Type<T>::rtol;
    const std::string prefix = std::string(Type<T>::name) + (tf32 ? " tf32" : "") + " gemm ";
    for (Op ta : {Op::none, Op::trans})
        for (Op tb : {Op::none, Op::trans}) {
            const std::string name = prefix + op_name(ta) + op_name(tb) + " 37x53x71 padded";
            group(name, [&] {
                const std::size_t a_rows = ta == Op::none ? m : k, a_row = ta == Op::none ? k : m;
                const std::size_t b_rows = tb == Op::none ? k : n, b_row = tb == Op::none ? n : k;
                const std::size_t lda = a_row + 5, ldb = b_row + 3, ldc = n + 7;
                const std::vector<T> a = random_vec<T>(a_rows * lda);
                const std::vector<T> b = random_vec<T>(b_rows * ldb);
                const std::vector<T> c = random_vec<T>(m * ldc);
                DevBuf<T> da(a), db(b), dc(c);
                blas.set_tf32(tf32);
                blas.gemm(ta, tb, m, n, k, alpha, da.get(), lda, db.get(), ldb, beta, dc.get(), ldc);
                blas.set_tf32(false);
                expect_close(name, dc.download(),
                             gemm_ref(ta, tb, m, n, k, alpha, as_double(a), lda, as_double(b), ldb, beta, as_double(c),
                                      ldc),
                             rtol);
            });
        }
}

template <class T>
void check_gemm_batched(Blas& blas) {
    const std::size_t m = 19, n = 24, k = 33, batch = 5;
    const float alpha = 1.3f, beta = -0.5f;
    for (const auto& ops : {std::pair{Op::none, Op::trans}, std::pair{Op::trans, Op::none}}) {
        const Op ta = ops.first, tb = ops.second;
        const std::string name =
            std::string(Type<T>::name) + " gemm_strided_batched " + op_name(ta) + op_name(tb) + " 5 x 19x24x33 padded";
        group(name, [&] {
            const std::size_t a_rows = ta == Op::none ? m : k, a_row = ta == Op::none ? k : m;
            const std::size_t b_rows = tb == Op::none ? k : n, b_row = tb == Op::none ? n : k;
            const std::size_t lda = a_row + 2, ldb = b_row + 1, ldc = n + 4;
            const std::size_t sa = a_rows * lda + 11, sb = b_rows * ldb + 5, sc = m * ldc + 9;
            const std::vector<T> a = random_vec<T>(batch * sa);
            const std::vector<T> b = random_vec<T>(batch * sb);
            const std::vector<T> c = random_vec<T>(batch * sc);
            DevBuf<T> da(a), db(b), dc(c);
            blas.gemm_strided_batched(ta, tb, m, n, k, alpha, da.get(), lda, static_cast<long long>(sa), db.get(), ldb,
                                      static_cast<long long>(sb), beta, dc.get(), ldc, static_cast<long long>(sc),
                                      batch);
            const std::vector<double> ad = as_double(a), bd = as_double(b), cd = as_double(c);
            std::vector<double> ref = cd;
            for (std::size_t i = 0; i < batch; ++i) {
                const std::vector<double> ai(ad.begin() + static_cast<std::ptrdiff_t>(i * sa),
                                             ad.begin() + static_cast<std::ptrdiff_t>((i + 1) * sa));
                const std::vector<double> bi(bd.begin() + static_cast<std::ptrdiff_t>(i * sb),
                                             bd.begin() + static_cast<std::ptrdiff_t>((i + 1) * sb));
                const std::vector<double> ci(cd.begin() + static_cast<std::ptrdiff_t>(i * sc),
                                             cd.begin() + static_cast<std::ptrdiff_t>((i + 1) * sc));
                const std::vector<double> r = gemm_ref(ta, tb, m, n, k, alpha, ai, lda, bi, ldb, beta, ci, ldc);
                std::copy(r.begin(), r.end(), ref.begin() + static_cast<std::ptrdiff_t>(i * sc));
            }
            expect_close(name, dc.download(), ref, Type<T>::rtol);
        });
    }
}

void check_gemm_guards(Blas& blas) {
    group("gemm guards", [&] {
        const auto throws = [](const std::function<void()>& f) {
            try {
                f();
            } catch (const dpart::RuntimeError&) {
                return true;
            }
            return false;
        };
        const std::size_t big = std::size_t{1} << 31;  // INT_MAX + 1: rejected before cuBLAS is called
        report.record(throws([&] {
                          blas.gemm<float>(Op::none, Op::none, big, 1, 1, 1.0f, nullptr, 1, nullptr, 1, 0.0f, nullptr, 1);
                      }),
                      "gemm m > INT_MAX throws RuntimeError", "");
        report.record(throws([&] {
                          blas.gemm<float>(Op::none, Op::none, 4, 4, 8, 1.0f, nullptr, 7, nullptr, 4, 0.0f, nullptr, 4);
                      }),
                      "gemm lda shorter than its row throws RuntimeError", "");
        report.record(throws([&] {
                          blas.gemm_strided_batched<bf16>(Op::none, Op::none, 1, 1, 1, 1.0f, nullptr, 1, 0, nullptr, 1,
                                                          0, 0.0f, nullptr, 1, 0, big);
                      }),
                      "gemm_strided_batched batch > INT_MAX throws RuntimeError", "");
        bool message_ok = false;
        try {
            check_cuda(cudaErrorIllegalAddress, "cudaMemcpyAsync");
        } catch (const dpart::RuntimeError& e) {
            message_ok = std::string(e.what()) ==
                         "cudaMemcpyAsync: an illegal memory access was encountered (cudaErrorIllegalAddress)";
            std::printf("     check_cuda message: %s\n", e.what());
        }
        report.record(message_ok, "check_cuda message", "");
    });
    group("gemm determinism", [&] {
        const std::size_t m = 512, n = 384, k = 1024;
        const std::vector<float> a = random_floats(m * k, -1.0f, 1.0f), b = random_floats(k * n, -1.0f, 1.0f);
        DevBuf<float> da(a), db(b), dc(m * n);
        const auto run = [&] {
            blas.gemm(Op::none, Op::none, m, n, k, 1.0f, da.get(), k, db.get(), n, 0.0f, dc.get(), n);
            return dc.download();
        };
        const std::vector<float> first = run();
        expect_bitwise("determinism: fp32 gemm 512x384x1024 twice", first, run());
    });
}

}  // namespace

int main() {
    int count = 0;  // left unchanged when the call fails (no driver)
    const cudaError_t status = cudaGetDeviceCount(&count);
    if (status != cudaSuccess || count == 0) {
        std::printf("SKIP: no CUDA device (%s)\n", cudaGetErrorString(status));
        return 77;
    }
    try {
        DPART_CUDA(cudaSetDevice(0));
        cudaDeviceProp prop{};
        DPART_CUDA(cudaGetDeviceProperties(&prop, 0));
        std::printf("device 0: %s, compute capability %d.%d, %d SMs\n", prop.name, prop.major, prop.minor,
                    prop.multiProcessorCount);
        DPART_CUDA(cudaStreamCreate(&stream));
        {
            Blas blas(stream);
            check_casts();
            check_bias_and_column_sums<float>();
            check_bias_and_column_sums<bf16>();
            check_activations<float>();
            check_activations<bf16>();
            for (auto [rows, f] : {std::pair<std::size_t, std::size_t>{67, 1000}, {130, 100}}) {
                check_norm<float>(Norm::layernorm, true, rows, f);
                check_norm<float>(Norm::layernorm, false, rows, f);
                check_norm<float>(Norm::rmsnorm, false, rows, f);
                check_norm<bf16>(Norm::layernorm, true, rows, f);
                check_norm<bf16>(Norm::rmsnorm, false, rows, f);
            }
            check_softmax_xent<float>();
            check_softmax_xent<bf16>();
            check_embedding<float>();
            check_embedding<bf16>();
            check_moe_rows<float>();
            check_moe_rows<bf16>();
            check_images<float>();
            check_images<bf16>();
            check_batchnorm<float>(5, 7, 130);
            check_batchnorm<bf16>(5, 7, 130);
            check_causal_softmax<float>(6, 70);
            check_causal_softmax<float>(3, 70, false);
            check_causal_softmax<float>(2, 300);
            check_causal_softmax<float>(1030, 64);  // 65920 rows: more than 65535 blocks
            check_causal_softmax<bf16>(6, 70);
            check_causal_softmax<bf16>(3, 70, false);
            check_causal_softmax<bf16>(2, 300);
            check_optimizers();
            check_fill_and_grid_stride();
            check_determinism();
            check_gemm<float>(blas, false);
            check_gemm<float>(blas, true);
            check_gemm<bf16>(blas, false);
            check_gemm_batched<float>(blas);
            check_gemm_batched<bf16>(blas);
            check_gemm_guards(blas);
        }
        group("cudnn", [] {
            dpart::rt::conv_checks([](bool ok, const std::string& name, const std::string& detail) {
                report.record(ok, name, detail);
            });
        });
        group("nccl", [] {
            dpart::rt::nccl_checks([](bool ok, const std::string& name, const std::string& detail) {
                report.record(ok, name, detail);
            });
        });
        DPART_CUDA(cudaStreamDestroy(stream));
    } catch (const std::exception& e) {
        report.record(false, "setup", e.what());
    }
    std::printf("gpu tests: %d passed, %d failed\n", report.passed, report.failed);
    return report.failed == 0 ? 0 : 1;
}
