#include "dpart/io/csv.hpp"

#include <fmt/format.h>

#include <charconv>
#include <cmath>
#include <stdexcept>

#include "dpart/core/error.hpp"
#include "dpart/core/strings.hpp"

#include "dpart/io/atomic_file.hpp"
#include "dpart/io/input_file.hpp"

namespace dpart {

namespace {
void append_line(std::string& out, const std::vector<std::string>& cells) {
    for (std::size_t i = 0; i < cells.size(); ++i) {
        if (i > 0) out += ',';
        out += csv_escape(cells[i]);
    }
    out += '\n';
}
}  // namespace

CsvTable::CsvTable(std::vector<std::string> columns) : columns_(std::move(columns)) { append_line(text_, columns_); }

void CsvTable::add_row(const std::vector<std::string>& cells) {
    if (cells.size() != columns_.size())
        throw std::invalid_argument("CSV row has " + std::to_string(cells.size()) + " cells for " +
                                    std::to_string(columns_.size()) + " columns");
    append_line(text_, cells);
    ++rows_;
}

std::string csv_escape(std::string_view cell) {
    if (cell.find_first_of(",\"\r\n") == std::string_view::npos) return std::string(cell);
    std::string out = "\"";
    for (char c : cell) {
        if (c == '"') out += '"';
        out += c;
    }
    return out + '"';
}

void CsvTable::write(const std::string& path) const { write_file_atomic(path, text_); }

CsvFile parse_csv(std::string_view text, const std::string& path, const std::vector<std::string>& columns) {
    CsvFile f;
    f.path = path;
    std::uint32_t line = 1;
    std::size_t i = 0;
    bool header = true;
    while (i < text.size()) {
        const std::uint32_t row_line = line;
        std::vector<std::string> cells(1);
        bool quoted = false;
        for (; i < text.size(); ++i) {
            const char c = text[i];
            if (quoted) {
                if (c == '"' && i + 1 < text.size() && text[i + 1] == '"') {
                    cells.back() += '"';
                    ++i;
                } else if (c == '"') {
                    quoted = false;
                } else {
                    if (c == '\n') ++line;
                    cells.back() += c;
                }
            } else if (c == '"' && cells.back().empty()) {
                quoted = true;
            } else if (c == ',') {
                cells.emplace_back();
            } else if (c == '\n') {
                ++i;
                ++line;
                break;
            } else if (c != '\r') {
                cells.back() += c;
            }
        }
        if (quoted) throw InputError(SourceLocation{path, row_line, 0}, "unterminated quoted cell");
        if (cells.size() == 1 && cells[0].empty()) continue;  // a blank line
        if (header) {
            if (cells != columns)
                throw InputError(SourceLocation{path, row_line, 0},
                                 fmt::format("expected the columns {}, found {}", join(columns, ","), join(cells, ",")));
            f.header = std::move(cells);
            header = false;
            continue;
        }
        if (cells.size() != columns.size())
            throw InputError(SourceLocation{path, row_line, 0},
                             fmt::format("{} cells for {} columns", cells.size(), columns.size()));
        f.rows.push_back(std::move(cells));
        f.lines.push_back(row_line);
    }
    if (header) throw InputError(SourceLocation{path}, "the file is empty: expected a header row");
    return f;
}

CsvFile read_csv(const std::string& path, const std::vector<std::string>& columns) {
    return parse_csv(read_input_file(path), path, columns);
}

double csv_number(const CsvFile& f, std::size_t row, std::size_t column) {
    const std::string& cell = f.rows.at(row).at(column);
    // A decimal number as dpart writes them: no blanks around it, no hexadecimal, no "+" (from_chars
    // takes none of these; a value out of a double's range is an error too).
    double v = 0;
    const char* end = cell.data() + cell.size();
    const auto [stop, ec] = std::from_chars(cell.data(), end, v, std::chars_format::general);
    if (cell.empty() || ec != std::errc{} || stop != end || !std::isfinite(v))
        throw InputError(SourceLocation{f.path, f.lines.at(row), 0},
                         fmt::format("column \"{}\": \"{}\" is not a finite number", f.header.at(column), cell));
    return v;
}

}  // namespace dpart
