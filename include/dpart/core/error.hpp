#pragma once
// Errors carry the exit code they map to, so that `main` is the one place that turns them
// into a message and a process status. Documented codes: 0 success, 1 runtime failure,
// 2 bad input, 3 infeasible request.
#include <cstdint>
#include <stdexcept>
#include <string>

namespace dpart {

enum class ExitCode : int { ok = 0, runtime_failure = 1, bad_input = 2, infeasible = 3 };

/// Where something was written in an input file; line and column start at 1, 0 = unknown.
struct SourceLocation {
    std::string file;
    std::uint32_t line = 0;
    std::uint32_t column = 0;

    /// "file:line:col", "file:line", or "file" depending on what is known.
    [[nodiscard]] std::string str() const;
};

class Error : public std::runtime_error {
public:
    Error(ExitCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
    [[nodiscard]] ExitCode code() const noexcept { return code_; }

private:
    ExitCode code_;
};

/// Bad user input: a malformed file, an out-of-range flag. Exit code 2.
/// what() is "file:line:col: message" when the location is known.
class InputError : public Error {
public:
    InputError(SourceLocation where, const std::string& message);
    explicit InputError(const std::string& message) : Error(ExitCode::bad_input, message) {}
    [[nodiscard]] const SourceLocation& where() const noexcept { return where_; }
    [[nodiscard]] const std::string& detail() const noexcept { return detail_; }

private:
    SourceLocation where_;
    std::string detail_;
};

/// A well-formed request that cannot be satisfied (e.g. the model fits on no partition). Exit 3.
class InfeasibleError : public Error {
public:
    explicit InfeasibleError(const std::string& message) : Error(ExitCode::infeasible, message) {}
};

/// Something failed while doing the work (I/O, a device, a peer). Exit code 1.
class RuntimeError : public Error {
public:
    explicit RuntimeError(const std::string& message) : Error(ExitCode::runtime_failure, message) {}
};

/// An arithmetic result does not fit in 64 bits. Raised by checked arithmetic; loaders turn it
/// into an InputError at the location of the value that caused it.
class OverflowError : public std::overflow_error {
public:
    using std::overflow_error::overflow_error;
};

}  // namespace dpart
