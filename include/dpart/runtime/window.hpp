#pragma once
// A sliding window over [h, w] planes (a convolution's or a pooling's), and the walk over its
// windows: one definition for the CPU kernels and the host DeviceOps, so that both see the same
// inputs in the same order (the CUDA kernels restate it in device code, runtime/cuda).
#include <cstddef>
#include <limits>
#include <vector>

namespace dpart::rt {

/// Kernel kh x kw over [h, w] planes, the stride and zero padding on every side, giving [oh, ow].
struct Window2d {
    std::size_t h = 0, w = 0, kh = 0, kw = 0, stride = 1, pad = 0, oh = 0, ow = 0;

    static constexpr std::size_t npos = std::numeric_limits<std::size_t>::max();
    /// Input coordinate of output row/column o at kernel offset k, or npos in the padding.
    [[nodiscard]] static std::size_t at(std::size_t o, std::size_t k, std::size_t stride, std::size_t pad,
                                        std::size_t size) noexcept {
        const std::size_t padded = o * stride + k;
        return padded < pad || padded - pad >= size ? npos : padded - pad;
    }
};

/// f(output element, the input elements of its window inside the plane, row-major) for every
/// output element of `planes` planes, in order.
template <class F>
void for_each_window(std::size_t planes, const Window2d& g, F&& f) {
    std::vector<std::size_t> in;
    for (std::size_t p = 0; p < planes; ++p)
        for (std::size_t oy = 0; oy < g.oh; ++oy)
            for (std::size_t ox = 0; ox < g.ow; ++ox) {
                in.clear();
                for (std::size_t ki = 0; ki < g.kh; ++ki) {
                    const std::size_t iy = Window2d::at(oy, ki, g.stride, g.pad, g.h);
                    if (iy == Window2d::npos) continue;
                    for (std::size_t kj = 0; kj < g.kw; ++kj) {
                        const std::size_t ix = Window2d::at(ox, kj, g.stride, g.pad, g.w);
                        if (ix != Window2d::npos) in.push_back((p * g.h + iy) * g.w + ix);
                    }
                }
                f((p * g.oh + oy) * g.ow + ox, in);
            }
}

}  // namespace dpart::rt
