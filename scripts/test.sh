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
  args+=(-DDPART_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug -DDPART_BUILD_BENCH=OFF)
fi
BUILD_DIR=$build "$root/scripts/build.sh" "${args[@]}"
cd "$build"
ctest --output-on-failure --no-tests=error -j "${JOBS:-2}"
