// CSV: parse_csv on arbitrary text with the columns of iterations.csv (what `dpart compare`
// reads), every cell read as a number, and the table written back with CsvTable, which must
// parse to the same cells.
#include "dpart/io/csv.hpp"
#include "dpart/io/trace.hpp"
#include "dpart/report/compare.hpp"
#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    using namespace dpart;
    const std::string text = fuzz::text_of(data, size);
    const std::vector<std::string>& columns = iteration_columns();
    fuzz::expect_input_errors([&] {
        const CsvFile f = parse_csv(text, fuzz::input_name, columns);
        if (f.rows.size() != f.lines.size()) fuzz::finding("rows and line numbers disagree");
        CsvTable table(columns);
        for (const auto& row : f.rows) {
            if (row.size() != columns.size()) fuzz::finding("a row with the wrong number of cells was accepted");
            table.add_row(row);
        }
        try {
            const CsvFile again = parse_csv(table.str(), fuzz::input_name, columns);
            if (again.rows != f.rows) fuzz::finding("CsvTable::str does not parse back to the same cells");
        } catch (const InputError& e) {
            fuzz::finding(std::string("CsvTable::str wrote a table that does not parse: ") + e.what());
        }
        for (std::size_t r = 0; r < f.rows.size(); ++r)
            for (std::size_t c = 0; c < columns.size(); ++c) {
                try {
                    (void)csv_number(f, r, c);
                } catch (const InputError&) {
                }
            }
        (void)summarise_iterations(f);
    });
    return 0;
}
