#pragma once
// CSV with columns declared up front (never discovered from the data), RFC 4180 quoting.
#include <string>
#include <string_view>
#include <vector>

namespace dpart {

class CsvTable {
public:
    explicit CsvTable(std::vector<std::string> columns);

    /// Appends a row; throws std::invalid_argument unless it has one cell per column.
    void add_row(std::vector<std::string> cells);
    [[nodiscard]] const std::vector<std::string>& columns() const noexcept { return columns_; }
    [[nodiscard]] std::size_t rows() const noexcept { return rows_.size(); }
    /// The whole table, header first, "\n" line ends.
    [[nodiscard]] std::string str() const;
    /// Writes the table atomically (see write_file_atomic).
    void write(const std::string& path) const;

private:
    std::vector<std::string> columns_;
    std::vector<std::vector<std::string>> rows_;
};

/// A cell quoted when it holds a comma, a quote or a line break.
[[nodiscard]] std::string csv_escape(std::string_view cell);

}  // namespace dpart
