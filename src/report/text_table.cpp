#include "dpart/report/text_table.hpp"

#include <algorithm>
#include <stdexcept>

namespace dpart {

TextTable::TextTable(std::vector<Column> columns) : columns_(std::move(columns)) {}

void TextTable::add_row(std::vector<std::string> cells) {
    if (cells.size() != columns_.size()) throw std::invalid_argument("table row has the wrong number of cells");
    rows_.push_back(std::move(cells));
}

void TextTable::add_rule() { rows_.emplace_back(); }

std::string TextTable::str() const {
    std::vector<std::size_t> width(columns_.size());
    for (std::size_t c = 0; c < columns_.size(); ++c) width[c] = columns_[c].title.size();
    for (const auto& row : rows_)
        for (std::size_t c = 0; c < row.size(); ++c) width[c] = std::max(width[c], row[c].size());

    std::string out;
    auto line = [&](const std::vector<std::string>& cells) {
        std::string text;
        for (std::size_t c = 0; c < columns_.size(); ++c) {
            if (c > 0) text += "  ";
            const std::size_t pad = width[c] - cells[c].size();
            if (columns_[c].align == Align::right) text.append(pad, ' ');
            text += cells[c];
            if (columns_[c].align == Align::left && c + 1 < columns_.size()) text.append(pad, ' ');
        }
        while (!text.empty() && text.back() == ' ') text.pop_back();
        out += text + '\n';
    };
    std::vector<std::string> titles;
    for (const auto& col : columns_) titles.push_back(col.title);
    line(titles);
    std::size_t total = 0;
    for (std::size_t w : width) total += w;
    total += 2 * (width.size() - 1);
    const std::string rule(total, '-');
    out += rule + '\n';
    for (const auto& row : rows_) {
        if (row.empty()) out += rule + '\n';
        else line(row);
    }
    return out;
}

}  // namespace dpart
