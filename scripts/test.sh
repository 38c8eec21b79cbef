#!/usr/bin/env bash
# Sets up, builds, and runs the whole test suite. Fails when a test fails or when no test ran.
#   scripts/test.sh              the normal build (build/)
#   scripts/test.sh --sanitize   AddressSanitizer + UndefinedBehaviorSanitizer (build-asan/)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
args=()
build=${BUILD_DIR:-$root/build}
if [ "${1:-}" = "--sanitize" ]; then
  build=${BUILD_DIR:-$root/build-asan}
  # Debug keeps assert()s; -O1 makes the instrumented suite about twice as fast as -O0. Without
  # the CUDA part: nvcc's code is not instrumented anyway, and loading cuBLAS, NCCL and cuDNN
  # costs 0.7 s per process under ASan, for every one of the suite's hundreds of dpart runs.
  args+=(-DDPART_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug "-DCMAKE_CXX_FLAGS_DEBUG=-g -O1" -DDPART_BUILD_BENCH=OFF
    -DDPART_WITH_CUDA=OFF)
fi
BUILD_DIR=$build "$root/scripts/build.sh" "${args[@]}"
cd "$build"
# A test with no TIMEOUT of its own is stopped after 900 s: a hang fails, it does not eat CI.
ctest --output-on-failure --no-tests=error --timeout 900 -j "${JOBS:-2}"
