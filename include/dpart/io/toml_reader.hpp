#pragma once
// Strict, located reading of TOML tables. Every accessor records the key it was asked for;
// finish() then rejects any key the caller never asked about, with a "did you mean" hint.
// Every error is an InputError "file:line:col: <context>: <message>".
#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "dpart/io/toml.hpp"

#include "dpart/core/error.hpp"
#include "dpart/graph/shape.hpp"

namespace dpart {

/// Reads a whole file and parses it; syntax errors become InputError with the parser's
/// location, an unreadable file an InputError naming it.
[[nodiscard]] toml::table parse_toml_file(const std::string& path);
/// Parses `text` as if read from `path` (for tests and for in-memory documents).
[[nodiscard]] toml::table parse_toml_text(std::string_view text, const std::string& path);

[[nodiscard]] SourceLocation location_of(const toml::node& node, const std::string& file);

class TableReader {
public:
    TableReader(const toml::table& table, std::string file, std::string context);

    /// Replaces the context prefix of messages (e.g. once a layer's name is known).
    void set_context(std::string context) { context_ = std::move(context); }
    [[nodiscard]] const std::string& context() const noexcept { return context_; }
    [[nodiscard]] const std::string& file() const noexcept { return file_; }
    [[nodiscard]] const toml::table& table() const noexcept { return table_; }

    /// Declares keys that will be read later, so that a typo check made before they are read
    /// (see missing()) does not mistake one of them for a misspelling.
    void expect(std::initializer_list<std::string_view> keys);

    [[nodiscard]] SourceLocation where() const;
    /// Location of the key's value, or of the table when the key is absent.
    [[nodiscard]] SourceLocation where(std::string_view key) const;
    [[nodiscard]] bool has(std::string_view key) const;

    [[noreturn]] void fail(std::string_view key, const std::string& message) const;
    [[noreturn]] void fail(const std::string& message) const;
    /// "missing required key" (+ hint), unless an unknown key of the table looks like a typo of
    /// `key`: then that typo is reported, at its own location, since it is the real mistake.
    [[noreturn]] void missing(std::string_view key, std::string_view hint = "") const;
    /// Throws the unknown-key error for a present, unasked-for key that is a typo of `key`.
    void reject_typo_of(std::string_view key) const;

    [[nodiscard]] std::string required_string(std::string_view key);
    [[nodiscard]] std::optional<std::string> optional_string(std::string_view key);
    /// One of `allowed`; the default when absent (an empty default makes the key required).
    [[nodiscard]] std::string choice(std::string_view key, const std::vector<std::string>& allowed,
                                     std::string_view fallback);
    [[nodiscard]] bool optional_bool(std::string_view key, bool fallback);

    /// A positive integer (or an integral float) that fits in 64 bits.
    [[nodiscard]] std::uint64_t required_count(std::string_view key);
    /// As required_count, with a default; `allow_zero` accepts 0.
    [[nodiscard]] std::uint64_t optional_count(std::string_view key, std::uint64_t fallback, bool allow_zero = false);
    /// A finite number > 0.
    [[nodiscard]] double required_positive(std::string_view key);
    [[nodiscard]] std::optional<double> optional_positive(std::string_view key);
    /// A finite number >= 0.
    [[nodiscard]] std::optional<double> optional_nonnegative(std::string_view key);

    /// Fails at the key unless lo <= value <= hi: a figure outside the range dpart accepts is
    /// a typo (a unit off by 1e9), and beyond it the times computed from it overflow or vanish.
    /// `unit` goes into the message ("TFLOP/s").
    void check_within(std::string_view key, double value, double lo, double hi, std::string_view unit) const;

    /// An array of positive counts, e.g. input_shape = [3, 224, 224].
    [[nodiscard]] std::optional<Shape> optional_shape(std::string_view key);
    /// An integer or a 2-array of integers (kernel = 3 or kernel = [3, 5]).
    [[nodiscard]] std::optional<std::pair<std::uint64_t, std::uint64_t>> optional_pair(std::string_view key);
    /// An array of strings, with the location of each element.
    [[nodiscard]] std::optional<std::vector<std::string>> optional_string_array(
        std::string_view key, std::vector<SourceLocation>* where = nullptr);

    /// A sub-table, or nullptr when absent.
    [[nodiscard]] const toml::table* optional_table(std::string_view key);
    /// An array of tables ([[x]]), or nullptr when absent.
    [[nodiscard]] const toml::array* optional_table_array(std::string_view key);

    /// Rejects every key that no accessor asked for.
    void finish() const;

private:
    [[nodiscard]] const toml::node* get(std::string_view key);
    [[nodiscard]] std::uint64_t to_count(std::string_view key, const toml::node& node, bool allow_zero) const;
    [[nodiscard]] SourceLocation key_location(const toml::key& key) const;
    [[nodiscard]] double to_number(std::string_view key, const toml::node& node) const;

    const toml::table& table_;
    std::string file_;
    std::string context_;
    std::set<std::string, std::less<>> known_;
};

/// "an integer", "a string", "a table", ... for messages.
[[nodiscard]] std::string describe_type(const toml::node& node);

}  // namespace dpart
