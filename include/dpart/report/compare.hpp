#pragma once
// What `dpart compare` makes of one run or replay: the summary of its iterations.csv.
#include <cstdint>

#include "dpart/io/csv.hpp"
#include "dpart/io/trace.hpp"

namespace dpart {

struct RunComparison {
    RunSummary summary;              ///< iterations, mean/p50/p99 ms, samples/s
    std::uint64_t repartitions = 0;  ///< changes of plan_version between consecutive rows
    double excess_ms = 0;            ///< time above the run's median pace: sum of max(0, iteration - p50)
};

/// Summarises an iterations.csv read with iteration_columns(). The global batch is the first
/// row's samples_per_s x iteration_ms / 1000. Throws InputError at "file:line" for a cell that is
/// not a finite number, an iteration time that is not positive, a negative rate, a global batch
/// that does not fit in 64 bits, or a file with no rows.
[[nodiscard]] RunComparison summarise_iterations(const CsvFile& f);

}  // namespace dpart
