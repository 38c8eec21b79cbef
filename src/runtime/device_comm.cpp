#include "dpart/runtime/device_comm.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <optional>

#include "dpart/core/error.hpp"

namespace dpart::rt {

std::uint64_t comm_id(const Bytes& unique_id) {
    std::uint64_t h = 1469598103934665603ull;
    for (std::byte b : unique_id) h = (h ^ static_cast<std::uint8_t>(b)) * 1099511628211ull;
    return h;
}

std::uint64_t comm_id(std::uint64_t parent, std::span<const std::int64_t> salt) {
    std::uint64_t h = parent;
    for (std::int64_t w : salt)
        for (int k = 0; k < 8; ++k) h = (h ^ ((static_cast<std::uint64_t>(w) >> (8 * k)) & 0xffu)) * 1099511628211ull;
    return h == 0 ? 1 : h;
}

std::vector<CommSplit> comm_splits(const CommGroups& groups, std::size_t workers) {
    std::vector<CommSplit> out;
    const auto add = [&](CommSplit::Purpose purpose, const std::vector<const std::vector<std::size_t>*>& gs) {
        if (gs.empty()) return;
        CommSplit c;
        c.purpose = purpose;
        c.colour.assign(workers, -1);
        for (const std::vector<std::size_t>* g : gs) {
            for (std::size_t w : *g) {
                if (w >= workers) throw RuntimeError(fmt::format("worker {} of a group is not among {} workers", w, workers));
                if (c.colour[w] != -1) throw RuntimeError(fmt::format("worker {} is in two groups of one split", w));
                c.colour[w] = static_cast<int>(c.groups.size());
            }
            c.groups.push_back(*g);
        }
        out.push_back(std::move(c));
    };
    // Pair s joins stages s and s + 1: pairs of one parity share no stage.
    for (const auto purpose : {CommSplit::Purpose::activation, CommSplit::Purpose::gradient})
        for (std::size_t parity = 0; parity < 2; ++parity) {
            std::vector<const std::vector<std::size_t>*> gs;
            for (std::size_t s = parity; s < groups.pipeline.size(); s += 2) gs.push_back(&groups.pipeline[s]);
            add(purpose, gs);
        }
    std::vector<const std::vector<std::size_t>*> dp, tp;
    for (const auto& g : groups.data_parallel) dp.push_back(&g);
    add(CommSplit::Purpose::data_parallel, dp);
    for (const auto& g : groups.tensor_parallel) tp.push_back(&g);
    add(CommSplit::Purpose::tensor_parallel, tp);
    return out;
}

WorldStep world_step(std::span<const std::size_t> held, std::span<const std::size_t> wanted) {
    WorldStep s;
    if (held.empty()) return s;
    for (std::size_t w : wanted)
        if (std::find(held.begin(), held.end(), w) == held.end()) return s;  // a newcomer: bootstrap
    if (held.size() == wanted.size()) {
        s.reuse = true;
        return s;
    }
    std::vector<std::size_t> gone;
    for (std::size_t r = 0; r < held.size(); ++r)
        if (std::find(wanted.begin(), wanted.end(), held[r]) == wanted.end()) gone.push_back(r);
    const Shrink sh = shrink_ranks(held.size(), gone);
    s.shrink = true;
    s.excluded = sh.excluded;
    return s;
}

namespace {

/// A segment's communicators split from the world, used by one worker.
class CollectiveComm final : public DeviceComm {
public:
    struct Entry {
        CommSplit::Purpose purpose;
        Communicator comm;  // members: transport ranks
    };
    CollectiveComm(CommLibrary& lib, DeviceOps& ops, std::size_t me, std::vector<Entry> comms)
        : lib_(lib), ops_(ops), me_(me), comms_(std::move(comms)), unwinding_(std::uncaught_exceptions()) {
        for (const Entry& e : comms_)
            if (e.purpose == CommSplit::Purpose::tensor_parallel) tp_.emplace(lib_, e.comm);
    }
    ~CollectiveComm() override {
        // Left by an error, transfers may be pending with peers that will not come: abort.
        const bool error = std::uncaught_exceptions() > unwinding_;
        for (Entry& e : comms_) lib_.destroy(e.comm, error);
    }
    CollectiveComm(const CollectiveComm&) = delete;
    CollectiveComm& operator=(const CollectiveComm&) = delete;

