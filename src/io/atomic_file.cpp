#include "dpart/io/atomic_file.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fmt/format.h>

#include "dpart/core/error.hpp"

namespace dpart {
namespace {

[[noreturn]] void fail(const std::string& what, const std::string& path, int err) {
    throw RuntimeError(fmt::format("cannot {} {}: {}", what, path, std::strerror(err)));
}

/// Closes the descriptor and removes the temporary file unless committed.
class TempFile {
public:
    explicit TempFile(std::string path) : path_(std::move(path)) {
        fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (fd_ < 0) fail("create", path_, errno);
    }
    TempFile(const TempFile&) = delete;
    TempFile& operator=(const TempFile&) = delete;
    ~TempFile() {
        if (fd_ >= 0) ::close(fd_);
        if (!committed_) ::unlink(path_.c_str());
    }
    void write_all(std::string_view data) {
        while (!data.empty()) {
            const ssize_t n = ::write(fd_, data.data(), data.size());
            if (n < 0) {
                if (errno == EINTR) continue;
                fail("write", path_, errno);
            }
            data.remove_prefix(static_cast<std::size_t>(n));
        }
    }
    void commit(const std::string& target) {
        if (::fsync(fd_) != 0) fail("flush", path_, errno);
        const int fd = fd_;
        fd_ = -1;
        if (::close(fd) != 0) fail("close", path_, errno);
        if (::rename(path_.c_str(), target.c_str()) != 0) fail("rename into", target, errno);
        committed_ = true;
    }

private:
    std::string path_;
    int fd_ = -1;
    bool committed_ = false;
};

}  // namespace

void write_file_atomic(const std::string& path, std::string_view content) {
    TempFile tmp(fmt::format("{}.tmp.{}", path, ::getpid()));
    tmp.write_all(content);
    tmp.commit(path);
}

}  // namespace dpart
