#include "dpart/runtime/comm_groups.hpp"

#include <fmt/format.h>

#include <algorithm>


namespace dpart::rt {

CommGroups comm_groups(const Plan& plan) {
    CommGroups g;
    std::vector<std::size_t> first(plan.stages.size() + 1, 0);
    for (std::size_t s = 0; s < plan.stages.size(); ++s) first[s + 1] = first[s] + plan.stages[s].devices.size();
    for (std::size_t s = 0; s < plan.stages.size(); ++s) {
        const Stage& st = plan.stages[s];
        const std::size_t tp = st.tp == 0 ? 1 : st.tp;
        const std::size_t replicas = st.devices.size() / tp;
        if (replicas > 1)
            for (std::size_t t = 0; t < tp; ++t) {
                std::vector<std::size_t> group;
                for (std::size_t r = 0; r < replicas; ++r) group.push_back(first[s] + r * tp + t);
                g.data_parallel.push_back(std::move(group));
            }
        if (tp > 1)
            for (std::size_t r = 0; r < replicas; ++r) {
                std::vector<std::size_t> group;
                for (std::size_t t = 0; t < tp; ++t) group.push_back(first[s] + r * tp + t);
                g.tensor_parallel.push_back(std::move(group));
            }
        if (s + 1 < plan.stages.size()) {
            std::vector<std::size_t> group;
            for (std::size_t w = first[s]; w < first[s + 2]; ++w) group.push_back(w);
            g.pipeline.push_back(std::move(group));
        }
    }
    return g;
}

Bytes share_from_root(Transport& t, std::span<const std::size_t> group, const Tag& tag,
                      const std::function<Bytes()>& make) {
    if (group.empty() || std::find(group.begin(), group.end(), t.rank()) == group.end())
        throw RuntimeError(fmt::format("rank {} is not in the group it bootstraps", t.rank()));
    if (t.rank() != group.front()) return t.recv(group.front(), tag);
    Bytes id = make();
    for (std::size_t i = 1; i < group.size(); ++i) t.send(group[i], tag, id);
    return id;
}

Shrink shrink_ranks(std::size_t size, std::span<const std::size_t> failed) {
    Shrink s;
    std::vector<bool> gone(size, false);
    for (std::size_t f : failed) {
        if (f >= size) throw InputError(fmt::format("failed rank {} is not in a communicator of {} ranks", f, size));
        gone[f] = true;
    }
    s.new_rank.assign(size, -1);
    int next = 0;
    for (std::size_t r = 0; r < size; ++r) {
        if (gone[r]) s.excluded.push_back(static_cast<int>(r));
        else s.new_rank[r] = next++;
    }
    if (next == 0) throw InputError(fmt::format("all {} ranks of the communicator failed: nothing is left to shrink to", size));
    return s;
}

}  // namespace dpart::rt
