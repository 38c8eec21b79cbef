// Device communicators without a GPU: the split plan, the world's reuse and shrink, the
// bootstrap over a transport, and the host stand-in's NCCL semantics (messages matched in the
// order they are posted, sums in group order).
#include <doctest/doctest.h>

#include <algorithm>
#include <thread>

#include "dpart/runtime/comm_groups.hpp"
#include "dpart/runtime/device_comm.hpp"
#include "dpart/runtime/executor.hpp"

using namespace dpart;
using namespace dpart::rt;

namespace {

Plan plan_of(const std::vector<std::vector<std::size_t>>& devices) {
    Plan p;
    p.microbatches = 2;
    p.microbatch_size = 4;
    for (std::size_t s = 0; s < devices.size(); ++s) {
        Stage st;
        st.first_layer = s;
        st.last_layer = s;
        st.devices = devices[s];
        p.stages.push_back(st);
    }
    return p;
}

/// Runs body(rank) on `n` threads over one in-process network.
template <class F>
void on_ranks(InProcessNetwork& net, std::size_t n, F&& body) {
    std::vector<std::exception_ptr> errors(n);
    {
        std::vector<std::jthread> threads;
        for (std::size_t r = 0; r < n; ++r)
            threads.emplace_back([&, r] {
                try {
                    body(r, net.endpoint(r));
                } catch (...) {
                    errors[r] = std::current_exception();
                    net.endpoint(r).abort("a rank failed");
                }
            });
    }
    // The error that stopped the others first (not a PeerStopped it caused), as run_on_threads.
    for (const auto& e : errors) {
        if (!e) continue;
        try {
            std::rethrow_exception(e);
        } catch (const PeerStopped&) {
            continue;
        } catch (...) {
            throw;
        }
    }
    for (const auto& e : errors)
        if (e) std::rethrow_exception(e);
}

std::vector<float> values_of(DeviceOps& ops, const DeviceSpan& s) {
    std::vector<float> v(s.count);
    ops.download(s, v);
    return v;
}

}  // namespace

TEST_CASE("comm_splits: neighbouring pairs alternate between two calls, per direction; replicas in one") {
    // Stages of 1, 2 and 1 workers (ranks 0 | 1 2 | 3), then a fourth stage of one (rank 4).
    const Plan plan = plan_of({{0}, {1, 2}, {3}, {4}});
    const std::vector<CommSplit> splits = comm_splits(comm_groups(plan), 5);
    REQUIRE(splits.size() == 5);
    CHECK(splits[0].purpose == CommSplit::Purpose::activation);
    CHECK(splits[1].purpose == CommSplit::Purpose::activation);
    CHECK(splits[2].purpose == CommSplit::Purpose::gradient);
    CHECK(splits[3].purpose == CommSplit::Purpose::gradient);
    CHECK(splits[4].purpose == CommSplit::Purpose::data_parallel);
    // Even pairs: (stage 0, 1) and (2, 3); odd: (1, 2). A middle stage is in one group per call.
    CHECK(splits[0].groups == std::vector<std::vector<std::size_t>>{{0, 1, 2}, {3, 4}});
    CHECK(splits[0].colour == std::vector<int>{0, 0, 0, 1, 1});
    CHECK(splits[1].groups == std::vector<std::vector<std::size_t>>{{1, 2, 3}});
    CHECK(splits[1].colour == std::vector<int>{-1, 0, 0, 0, -1});
    CHECK(splits[2].colour == splits[0].colour);
    CHECK(splits[4].groups == std::vector<std::vector<std::size_t>>{{1, 2}});
    CHECK(splits[4].colour == std::vector<int>{-1, 0, 0, -1, -1});
    // Tensor-parallel groups: one more call, each group its colour.
    Plan tp = plan_of({{0, 1, 2, 3}, {4}});
    tp.stages[0].tp = 2;  // two replicas of two ranks: ranks (0, 1) and (2, 3)
    const std::vector<CommSplit> with_tp = comm_splits(comm_groups(tp), 5);
    REQUIRE(with_tp.size() == 4);
    CHECK(with_tp[3].purpose == CommSplit::Purpose::tensor_parallel);
    CHECK(with_tp[3].groups == std::vector<std::vector<std::size_t>>{{0, 1}, {2, 3}});
    CHECK(with_tp[2].groups == std::vector<std::vector<std::size_t>>{{0, 2}, {1, 3}});  // replicas per tp rank
    // One stage, one worker: nothing to split.
    CHECK(comm_splits(comm_groups(plan_of({{0}})), 1).empty());
    // Two stages: one call per direction.
    CHECK(comm_splits(comm_groups(plan_of({{0}, {1}})), 2).size() == 2);
}

