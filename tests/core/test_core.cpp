#include <doctest/doctest.h>

#include <limits>

#include "dpart/core/checked.hpp"
#include "dpart/core/error.hpp"
#include "dpart/core/format.hpp"
#include "dpart/core/strings.hpp"
#include "dpart/report/text_table.hpp"

using namespace dpart;

TEST_CASE("checked arithmetic is exact and refuses to wrap") {
    constexpr auto max = std::numeric_limits<std::uint64_t>::max();
    CHECK(checked_mul(1ull << 32, (1ull << 32) - 1) == 18446744069414584320ull);
    CHECK_THROWS_AS((void)checked_mul(1ull << 32, 1ull << 32), OverflowError);
    CHECK(checked_add(max - 1, 1) == max);
    CHECK_THROWS_AS((void)checked_add(max, 1), OverflowError);
    CHECK(checked_product({2, 3, 7}) == 42);
    CHECK_THROWS_AS((void)checked_product({1ull << 40, 1ull << 30}), OverflowError);
    CHECK(checked_sum({1, 2, 3}) == 6);
}

TEST_CASE("numbers print for people") {
    CHECK(with_commas(0) == "0");
    CHECK(with_commas(999) == "999");
    CHECK(with_commas(1000) == "1,000");
    CHECK(with_commas(124439808) == "124,439,808");
    CHECK(with_commas(18446744073709551615ull) == "18,446,744,073,709,551,615");
    CHECK(si(8.03e9) == "8.03 G");
    CHECK(si(999) == "999");
    CHECK(si(1.5e15) == "1.5 P");
    CHECK(bytes_iec(512) == "512 B");
    CHECK(bytes_iec(65536) == "64.0 KiB");
    CHECK(bytes_iec(80.0 * 1073741824.0) == "80.0 GiB");
}

TEST_CASE("did-you-mean hints catch typos and only typos") {
    CHECK(edit_distance("kitten", "sitting") == 3);
    CHECK(edit_distance("", "abc") == 3);
    CHECK(edit_distance("bais", "bias") == 1);  // a transposition
    const std::vector<std::string> ops{"linear", "layernorm", "relu"};
    CHECK(closest_match("lnear", ops) == "linear");
    CHECK(closest_match("relu", ops) == "relu");
    CHECK(closest_match("convolution", ops).empty());
    CHECK(did_you_mean("in_feature", {"in_features", "out_features"}) == " (did you mean \"in_features\"?)");
    CHECK(did_you_mean("zzz", {"in_features"}).empty());
    CHECK(join({"a", "b", "c"}, " -> ") == "a -> b -> c");
}

TEST_CASE("errors carry their exit code and location") {
    const InputError e(SourceLocation{"m.toml", 12, 5}, "layer \"fc2\": bad");
    CHECK(std::string(e.what()) == "m.toml:12:5: layer \"fc2\": bad");
    CHECK(e.detail() == "layer \"fc2\": bad");
    CHECK(e.code() == ExitCode::bad_input);
    CHECK(SourceLocation{"m.toml", 3, 0}.str() == "m.toml:3");
    CHECK(SourceLocation{"m.toml", 0, 0}.str() == "m.toml");
    CHECK(InfeasibleError("x").code() == ExitCode::infeasible);
    CHECK(RuntimeError("x").code() == ExitCode::runtime_failure);
    CHECK(static_cast<int>(ExitCode::bad_input) == 2);
}

TEST_CASE("text tables size columns to their content") {
    TextTable t({{"name", Align::left}, {"n", Align::right}});
    t.add_row({"a", "1"});
    t.add_row({"long", "100"});
    t.add_rule();
    t.add_row({"total", "101"});
    CHECK(t.str() == "name     n\n----------\na        1\nlong   100\n----------\ntotal  101\n");
    CHECK_THROWS_AS(t.add_row({"only one"}), std::invalid_argument);
}
