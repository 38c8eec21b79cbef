#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <unistd.h>

#include "dpart/core/error.hpp"
#include "dpart/io/atomic_file.hpp"
#include "dpart/io/csv.hpp"

using namespace dpart;
namespace fs = std::filesystem;

namespace {

struct TempDir {
    fs::path path;
    TempDir() : path(fs::temp_directory_path() / ("dpart-test-" + std::to_string(::getpid()))) {
        fs::remove_all(path);
        fs::create_directories(path);
    }
    ~TempDir() { fs::remove_all(path); }
};

std::string read(const fs::path& p) {
    std::ifstream in(p);
    std::ostringstream s;
    s << in.rdbuf();
    return s.str();
}

}  // namespace

TEST_CASE("CSV columns are declared and cells quoted") {
    CsvTable t({"index", "name"});
    t.add_row({"0", "fc1"});
    t.add_row({"1", "a,b \"q\""});
    CHECK(t.str() == "index,name\n0,fc1\n1,\"a,b \"\"q\"\"\"\n");
    CHECK_THROWS_AS(t.add_row({"2"}), std::invalid_argument);
    CHECK(t.rows() == 2);
}

TEST_CASE("atomic writes replace the file whole and leave no temporary behind") {
    TempDir dir;
    const fs::path target = dir.path / "out.csv";
    write_file_atomic(target.string(), "first\n");
    write_file_atomic(target.string(), "second\n");
    CHECK(read(target) == "second\n");
    std::size_t entries = 0;
    for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir.path)) ++entries;
    CHECK(entries == 1);
}

TEST_CASE("a write that cannot happen fails clearly and leaves nothing") {
    TempDir dir;
    const fs::path missing = dir.path / "no-such-dir" / "out.csv";
    CHECK_THROWS_AS(write_file_atomic(missing.string(), "x"), RuntimeError);
    CHECK_FALSE(fs::exists(missing));
    // The target is a directory: the rename fails, the temporary file is removed.
    fs::create_directories(dir.path / "adir");
    CHECK_THROWS_AS(write_file_atomic((dir.path / "adir").string(), "x"), RuntimeError);
    std::size_t entries = 0;
    for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir.path)) ++entries;
    CHECK(entries == 1);
}

TEST_CASE("CSV files read back: quotes, blank lines, and located errors") {
    const std::vector<std::string> cols{"a", "b"};
    const CsvFile f = parse_csv("a,b\n1,\"x, \"\"y\"\"\"\n\n2,z\r\n", "f.csv", cols);
    REQUIRE(f.rows.size() == 2);
    CHECK(f.rows[0][1] == "x, \"y\"");
    CHECK(f.lines[1] == 4);
    CHECK(csv_number(f, 1, 0) == 2);
    auto error_of = [&](const std::string& text) {
        try {
            const CsvFile g = parse_csv(text, "f.csv", cols);
            for (std::size_t r = 0; r < g.rows.size(); ++r) (void)csv_number(g, r, 0);
        } catch (const InputError& e) {
            return std::string(e.what());
        }
        return std::string("no error");
    };
    CHECK(error_of("a,c\n") == "f.csv:1: expected the columns a,b, found a,c");
    CHECK(error_of("a,b\n1,2,3\n") == "f.csv:2: 3 cells for 2 columns");
    CHECK(error_of("a,b\n1,\"open\n") == "f.csv:2: unterminated quoted cell");
    CHECK(error_of("a,b\nnan,1\n") == "f.csv:2: column \"a\": \"nan\" is not a finite number");
    CHECK(error_of("a,b\n1x,1\n") == "f.csv:2: column \"a\": \"1x\" is not a finite number");
    CHECK(error_of("") == "f.csv: the file is empty: expected a header row");
    // What CsvTable writes, parse_csv reads.
    CsvTable t(cols);
    t.add_row({"q\"uote", "new\nline"});
    const CsvFile back = parse_csv(t.str(), "t.csv", cols);
    CHECK(back.rows[0] == std::vector<std::string>{"q\"uote", "new\nline"});
}
