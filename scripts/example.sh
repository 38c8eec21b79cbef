#!/usr/bin/env bash
# Sets up, builds, and runs dpart's main job on a bundled example: the best partition of
# Llama-3-8B across a cluster of H100, A100 and L40S GPUs, compared with the baseline strategies.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
"$root/scripts/build.sh"
build=${BUILD_DIR:-$root/build}
"$build/dpart" plan "$root/plans/models/llama3-8b.toml" --cluster "$root/plans/clusters/hetero-3kinds.toml" --compare \
    --fused-attention --vocab-parallel
