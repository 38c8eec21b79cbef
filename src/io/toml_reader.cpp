#include "dpart/io/toml_reader.hpp"

#include <fmt/format.h>

#include <cmath>

#include "dpart/core/strings.hpp"
#include "dpart/io/input_file.hpp"

namespace dpart {

toml::table parse_toml_text(std::string_view text, const std::string& path) {
    try {
        return toml::parse(text, path);
    } catch (const toml::parse_error& e) {
        const auto& begin = e.source().begin;
        throw InputError(SourceLocation{path, begin.line, begin.column},
                         fmt::format("TOML syntax error: {}", e.description()));
    }
}

toml::table parse_toml_file(const std::string& path) { return parse_toml_text(read_input_file(path), path); }

SourceLocation location_of(const toml::node& node, const std::string& file) {
    const auto& begin = node.source().begin;
    return SourceLocation{file, begin.line, begin.column};
}

std::string describe_type(const toml::node& node) {
    switch (node.type()) {
        case toml::node_type::table: return "a table";
        case toml::node_type::array: return "an array";
        case toml::node_type::string: return "a string";
        case toml::node_type::integer: return "an integer";
        case toml::node_type::floating_point: return "a float";
        case toml::node_type::boolean: return "a boolean";
        case toml::node_type::date: return "a date";
        case toml::node_type::time: return "a time";
        case toml::node_type::date_time: return "a date-time";
        case toml::node_type::none: break;
    }
    return "nothing";
}

TableReader::TableReader(const toml::table& table, std::string file, std::string context)
    : table_(table), file_(std::move(file)), context_(std::move(context)) {}

SourceLocation TableReader::where() const { return location_of(table_, file_); }

SourceLocation TableReader::where(std::string_view key) const {
    if (const toml::node* n = table_.get(key)) return location_of(*n, file_);
    return where();
}

bool TableReader::has(std::string_view key) const { return table_.contains(key); }

void TableReader::fail(std::string_view key, const std::string& message) const {
    throw InputError(where(key), context_.empty() ? message : context_ + ": " + message);
}

void TableReader::fail(const std::string& message) const {
    throw InputError(where(), context_.empty() ? message : context_ + ": " + message);
}

void TableReader::expect(std::initializer_list<std::string_view> keys) {
    for (std::string_view k : keys) known_.emplace(k);
}

void TableReader::reject_typo_of(std::string_view key) const {
    for (const auto& [k, node] : table_) {
        if (known_.count(k.str()) != 0 || k.str() == key) continue;
        if (!closest_match(k.str(), {std::string(key)}).empty())
            throw InputError(key_location(k),
                             fmt::format("{}{}unknown key \"{}\" (did you mean \"{}\"?)", context_,
                                         context_.empty() ? "" : ": ", k.str(), key));
    }
}

void TableReader::missing(std::string_view key, std::string_view hint) const {
    reject_typo_of(key);
    fail(fmt::format("missing required key \"{}\"{}", key, hint));
}

const toml::node* TableReader::get(std::string_view key) {
    known_.emplace(key);
    return table_.get(key);
}

std::string TableReader::required_string(std::string_view key) {
    const toml::node* n = get(key);
    if (n == nullptr) missing(key);
    auto s = optional_string(key);
    if (s->empty()) fail(key, fmt::format("\"{}\" must not be empty", key));
    return *s;
}

std::optional<std::string> TableReader::optional_string(std::string_view key) {
    const toml::node* n = get(key);
    if (n == nullptr) return std::nullopt;
    if (!n->is_string()) fail(key, fmt::format("\"{}\" must be a string, got {}", key, describe_type(*n)));
    return std::string(n->as_string()->get());
}

std::string TableReader::choice(std::string_view key, const std::vector<std::string>& allowed,
                                std::string_view fallback) {
    auto s = optional_string(key);
    if (!s) {
        if (fallback.empty()) missing(key);
        return std::string(fallback);
    }
    for (const auto& a : allowed)
        if (a == *s) return *s;
    std::vector<std::string> quoted;
    for (const auto& a : allowed) quoted.push_back('"' + a + '"');
    fail(key, fmt::format("unknown {} \"{}\"{}; expected one of {}", key, *s, did_you_mean(*s, allowed), join(quoted)));
}

bool TableReader::optional_bool(std::string_view key, bool fallback) {
    const toml::node* n = get(key);
    if (n == nullptr) return fallback;
    if (!n->is_boolean()) fail(key, fmt::format("\"{}\" must be true or false, got {}", key, describe_type(*n)));
    return n->as_boolean()->get();
}

std::uint64_t TableReader::to_count(std::string_view key, const toml::node& n, bool allow_zero) const {
    const std::string_view bound = allow_zero ? "a non-negative" : "a positive";
    if (n.is_integer()) {
        const std::int64_t v = n.as_integer()->get();
        if (v < 0 || (v == 0 && !allow_zero))
            fail(key, fmt::format("\"{}\" must be {} integer, got {}", key, bound, v));
        return static_cast<std::uint64_t>(v);
    }
    if (n.is_floating_point()) {
        const double v = n.as_floating_point()->get();
        if (std::isnan(v)) fail(key, fmt::format("\"{}\" must be {} integer, got NaN", key, bound));
        if (std::isinf(v)) fail(key, fmt::format("\"{}\" must be {} integer, got infinity", key, bound));
        if (v < 0 || (v == 0 && !allow_zero)) fail(key, fmt::format("\"{}\" must be {} integer, got {}", key, bound, v));
        if (v >= 18446744073709551616.0) fail(key, fmt::format("\"{}\" = {} overflows 64 bits", key, v));
        if (v != std::floor(v)) fail(key, fmt::format("\"{}\" must be a whole number, got {}", key, v));
        return static_cast<std::uint64_t>(v);
    }
    fail(key, fmt::format("\"{}\" must be {} integer, got {}", key, bound, describe_type(n)));
}

std::uint64_t TableReader::required_count(std::string_view key) {
    const toml::node* n = get(key);
    if (n == nullptr) missing(key);
    return to_count(key, *n, false);
}

std::uint64_t TableReader::optional_count(std::string_view key, std::uint64_t fallback, bool allow_zero) {
    const toml::node* n = get(key);
    if (n == nullptr) return fallback;
    return to_count(key, *n, allow_zero);
}

double TableReader::to_number(std::string_view key, const toml::node& n) const {
    double v = 0;
    if (n.is_integer()) v = static_cast<double>(n.as_integer()->get());
    else if (n.is_floating_point()) v = n.as_floating_point()->get();
    else fail(key, fmt::format("\"{}\" must be a number, got {}", key, describe_type(n)));
    if (std::isnan(v)) fail(key, fmt::format("\"{}\" must be a finite number, got NaN", key));
    if (std::isinf(v)) fail(key, fmt::format("\"{}\" must be a finite number, got infinity", key));
    return v;
}

double TableReader::required_positive(std::string_view key) {
    const toml::node* n = get(key);
    if (n == nullptr) missing(key);
    return *optional_positive(key);
}

std::optional<double> TableReader::optional_positive(std::string_view key) {
    const toml::node* n = get(key);
    if (n == nullptr) return std::nullopt;
    const double v = to_number(key, *n);
    if (v <= 0) fail(key, fmt::format("\"{}\" must be positive, got {}", key, v));
    return v;
}

std::optional<double> TableReader::optional_nonnegative(std::string_view key) {
    const toml::node* n = get(key);
    if (n == nullptr) return std::nullopt;
    const double v = to_number(key, *n);
    if (v < 0) fail(key, fmt::format("\"{}\" must not be negative, got {}", key, v));
    return v;
}

void TableReader::check_within(std::string_view key, double value, double lo, double hi, std::string_view unit) const {
    const std::string_view space = unit.empty() ? "" : " ";
    if (value < lo)
        fail(key, fmt::format("\"{}\" = {} is below {}{}{}, the least dpart accepts", key, value, lo, space, unit));
    if (value > hi)
        fail(key, fmt::format("\"{}\" = {} is above {}{}{}, the most dpart accepts", key, value, hi, space, unit));
}

std::optional<Shape> TableReader::optional_shape(std::string_view key) {
    const toml::node* n = get(key);
    if (n == nullptr) return std::nullopt;
    const toml::array* a = n->as_array();
    if (a == nullptr) fail(key, fmt::format("\"{}\" must be an array of positive integers, got {}", key, describe_type(*n)));
    if (a->empty()) fail(key, fmt::format("\"{}\" must not be empty", key));
    Shape s;
    for (const toml::node& element : *a) {
        if (!element.is_integer() && !element.is_floating_point())
            throw InputError(location_of(element, file_),
                             fmt::format("{}: \"{}\" must hold positive integers, got {}", context_, key,
                                         describe_type(element)));
        s.push_back(to_count(key, element, false));
    }
    return s;
}

std::optional<std::pair<std::uint64_t, std::uint64_t>> TableReader::optional_pair(std::string_view key) {
    const toml::node* n = get(key);
    if (n == nullptr) return std::nullopt;
    if (const toml::array* a = n->as_array()) {
        if (a->size() != 2) fail(key, fmt::format("\"{}\" must be an integer or an array of two, got {} values", key, a->size()));
        return std::pair{to_count(key, *a->get(0), false), to_count(key, *a->get(1), false)};
    }
    const std::uint64_t v = to_count(key, *n, false);
    return std::pair{v, v};
}

std::optional<std::vector<std::string>> TableReader::optional_string_array(std::string_view key,
                                                                           std::vector<SourceLocation>* where_out) {
    const toml::node* n = get(key);
    if (n == nullptr) return std::nullopt;
    const toml::array* a = n->as_array();
    if (a == nullptr) fail(key, fmt::format("\"{}\" must be an array of strings, got {}", key, describe_type(*n)));
    std::vector<std::string> out;
    for (const toml::node& element : *a) {
        if (!element.is_string())
            throw InputError(location_of(element, file_),
                             fmt::format("{}: \"{}\" must hold strings, got {}", context_, key, describe_type(element)));
        out.emplace_back(element.as_string()->get());
        if (where_out != nullptr) where_out->push_back(location_of(element, file_));
    }
    return out;
}

const toml::table* TableReader::optional_table(std::string_view key) {
    const toml::node* n = get(key);
    if (n == nullptr) return nullptr;
    if (!n->is_table()) fail(key, fmt::format("\"{}\" must be a table ([{}]), got {}", key, key, describe_type(*n)));
    return n->as_table();
}

const toml::array* TableReader::optional_table_array(std::string_view key) {
    const toml::node* n = get(key);
    if (n == nullptr) return nullptr;
    const toml::array* a = n->as_array();
    if (a == nullptr || !a->is_array_of_tables())
        fail(key, fmt::format("\"{}\" must be an array of tables ([[{}]]), got {}", key, key, describe_type(*n)));
    return a;
}

void TableReader::finish() const {
    std::vector<std::string> known(known_.begin(), known_.end());
    for (const auto& [key, node] : table_) {
        if (known_.count(key.str()) != 0) continue;
        std::string what = fmt::format("key \"{}\"", key.str());
        if (node.is_table()) what = fmt::format("table [{}]", key.str());
        else if (const auto* a = node.as_array(); a != nullptr && a->is_array_of_tables() && !a->empty())
            what = fmt::format("table [[{}]]", key.str());
        const SourceLocation at = node.is_table() ? location_of(node, file_) : key_location(key);
        throw InputError(at, fmt::format("{}{}unknown {}{}", context_, context_.empty() ? "" : ": ",
                                                        what, did_you_mean(key.str(), known)));
    }
}

SourceLocation TableReader::key_location(const toml::key& key) const {
    const auto& begin = key.source().begin;
    return SourceLocation{file_, begin.line, begin.column};
}

}  // namespace dpart