TEST_CASE("world_step: reuse the same members, shrink around those gone, bootstrap for a newcomer") {
    const std::vector<std::size_t> held{0, 1, 2, 3};
    CHECK(world_step(held, std::vector<std::size_t>{0, 1, 2, 3}).reuse);
    const WorldStep s = world_step(held, std::vector<std::size_t>{0, 1, 3});
    CHECK(s.shrink);
    CHECK(s.excluded == std::vector<int>{2});
    CHECK(world_step(held, std::vector<std::size_t>{1}).excluded == std::vector<int>{0, 2, 3});
    const WorldStep fresh = world_step(held, std::vector<std::size_t>{0, 1, 4});
    CHECK_FALSE(fresh.reuse);
    CHECK_FALSE(fresh.shrink);
    CHECK_FALSE(world_step({}, std::vector<std::size_t>{0}).reuse);
}

TEST_CASE("group_agree: every member learns whether all gave the same value") {
    InProcessNetwork net(3, std::chrono::milliseconds(5000));
    for (const bool differ : {false, true}) {
        std::vector<int> got(3, -1);
        on_ranks(net, 3, [&](std::size_t r, Transport& t) {
            const std::vector<std::size_t> group{0, 1, 2};
            const std::uint64_t mine = differ && r == 2 ? 8 : 7;
            got[r] = group_agree(t, group, {Tag::Kind::comm, differ ? 1u : 0u, 0, 0}, mine) ? 1 : 0;
        });
        CHECK(got == std::vector<int>(3, differ ? 0 : 1));
    }
}

TEST_CASE("device fabric: bootstrap once, reuse, shrink around a rank that left, bootstrap again for a newcomer") {
    // Four ranks; each segment's plan is a pipeline over some of them.
    InProcessNetwork net(4, std::chrono::milliseconds(10000));
    DeviceFabric fabric([](Transport& t) { return make_host_comm_library(t); });
    std::vector<std::unique_ptr<DeviceOps>> ops;
    for (int r = 0; r < 4; ++r) ops.push_back(make_host_ops());

    // One segment: every worker of `plan` (worker w on transport rank ranks[w]) connects; stage s
    // sends its rank number (as 3 values) to stage s + 1, which checks it; replicas all-reduce.
    const auto segment = [&](const Plan& plan, const std::vector<std::size_t>& ranks, std::uint64_t first) {
        on_ranks(net, 4, [&](std::size_t r, Transport& t) {
            const auto at = std::find(ranks.begin(), ranks.end(), r);
            if (at == ranks.end()) return;  // not in this plan
            const auto w = static_cast<std::size_t>(at - ranks.begin());
            CommSetup cs{&plan, w, ranks, first, &t, ops[r].get()};
            const std::unique_ptr<DeviceComm> comm = fabric.connect(cs);
            const std::vector<WorkerPlace> places = worker_places(plan);
            const WorkerPlace p = places[w];
            DeviceOps& o = *ops[r];
            if (p.stage + 1 < plan.stages.size())
                for (std::size_t d = 0; d < plan.stages[p.stage + 1].devices.size(); ++d) {
                    DeviceBuffer b(o, 3, Elem::f32);
                    o.fill(b.span(), static_cast<float>(r));
                    std::size_t next = 0;
                    for (std::size_t k = 0; k < places.size(); ++k)
                        if (places[k].stage == p.stage + 1 && places[k].replica == d) next = ranks[k];
                    comm->send(next, {Tag::Kind::activation, 0, static_cast<std::uint32_t>(d), 0}, std::move(b));
                }
            if (p.stage > 0)
                for (std::size_t k = 0; k < places.size(); ++k) {
                    if (places[k].stage != p.stage - 1) continue;
                    DeviceBuffer b(o, 3, Elem::f32);
                    comm->recv(ranks[k], {Tag::Kind::activation, 0, static_cast<std::uint32_t>(p.replica), 0}, b.span());
                    CHECK(values_of(o, b.span()) == std::vector<float>(3, static_cast<float>(ranks[k])));
                }
            if (plan.stages[p.stage].devices.size() > 1) {
                std::vector<std::size_t> group;
                for (std::size_t k = 0; k < places.size(); ++k)
                    if (places[k].stage == p.stage) group.push_back(ranks[k]);
                DeviceBuffer b(o, 5, Elem::f32);
                o.fill(b.span(), static_cast<float>(r + 1));
                comm->allreduce_sum(group, {Tag::Kind::allreduce, 0, 0, 0}, b.span());
                float sum = 0;
                for (std::size_t g : group) sum += static_cast<float>(g + 1);
                CHECK(values_of(o, b.span()) == std::vector<float>(5, sum));
            }
        });
    };
    segment(plan_of({{0}, {1, 2}, {3}}), {0, 1, 2, 3}, 0);
    CHECK(fabric.counts().bootstraps == 4);
    CHECK(fabric.counts().splits == 4 * 5);  // 4 ranks x (2 pairs x 2 directions + the replicas)
    segment(plan_of({{0, 1}, {2}, {3}}), {0, 1, 2, 3}, 3);  // the same ranks, another layout
    CHECK(fabric.counts().reuses == 4);
    CHECK(fabric.counts().bootstraps == 4);
    segment(plan_of({{0}, {1}, {2}}), {3, 0, 1}, 6);  // rank 2 left: the others shrink
    CHECK(fabric.counts().shrinks == 3);
    CHECK(fabric.counts().bootstraps == 4);
    segment(plan_of({{0}, {1}}), {2, 0}, 9);  // rank 2 is back: a new world for it and rank 0
    CHECK(fabric.counts().bootstraps == 6);
}

