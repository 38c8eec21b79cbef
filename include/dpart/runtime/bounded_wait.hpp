#pragma once
// A wait on something that only answers "done yet?" (a GPU stream, an event), bounded by a time
// limit: the host side of a wait whose other end may never come (a receive from a peer that
// failed). Header-only and free of CUDA, so that the loop is tested without a GPU.
#include <chrono>
#include <cstddef>
#include <string>
#include <thread>

#include "dpart/core/error.hpp"

namespace dpart::rt {

enum class Poll { done, pending };

/// Calls `query()` until it returns Poll::done (it throws on an error of its own). Between calls
/// it yields for the first millisecond (a GPU's short waits stay short), then sleeps 50 us. With
/// `limit` > 0, throws RuntimeError(message()) once `limit` has passed without done; limit 0
/// waits for as long as it takes. Returns how many times it asked.
template <class Query, class Message>
std::size_t wait_bounded(Query&& query, std::chrono::milliseconds limit, Message&& message) {
    using clock = std::chrono::steady_clock;
    const auto start = clock::now();
    for (std::size_t asked = 1;; ++asked) {
        if (query() == Poll::done) return asked;
        const auto waited = clock::now() - start;
        if (limit.count() > 0 && waited > limit) throw RuntimeError(message());
        if (waited < std::chrono::milliseconds(1)) std::this_thread::yield();
        else std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
}

}  // namespace dpart::rt
