#!/usr/bin/env bash
# Configures and builds dpart in ${BUILD_DIR:-build} with -j2. Extra arguments go to cmake,
# e.g. scripts/build.sh -DDPART_WITH_CUDA=OFF
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-$root/build}
cmake -S "$root" -B "$build" "$@" >/dev/null
cmake --build "$build" -j "${JOBS:-2}"
