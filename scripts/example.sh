#!/usr/bin/env bash
# Sets up, builds, and runs dpart's main job on a bundled example: what every layer of GPT-2
# small costs, and the cluster it could run on.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
"$root/scripts/build.sh"
build=${BUILD_DIR:-$root/build}
"$build/dpart" inspect "$root/plans/models/gpt2-small.toml" --cluster "$root/plans/clusters/dgx-h100.toml"
