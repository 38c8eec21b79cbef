#pragma once
// The device backend of `dpart run`: each worker's stage computed by the device layers on its
// own DeviceOps (a GPU or a green-context partition of one through CUDA; the host DeviceOps in
// tests), plugged into the executor as RunOptions::backend.
#include <functional>
#include <memory>

#include "dpart/runtime/device.hpp"
#include "dpart/runtime/stage_compute.hpp"

namespace dpart::rt {

/// A StageFactory whose stages compute in `compute` (f32 or bf16) on the DeviceOps that
/// `make_ops` returns for the worker's place (called on the worker's thread). A stage with
/// tp > 1 holds its rank's shard of the split layers, as the CPU stage does.
[[nodiscard]] StageFactory make_device_stage_factory(
    std::function<std::unique_ptr<DeviceOps>(const WorkerPlace&)> make_ops, Elem compute);

}  // namespace dpart::rt
