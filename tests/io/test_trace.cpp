#include <doctest/doctest.h>

#include "dpart/io/trace.hpp"

using namespace dpart;

TEST_CASE("run summaries: mean, nearest-rank percentiles, throughput, prediction error") {
    std::vector<double> ms;
    for (int i = 1; i <= 100; ++i) ms.push_back(i);  // 1 .. 100 ms
    const RunSummary s = summarise(ms, 64, 40.0);
    CHECK(s.iterations == 100);
    CHECK(s.mean_iteration_ms == doctest::Approx(50.5));
    CHECK(s.p50_iteration_ms == 50);
    CHECK(s.p99_iteration_ms == 99);
    CHECK(s.samples_per_s == doctest::Approx(64 / 0.0505));
    CHECK(s.prediction_error_pct == doctest::Approx(26.25));
    const RunSummary one = summarise({7.0}, 1, 7.0);
    CHECK(one.p99_iteration_ms == 7.0);
    CHECK(one.prediction_error_pct == 0);
    CHECK(summarise({}, 1, 1).iterations == 0);
}

TEST_CASE("summary.toml starts with [meta] and holds the summary fields") {
    RunSummary s = summarise({10, 20}, 8, 10);
    s.policy = "static";
    const std::string text = summary_toml(s, Meta{"dpart replay x", {}});
    CHECK(text.rfind("[meta]\n", 0) == 0);
    for (const char* key : {"iterations = 2", "mean_iteration_ms = 15", "p50_iteration_ms = 10", "p99_iteration_ms = 20",
                            "samples_per_s = ", "predicted_iteration_ms = 10", "prediction_error_pct = 50",
                            "repartitions = 0", "migration_ms = 0", "policy = \"static\""})
        CHECK(text.find(key) != std::string::npos);
}
