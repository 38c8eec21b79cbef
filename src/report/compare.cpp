#include "dpart/report/compare.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "dpart/core/error.hpp"

namespace dpart {

RunComparison summarise_iterations(const CsvFile& f) {
    if (f.rows.empty()) throw InputError(SourceLocation{f.path}, "no iterations: the file has only its header");
    auto at = [&](std::size_t r) { return SourceLocation{f.path, f.lines.at(r), 0}; };
    RunComparison out;
    std::vector<double> ms;
    ms.reserve(f.rows.size());
    double version = 0;
    for (std::size_t r = 0; r < f.rows.size(); ++r) {
        const double v = csv_number(f, r, 1);
        if (r > 0 && v != version) ++out.repartitions;
        version = v;
        const double t = csv_number(f, r, 2);
        if (t <= 0)
            throw InputError(at(r), fmt::format("column \"iteration_ms\": {} is not a positive time", f.rows[r][2]));
        if (csv_number(f, r, 3) < 0)
            throw InputError(at(r), fmt::format("column \"samples_per_s\": {} is negative", f.rows[r][3]));
        ms.push_back(t);
    }
    // samples/s of the first row and its iteration time give the global batch.
    const double batch = csv_number(f, 0, 3) * ms.front() / 1e3;
    if (!(batch < 18446744073709551616.0))
        throw InputError(at(0), fmt::format("samples_per_s {} x iteration_ms {} gives a global batch beyond 64 bits",
                                            f.rows[0][3], f.rows[0][2]));
    out.summary = summarise(ms, static_cast<std::uint64_t>(std::round(batch)), 0);
    if (!std::isfinite(out.summary.mean_iteration_ms))
        throw InputError(SourceLocation{f.path}, "the iteration times are too large to average (their sum overflows)");
    for (double t : ms) out.excess_ms += std::max(0.0, t - out.summary.p50_iteration_ms);
    return out;
}

}  // namespace dpart
