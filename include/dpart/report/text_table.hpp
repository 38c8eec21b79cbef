#pragma once
// A plain-text table for terminals: columns sized to their content, numbers right-aligned.
#include <string>
#include <vector>

namespace dpart {

enum class Align { left, right };

class TextTable {
public:
    struct Column {
        std::string title;
        Align align = Align::right;
    };

    explicit TextTable(std::vector<Column> columns);
    /// Throws std::invalid_argument unless the row has one cell per column.
    void add_row(std::vector<std::string> cells);
    /// A horizontal rule before the next row (e.g. before a totals row).
    void add_rule();
    [[nodiscard]] std::string str() const;

private:
    std::vector<Column> columns_;
    std::vector<std::vector<std::string>> rows_;  ///< an empty row is a rule
};

}  // namespace dpart