    void send(std::size_t dst, const Tag& tag, DeviceBuffer data) override {
        const auto [c, peer] = pair(dst, tag);
        lib_.send(*c, peer, tag, std::move(data), ops_);
    }
    void recv(std::size_t src, const Tag& tag, DeviceSpan into) override {
        const auto [c, peer] = pair(src, tag);
        lib_.recv(*c, peer, tag, into, ops_);
    }
    void allreduce_sum(std::span<const std::size_t> group, const Tag& tag, DeviceSpan data) override {
        lib_.allreduce_sum(data_parallel(group, tag), data, ops_);
    }
    void allgather(std::span<const std::size_t> group, const Tag& tag, DeviceSpan mine, DeviceSpan all) override {
        lib_.allgather(data_parallel(group, tag), mine, all, ops_);
    }
    void reduce_scatter_sum(std::span<const std::size_t> group, const Tag& tag, DeviceSpan data, DeviceSpan out) override {
        lib_.reduce_scatter_sum(data_parallel(group, tag), data, out, ops_);
    }
    DeviceGroup* tensor_parallel() override { return tp_ ? &*tp_ : nullptr; }

private:
    /// The tensor-parallel communicator as a DeviceGroup (on the ops each call passes).
    class Group final : public DeviceGroup {
    public:
        Group(CommLibrary& lib, const Communicator& c) : lib_(lib), c_(c) {}
        void allreduce_sum(DeviceOps& ops, DeviceSpan data) override { lib_.allreduce_sum(c_, data, ops); }
        void allgather(DeviceOps& ops, DeviceSpan mine, DeviceSpan all) override { lib_.allgather(c_, mine, all, ops); }

    private:
        CommLibrary& lib_;
        Communicator c_;
    };

    /// The communicator of the data-parallel group `group`.
    const Communicator& data_parallel(std::span<const std::size_t> group, const Tag& tag) const {
        for (const Entry& e : comms_)
            if (e.purpose == CommSplit::Purpose::data_parallel &&
                std::equal(group.begin(), group.end(), e.comm.members.begin(), e.comm.members.end()))
                return e.comm;
        throw RuntimeError(fmt::format("{}: no device communicator joins this worker's replicas", describe(tag)));
    }

    /// The communicator that carries `tag`'s kind between this worker and `other`, and other's rank in it.
    std::pair<const Communicator*, std::size_t> pair(std::size_t other, const Tag& tag) const {
        CommSplit::Purpose purpose{};
        if (tag.kind == Tag::Kind::activation) purpose = CommSplit::Purpose::activation;
        else if (tag.kind == Tag::Kind::gradient) purpose = CommSplit::Purpose::gradient;
        else throw RuntimeError(fmt::format("{}: device communicators carry activations and gradients only", describe(tag)));
        for (const Entry& e : comms_) {
            if (e.purpose != purpose) continue;
            const auto& m = e.comm.members;
            const auto at = std::find(m.begin(), m.end(), other);
            if (at != m.end() && std::find(m.begin(), m.end(), me_) != m.end())
                return {&e.comm, static_cast<std::size_t>(at - m.begin())};
        }
        throw RuntimeError(fmt::format("{}: no device communicator joins workers {} and {}", describe(tag), me_, other));
    }

