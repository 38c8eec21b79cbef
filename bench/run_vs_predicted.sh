#!/usr/bin/env bash
# Measured vs predicted iteration time of `dpart run` on this machine's CPU workers. First
# measures the machine (`dpart profile`, so the prediction uses measured figures, not guesses),
# then plans and runs each case and prints a Markdown table. Run it on a quiet machine: the
# workers own the cores.
# With LAYERS = layers, each case also times the model's layers (`dpart profile --model`) and the
# plan and its prediction use those measured layer times (`--layer-times`) instead of the roofline.
# Usage: bench/run_vs_predicted.sh [DPART] [ITERATIONS] [roofline|layers]
set -eu
dpart=${1:-build/dpart}
iterations=${2:-20}
costs=${3:-roofline}
root=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# Each case is profiled right before it runs: on a shared virtual machine the cores' speed
# changes from minute to minute, and a prediction is only as good as figures of the same moment.
printf '| model | plan | stages x tp | microbatches | GEMM GFLOP/s per core | predicted ms | measured mean ms | p50 ms | error (mean) | error (p50) |\n'
printf '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n'
case_row() {  # case_row MODEL LABEL PLAN_FLAGS...
    local model=$1 label=$2
    shift 2
    "$dpart" profile --repeats 3 --name cpu-local --out "$tmp/cluster.toml" >"$tmp/profile.txt"
    local gflops
    gflops=$(sed -n 's/.*gflops_per_core_all_busy \([0-9.]*\).*/\1/p' "$tmp/profile.txt")
    local measured=()
    if [ "$costs" = layers ]; then
        "$dpart" profile --model "$root/plans/models/$model.toml" --layer-times "$tmp/layers.csv" --repeats 3 >/dev/null
        measured=(--layer-times "$tmp/layers.csv")
    fi
    "$dpart" plan "$root/plans/models/$model.toml" -c "$tmp/cluster.toml" -q --out "$tmp/plan.toml" "${measured[@]}" "$@"
    "$dpart" run "$tmp/plan.toml" -m "$root/plans/models/$model.toml" -c "$tmp/cluster.toml" "${measured[@]}" \
        --iterations "$iterations" --out-dir "$tmp/run" >/dev/null
    local shape
    shape="$(grep -c '^\[\[stage\]\]' "$tmp/plan.toml") x $(sed -n 's/^tp = //p' "$tmp/plan.toml" | sort -n | tail -1)"
    awk -v model="$model" -v label="$label" -v shape="$shape" -v g="$gflops" -v m="$(sed -n 's/^microbatches = //p' "$tmp/plan.toml")" '
        /^mean_iteration_ms/ { mean = $3 } /^p50_iteration_ms/ { p50 = $3 } /^predicted_iteration_ms/ { pred = $3 }
        END { printf "| %s | %s | %s | %s | %s | %.4g | %.4g | %.4g | %+.1f%% | %+.1f%% |\n", model, label, shape, m, g, pred, mean, p50,
              (mean - pred) / pred * 100, (p50 - pred) / pred * 100 }' "$tmp/run/summary.toml"
}
case_row cpu-mlp "pipeline, 2 microbatches" --max-tp 1 --max-replicas 1 --microbatches 2
case_row cpu-mlp "pipeline, 4 microbatches" --max-tp 1 --max-replicas 1 --microbatches 4
case_row cpu-mlp "pipeline, 8 microbatches" --max-tp 1 --max-replicas 1 --microbatches 8
case_row cpu-mlp "data parallel, 1 microbatch" --strategy data-parallel --max-tp 1 --microbatches 1
case_row cpu-mlp "one stage on both cores, the planner's split" --strategy data-parallel --microbatches 1
case_row cpu-mlp "optimal (planner's microbatching)"
case_row tiny-gpt "optimal (planner's microbatching)"
case_row seed-mlp "optimal (planner's microbatching)"
