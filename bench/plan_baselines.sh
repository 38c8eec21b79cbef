#!/usr/bin/env bash
# What the optimal plan buys over each baseline strategy, on every bundled model x cluster pair,
# under the same cost model: iteration time of each strategy / the optimal one's.
# Usage: bench/plan_baselines.sh [DPART] [OBJECTIVE] [PLAN FLAGS...]  (e.g. --fused-attention)
set -u
dpart=${1:-build/dpart}
objective=${2:-iteration}
shift $(($# < 2 ? $# : 2))
flags=("$@")
root=$(cd "$(dirname "$0")/.." && pwd)
printf '| model | cluster | optimal ms | stages | uniform | parameters | time | data-parallel |\n'
printf '| --- | --- | --- | --- | --- | --- | --- | --- |\n'
for m in "$root"/plans/models/*.toml; do
    for c in "$root"/plans/clusters/*.toml; do
        out=$("$dpart" plan "$m" -c "$c" --compare --objective "$objective" ${flags[@]+"${flags[@]}"} 2>&1)
        rc=$?
        name="| $(basename "$m" .toml) | $(basename "$c" .toml) |"
        if [ "$rc" -eq 3 ]; then printf '%s no plan fits | | | | | |\n' "$name"; continue; fi
        if [ "$rc" -ne 0 ]; then printf '%s error %s | | | | | |\n' "$name" "$rc"; continue; fi
        echo "$out" | awk -v name="$name" '
            /^optimal / && NF >= 5 { opt = $3; stages = $2 }
            /^(uniform|parameters|time|data-parallel) / { r[$1] = ($3 == "does" ? "does not fit" : $5) }
            END { printf "%s %s | %s | %s | %s | %s | %s |\n", name, opt, stages, r["uniform"], r["parameters"], r["time"], r["data-parallel"] }'
    done
done
