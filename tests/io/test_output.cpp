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