TEST_CASE("the host stand-in delivers in the order posted and refuses a message the receiver did not post") {
    InProcessNetwork net(2, std::chrono::milliseconds(5000));
    DeviceFabric fabric([](Transport& t) { return make_host_comm_library(t); });
    const Plan plan = plan_of({{0}, {1}});
    const std::vector<std::size_t> ranks{0, 1};
    CHECK_THROWS_WITH_AS(on_ranks(net, 2,
                                  [&](std::size_t r, Transport& t) {
                                      const auto ops = make_host_ops();
                                      const auto comm = fabric.connect({&plan, r, ranks, 0, &t, ops.get()});
                                      if (r == 0) {
                                          for (std::uint32_t mb : {1u, 0u})
                                              comm->send(1, {Tag::Kind::activation, 0, mb, 0}, DeviceBuffer(*ops, 2, Elem::f32));
                                      } else {
                                          DeviceBuffer b(*ops, 2, Elem::f32);
                                          comm->recv(0, {Tag::Kind::activation, 0, 0, 0}, b.span());
                                      }
                                  }),
                         doctest::Contains("is activations of microbatch 1 at iteration 0, but the receiver posted "
                                           "activations of microbatch 0"),
                         RuntimeError);
    // A buffer of the wrong size is refused too, as is a kind no communicator carries.
    InProcessNetwork net2(2, std::chrono::milliseconds(5000));
    DeviceFabric fabric2([](Transport& t) { return make_host_comm_library(t); });
    CHECK_THROWS_WITH_AS(on_ranks(net2, 2,
                                  [&](std::size_t r, Transport& t) {
                                      const auto ops = make_host_ops();
                                      const auto comm = fabric2.connect({&plan, r, ranks, 0, &t, ops.get()});
                                      if (r == 0) {
                                          comm->send(1, {Tag::Kind::gradient, 0, 0, 0}, DeviceBuffer(*ops, 3, Elem::f32));
                                      } else {
                                          DeviceBuffer b(*ops, 2, Elem::f32);
                                          comm->recv(0, {Tag::Kind::gradient, 0, 0, 0}, b.span());
                                      }
                                  }),
                         doctest::Contains("3 f32 values sent into a buffer of 2 f32"), RuntimeError);
    InProcessNetwork net3(2, std::chrono::milliseconds(5000));
    DeviceFabric fabric3([](Transport& t) { return make_host_comm_library(t); });
    CHECK_THROWS_WITH_AS(on_ranks(net3, 2,
                                  [&](std::size_t r, Transport& t) {
                                      const auto ops = make_host_ops();
                                      const auto comm = fabric3.connect({&plan, r, ranks, 0, &t, ops.get()});
                                      if (r == 0) comm->send(1, {Tag::Kind::tied, 0, 0, 0}, DeviceBuffer(*ops, 1, Elem::f32));
                                  }),
                         doctest::Contains("carry activations and gradients only"), RuntimeError);
}
