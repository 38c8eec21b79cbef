#pragma once
// CSV with columns declared up front (never discovered from the data), RFC 4180 quoting.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace dpart {

class CsvTable {
public:
    explicit CsvTable(std::vector<std::string> columns);

    /// Appends a row; throws std::invalid_argument unless it has one cell per column.
    void add_row(const std::vector<std::string>& cells);
    [[nodiscard]] const std::vector<std::string>& columns() const noexcept { return columns_; }
    [[nodiscard]] std::size_t rows() const noexcept { return rows_; }
    /// The whole table, header first, "\n" line ends.
    [[nodiscard]] const std::string& str() const noexcept { return text_; }
    /// Writes the table atomically (see write_file_atomic).
    void write(const std::string& path) const;

private:
    std::vector<std::string> columns_;
    std::string text_;  ///< kept as the file's text: a long replay's rows take what the file will
    std::size_t rows_ = 0;
};

/// A cell quoted when it holds a comma, a quote or a line break.
[[nodiscard]] std::string csv_escape(std::string_view cell);

/// A CSV file read back: its header and rows, each with its line number.
struct CsvFile {
    std::string path;
    std::vector<std::string> header;
    std::vector<std::vector<std::string>> rows;
    std::vector<std::uint32_t> lines;  ///< line number of each row
};

/// Reads a CSV file (RFC 4180 quoting) whose header must be exactly `columns`. Throws
/// InputError naming the file and line: unreadable file, other columns, a row with the wrong
/// number of cells, an unterminated quote.
[[nodiscard]] CsvFile read_csv(const std::string& path, const std::vector<std::string>& columns);
/// The same from text (`path` for messages).
[[nodiscard]] CsvFile parse_csv(std::string_view text, const std::string& path, const std::vector<std::string>& columns);

/// A cell as a finite number, or InputError "file:line: column "c": "x" is not a number".
[[nodiscard]] double csv_number(const CsvFile& f, std::size_t row, std::size_t column);

}  // namespace dpart
