#include "dpart/io/atomic_file.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fmt/format.h>

#include "dpart/core/error.hpp"

namespace dpart {
namespace {

[[noreturn]] void fail(const std::string& what, const std::string& path, int err) {
    throw RuntimeError(fmt::format("cannot {} {}: {}", what, path, std::strerror(err)));
}

/// A file descriptor, closed on scope exit.
class Fd {
public:
    explicit Fd(int fd) : fd_(fd) {}
    Fd(const Fd&) = delete;
    Fd& operator=(const Fd&) = delete;
    ~Fd() {
        if (fd_ >= 0) ::close(fd_);
    }
    [[nodiscard]] int get() const noexcept { return fd_; }
    /// Closes now, reporting the error (a failed close can be a failed write on some filesystems).
    void close(const std::string& path) {
        const int fd = fd_;
        fd_ = -1;
        if (::close(fd) != 0) fail("close", path, errno);
    }

private:
    int fd_;
};

void write_all(int fd, std::string_view data, const std::string& path) {
    while (!data.empty()) {
        const ssize_t n = ::write(fd, data.data(), data.size());
        if (n < 0) {
            if (errno == EINTR) continue;
            fail("write", path, errno);
        }
        data.remove_prefix(static_cast<std::size_t>(n));
    }
}

/// The directory holding `path` ("." for a bare file name).
std::string directory_of(const std::string& path) {
    const std::string dir = std::filesystem::path(path).parent_path().string();
    return dir.empty() ? "." : dir;
}

/// Makes a rename or link durable: the directory entry itself is flushed (best effort: some
/// filesystems refuse fsync on a directory, and the data is already safe).
void sync_directory(const std::string& dir) {
    const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return;
    (void)::fsync(fd);
    ::close(fd);
}

/// The temporary name a replacement goes through: hidden, and naming the target and the process.
std::string temporary_name(const std::string& path) {
    const std::filesystem::path p(path);
    return (p.parent_path() / fmt::format(".{}.dpart-tmp.{}", p.filename().string(), ::getpid())).string();
}

/// A named temporary file in the target's directory, removed unless renamed over the target:
/// the fallback where O_TMPFILE is not supported (some network and overlay filesystems).
/// A SIGKILL between its creation and the rename leaves it behind (`.NAME.dpart-tmp.PID`).
void write_via_named_temporary(const std::string& path, std::string_view content) {
    const std::string tmp = temporary_name(path);
    Fd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
    if (fd.get() < 0) fail("create", tmp, errno);
    bool committed = false;
    struct Remove {
        const std::string& tmp;
        const bool& committed;
        ~Remove() {
            if (!committed) ::unlink(tmp.c_str());
        }
    } remove{tmp, committed};
    write_all(fd.get(), content, tmp);
    if (::fsync(fd.get()) != 0) fail("flush", tmp, errno);
    fd.close(tmp);
    if (::rename(tmp.c_str(), path.c_str()) != 0) fail("rename into", path, errno);
    committed = true;
}

}  // namespace

void write_file_atomic(const std::string& path, std::string_view content) {
    // The content goes first into an unnamed file of the target's directory (O_TMPFILE): if the
    // process dies before the file is named, the kernel frees it and nothing is left behind.
    const std::string dir = directory_of(path);
    Fd fd(::open(dir.c_str(), O_TMPFILE | O_WRONLY | O_CLOEXEC, 0644));
    if (fd.get() < 0) {
        if (errno == EISDIR || errno == EOPNOTSUPP || errno == EINVAL) return write_via_named_temporary(path, content);
        fail("create", path, errno);
    }
    write_all(fd.get(), content, path);
    if (::fsync(fd.get()) != 0) fail("flush", path, errno);
    // Naming it: linkat refuses to replace, so a new file is linked at its name directly (it
    // appears whole, atomically); an existing one is replaced through a temporary name and a
    // rename, the temporary existing only between those two calls.
    const std::string self = fmt::format("/proc/self/fd/{}", fd.get());
    if (::linkat(AT_FDCWD, self.c_str(), AT_FDCWD, path.c_str(), AT_SYMLINK_FOLLOW) == 0) {
        fd.close(path);
        sync_directory(dir);
        return;
    }
    if (errno == ENOENT && ::access("/proc/self/fd", F_OK) != 0) return write_via_named_temporary(path, content);
    if (errno != EEXIST) fail("create", path, errno);
    const std::string tmp = temporary_name(path);
    (void)::unlink(tmp.c_str());  // this process's own leftover, if any
    if (::linkat(AT_FDCWD, self.c_str(), AT_FDCWD, tmp.c_str(), AT_SYMLINK_FOLLOW) != 0) fail("create", tmp, errno);
    if (::rename(tmp.c_str(), path.c_str()) != 0) {
        const int err = errno;
        ::unlink(tmp.c_str());
        fail("rename into", path, err);
    }
    fd.close(path);
    sync_directory(dir);
}

}  // namespace dpart
