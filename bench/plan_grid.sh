#!/usr/bin/env bash
# The planner's speed over layers x devices (BM_PlanGrid in bench_plan.cpp: Llama-3-8B-sized
# blocks, half H100 / half A100 nodes of 8, microbatch size 8, iteration objective), one case
# at a time with a time limit, printed as a Markdown table of milliseconds.
# Usage: bench/plan_grid.sh [BUILD_DIR] [LIMIT_SECONDS]
set -u
build=${1:-build}
limit=${2:-120}
bench="$build/bench/dpart_bench_plan"
devices=(8 64 512 1024 4096)
printf '| blocks \\ devices |'; for d in "${devices[@]}"; do printf ' %s |' "$d"; done; printf '\n'
printf '| --- |'; for _ in "${devices[@]}"; do printf ' --- |'; done; printf '\n'
for layers in 32 80 256 1024; do
    printf '| %s |' "$layers"
    for d in "${devices[@]}"; do
        csv=$(timeout "$limit" "$bench" --benchmark_filter="^BM_PlanGrid/$layers/$d/" --benchmark_format=csv 2>/dev/null)
        rc=$?
        out=$(echo "$csv" | awk -F, '/BM_PlanGrid/ && $9 != "true" { printf "%.1f", $3 }')
        if [ -n "$out" ]; then printf ' %s |' "$out"
        elif echo "$csv" | grep -q infeasible; then printf ' infeasible |'
        elif [ "$rc" -eq 124 ]; then printf ' > %s s |' "$limit"
        else printf ' error |'; fi
    done
    printf '\n'
done