    CommLibrary& lib_;
    DeviceOps& ops_;
    std::size_t me_;
    std::vector<Entry> comms_;
    std::optional<Group> tp_;
    int unwinding_;
};

}  // namespace

struct DeviceFabric::Rank {
    std::unique_ptr<CommLibrary> lib;
    Communicator world;
    Transport* net = nullptr;  ///< the transport the library was made for
};

DeviceFabric::DeviceFabric(LibraryFactory make_library) : make_library_(std::move(make_library)) {}

DeviceFabric::~DeviceFabric() {
    // Some members may be gone (a failed device): nothing waits for them.
    for (auto& [r, rank] : ranks_)
        if (rank->world) rank->lib->destroy(rank->world, true);
}

void DeviceFabric::abort_all() noexcept {
    std::lock_guard lock(mutex_);
    for (auto& [r, rank] : ranks_) rank->lib->abort_all();
    aborted_ = true;
}

DeviceFabric::Counts DeviceFabric::counts() const {
    std::lock_guard lock(mutex_);
    return counts_;
}

std::unique_ptr<DeviceComm> DeviceFabric::connect(const CommSetup& setup) {
    if (setup.plan == nullptr || setup.net == nullptr || setup.ops == nullptr)
        throw RuntimeError("connecting a device communicator without a plan, transport or device");
    Transport& net = *setup.net;
    const std::size_t me = setup.transport_ranks.at(setup.worker);
    if (me != net.rank())
        throw RuntimeError(fmt::format("worker {} is transport rank {}, but connects from rank {}", setup.worker, me,
                                       net.rank()));
    Rank* rank = nullptr;
    {
        std::lock_guard lock(mutex_);
        if (aborted_) throw RuntimeError("device communicators: a worker failed, every communicator was aborted");
        auto& slot = ranks_[me];
        if (!slot) {
            slot = std::make_unique<Rank>();
            slot->lib = make_library_(net);
            slot->net = &net;
        }
        if (slot->net != &net)
            throw RuntimeError(fmt::format("device communicators of rank {} were made for another transport", me));
        rank = slot.get();
    }
    try {
        return connect(setup, *rank, me);
    } catch (...) {
        // The world's state is unknown now (a collective call may have run on some members
        // only): drop it, so that the next connect bootstraps a new one.
        if (rank->world) rank->lib->destroy(rank->world, true);
        rank->world = {};
        throw;
    }
}

std::unique_ptr<DeviceComm> DeviceFabric::connect(const CommSetup& setup, Rank& rank_state, std::size_t me) {
    Transport& net = *setup.net;
    Rank* rank = &rank_state;
    CommLibrary& lib = *rank->lib;
    const auto segment = static_cast<std::uint32_t>(setup.segment);

    // The world: the plan's workers in transport-rank order.
    std::vector<std::size_t> wanted = setup.transport_ranks;
    std::sort(wanted.begin(), wanted.end());
    if (std::adjacent_find(wanted.begin(), wanted.end()) != wanted.end())
        throw RuntimeError("two workers of the plan share a transport rank: one device communicator rank each is needed");
    const WorldStep step = world_step(rank->world.members, wanted);
    const std::uint64_t held = step.reuse || step.shrink ? rank->world.id : 0;
    const bool agreed = group_agree(net, wanted, {Tag::Kind::comm, segment, 0, 0}, held) && held != 0;
    Counts done;
    if (agreed && step.shrink) {
        Communicator old = rank->world;
        Communicator shrunk = lib.shrink(old, step.excluded);
        std::vector<std::int64_t> salt{-1};
        for (int e : step.excluded) salt.push_back(e);
        shrunk.id = comm_id(old.id, salt);
        shrunk.members = wanted;
        shrunk.rank = static_cast<std::size_t>(std::find(wanted.begin(), wanted.end(), me) - wanted.begin());
        lib.destroy(old, true);
        rank->world = std::move(shrunk);
        done.shrinks = 1;
    } else if (agreed) {
        done.reuses = 1;
    } else {
        if (rank->world) lib.destroy(rank->world, true);
        rank->world = {};
        const Bytes uid =
            share_from_root(net, wanted, {Tag::Kind::comm, segment, 1, 0}, [&] { return lib.unique_id(); });
        const auto my_rank = static_cast<std::size_t>(std::find(wanted.begin(), wanted.end(), me) - wanted.begin());
        rank->world = lib.init(uid, wanted, my_rank, *setup.ops);
        rank->world.id = comm_id(uid);
        rank->world.members = wanted;
        rank->world.rank = my_rank;
        done.bootstraps = 1;
    }

    // The segment's communicators, split from the world by every member in the same order
    // (aborted if an error stops the splitting half-way).
    std::vector<CollectiveComm::Entry> comms;
    struct Undo {
        CommLibrary& lib;
        std::vector<CollectiveComm::Entry>& comms;
        bool armed = true;
        ~Undo() {
            if (armed)
                for (auto& e : comms) lib.destroy(e.comm, true);
        }
    } undo{lib, comms};
    const std::size_t workers = setup.transport_ranks.size();
    for (const CommSplit& s : comm_splits(comm_groups(*setup.plan), workers)) {
        const int colour = s.colour.at(setup.worker);
        int key = 0;
        std::vector<std::size_t> members;
        if (colour >= 0) {
            const auto& g = s.groups[static_cast<std::size_t>(colour)];
            key = static_cast<int>(std::find(g.begin(), g.end(), setup.worker) - g.begin());
            for (std::size_t w : g) members.push_back(setup.transport_ranks.at(w));
        }
        Communicator c = lib.split(rank->world, colour, key);
        ++done.splits;
        if (colour < 0) continue;
        if (!c) throw RuntimeError(fmt::format("{}: a split gave no communicator to rank {}", lib.name(), me));
        if (!c.members.empty() && c.members != members)
            throw RuntimeError(fmt::format("{}: a split's members differ from the plan's group", lib.name()));
        c.members = std::move(members);
        c.rank = static_cast<std::size_t>(key);
        comms.push_back({s.purpose, std::move(c)});
    }
    {
        std::lock_guard lock(mutex_);
        counts_.bootstraps += done.bootstraps;
        counts_.reuses += done.reuses;
        counts_.shrinks += done.shrinks;
        counts_.splits += done.splits;
    }
    undo.armed = false;
    return std::make_unique<CollectiveComm>(lib, *setup.ops, me, std::move(comms));
}

}  // namespace dpart::rt
