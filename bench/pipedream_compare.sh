#!/usr/bin/env bash
# PipeDream's planner and dpart's own on PipeDream's published profiles, side by side, as a
# Markdown table (docs/METHOD.md, "What dpart's cost model changes").
#   PipeDream: plans/pipedream/<model>.toml, --cost-model pipedream, N workers at 1e9 bytes/s.
#   dpart: the same profile imported with --batch 128 (the minibatch its sizes imply), on a cluster
#   of N identical workers (one per node, 1 GB/s, 0 us, 16 GiB: PipeDream's defaults), whose
#   TFLOP/s equal the reference's so that the measured times are used as they are.
# Usage: bench/pipedream_compare.sh [BUILD_DIR] [PROFILES_DIR]
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build}
profiles=${2:-$root/../shared/data/pipedream}
dpart="$build/dpart"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# "layers x replicas" of a plan.toml's stages: 0-16x3 17-39x1
stages() {
    awk -F' = ' '/^first_layer/ { split($2, a, " "); f = a[1] } /^last_layer/ { split($2, a, " "); l = a[1] }
                 /^replicas/ { printf "%s%s-%sx%s", sep, f, l, $2; sep = ", " }' "$1"
}
value() { awk -F' = ' -v k="$2" '$1 == k { print $2; exit }' "$1"; }

printf '| profile | workers | PipeDream: stages (layers x replicas) | PipeDream ms per minibatch | dpart throughput: stages, microbatch | dpart steady-state ms per 128 samples | dpart iteration: stages, microbatch | dpart iteration ms (128 samples) |\n'
printf '| --- | --- | --- | --- | --- | --- | --- | --- |\n'
for model in vgg16 resnet50; do
    "$dpart" import pipedream "$profiles/${model}_graph.txt" --name "$model" --batch 128 --tflops 15.7 \
        -o "$tmp/$model.toml" >/dev/null
    for n in 4 8 16; do
        cat >"$tmp/w$n.toml" <<TOML
[cluster]
name = "workers-$n"
[network]
inter_node_gbs = 1.0
inter_node_latency_us = 0.0
[[device_group]]
nodes = $n
devices_per_node = 1
node_prefix = "w"
kind = "PipeDream worker"
tflops = 15.7
mem_gib = 16.0
mem_bw_gbs = 900.0
TOML
        "$dpart" plan "$root/plans/pipedream/$model.toml" --cost-model pipedream --workers "$n" --bandwidth-bytes 1e9 \
            -q --out "$tmp/pd.toml"
        "$dpart" plan "$tmp/$model.toml" -c "$tmp/w$n.toml" --objective throughput -q --out "$tmp/tp.toml"
        "$dpart" plan "$tmp/$model.toml" -c "$tmp/w$n.toml" --objective iteration -q --out "$tmp/it.toml"
        tp_mb=$(value "$tmp/tp.toml" microbatch_size)
        tp_ms=$(awk -v b="$(value "$tmp/tp.toml" predicted_bottleneck_ms)" -v m="$tp_mb" 'BEGIN { printf "%.1f", b * 128 / m }')
        printf '| %s | %s | %s | %.1f | %s; %s | %s | %s; %s | %.1f |\n' "$model" "$n" "$(stages "$tmp/pd.toml")" \
            "$(value "$tmp/pd.toml" predicted_bottleneck_ms)" "$(stages "$tmp/tp.toml")" "$tp_mb" "$tp_ms" \
            "$(stages "$tmp/it.toml")" "$(value "$tmp/it.toml" microbatch_size)" \
            "$(value "$tmp/it.toml" predicted_iteration_ms)"
    done
done
