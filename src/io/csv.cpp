#include "dpart/io/csv.hpp"

#include <stdexcept>

#include "dpart/io/atomic_file.hpp"

namespace dpart {

CsvTable::CsvTable(std::vector<std::string> columns) : columns_(std::move(columns)) {}

void CsvTable::add_row(std::vector<std::string> cells) {
    if (cells.size() != columns_.size())
        throw std::invalid_argument("CSV row has " + std::to_string(cells.size()) + " cells for " +
                                    std::to_string(columns_.size()) + " columns");
    rows_.push_back(std::move(cells));
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

std::string CsvTable::str() const {
    std::string out;
    auto line = [&out](const std::vector<std::string>& cells) {
        for (std::size_t i = 0; i < cells.size(); ++i) {
            if (i > 0) out += ',';
            out += csv_escape(cells[i]);
        }
        out += '\n';
    };
    line(columns_);
    for (const auto& row : rows_) line(row);
    return out;
}

void CsvTable::write(const std::string& path) const { write_file_atomic(path, str()); }

}  // namespace dpart
