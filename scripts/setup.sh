#!/usr/bin/env bash
# Installs the Debian packages dpart needs to build and test. Skips apt entirely when all
# are present. CUDA, NCCL and cuDNN are optional and not installed here. clang and its runtime
# (libFuzzer, the sanitizers) build the fuzz harnesses (scripts/fuzz.sh).
set -euo pipefail
packages=(
  build-essential cmake git
  libcli11-dev libfmt-dev libtomlplusplus-dev nlohmann-json3-dev doctest-dev libbenchmark-dev
  libopenmpi-dev openmpi-bin
  libopenblas-dev
  python3 python3-matplotlib python3-torch
  clang libclang-rt-14-dev
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} packages present"
  exit 0
fi
echo "setup: installing ${missing[*]}"
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
