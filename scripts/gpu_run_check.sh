#!/usr/bin/env bash
# The GPU checks of the CUDA backend of `dpart run` (issue 8), on the H100 machine
# (../shared/DEVICE.md). scripts/gpu_check.sh runs it after the profile checks; alone:
#
#   scripts/gpu_run_check.sh [DPART] [GPU_TESTS]   default .devbin/dpart, .devbin/dpart_gpu_tests
#
# Everything it writes is under $OUT. Steps, each bounded by a timeout:
#   1. dpart_gpu_tests: every CUDA kernel and cuBLAS product against a host reference, the conv2d
#      layer through cuDNN against the host's im2col path, and what one GPU can run of NCCL (a
#      one-rank world, a split, an all-reduce, the fabric's reuse).
#   2. Correctness of the backend: tiny-gpt, resnet-block and tiny-mixtral (mixtures of experts:
#      the gathers, the routing on the host) trained 6 steps with --backend cuda
#      (fp32, then bf16) against the CPU backend: the loss at every step within 1e-4 (fp32) and
#      2e-2 (bf16).
#   2b. Tensor parallelism: tiny-gpt as one stage of tp 2 on partitions p0 and p1 (split layers,
#      their sums through the host) against the CPU backend: final loss within 1e-4.
#   2c. ZeRO-1: tiny-gpt (its tie summed through the host) and cpu-mlp (summed in place on the
#      device, each partition reading the other's arrays) in two replicas on partitions p0 and p1
#      with and without --shard-optimizer: the same weights digest; device memory vs the plan.
#   3. One training step of GPT-2 small (batch 8, sequence 1024, bf16) and of the wide MLP
#      (4 x 8192, batch 8192, bf16): dpart's p50 step against PyTorch eager's on the same shapes
#      (bench/torch_step.py; fp32 master weights, Adam, bf16 products). Target: dpart <= 1.1x.
#   4. A 4-stage pipeline of GPT-2 small (batch 8) on four 32-SM green-context partitions of the
#      GPU (plans/clusters/h100-4partitions.toml): measured iteration vs predicted, from the
#      roofline and from layer times measured on a partition; target 10% for the latter.
#   5. Shrinking a partition mid-run (a scenario slows p1 2x: its green context is re-cut to 16
#      SMs) with --adaptive: throughput after recovery vs a fresh plan for the shrunk layout
#      (target >= 0.9); a tiny-gpt adaptive run's losses vs the CPU backend's (bf16 tolerance).
# Exit code: 0 when every step that ran met its target, 1 otherwise.
set -u -o pipefail
cd "$(dirname "$0")/.."
DPART=${1:-.devbin/dpart}
TESTS=${2:-.devbin/dpart_gpu_tests}
OUT=${OUT:-/tmp/dpart-gpu-check}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$PWD/.devbin/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
PY=${PYTHON:-python3}
BACKEND=${BACKEND:-cuda}  # host-device: a dry run of the script's plumbing without a GPU (slow for GPT-2)
status=0
log="$OUT/gpu_run_check.log"
: >"$log"
say() { echo "$@" | tee -a "$log"; }
step() { say; say "== $* =="; }
run() {  # run SECONDS NAME COMMAND...: logs the command, its output and its exit code
    local limit=$1 name=$2
    shift 2
    say "\$ $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.out" 2>&1
    local rc=$?
    tee -a "$log" <"$OUT/$name.out" | tail -n 25
    say "[$name: exit $rc in $((SECONDS - start)) s]"
    return $rc
}
summary_value() {  # summary_value FILE KEY: a number, or a string without its quotes
    sed -n "s/^$2 = \"\{0,1\}\([^\" ]*\).*/\1/p" "$1" | head -1
}

step "1. CUDA kernels and cuBLAS products (dpart_gpu_tests)"
run 180 gpu_tests "$TESTS" || status=1

step "2. the CUDA backend trains tiny-gpt, resnet-block (conv2d, pooling) and tiny-mixtral as the CPU backend does"
for model in tiny-gpt resnet-block tiny-mixtral; do
    "$DPART" plan "plans/models/$model.toml" -c plans/clusters/h100x1.toml -q --out "$OUT/$model.toml" >/dev/null 2>&1
    for b in "cpu" "$BACKEND --precision fp32" "$BACKEND --precision bf16"; do
        name="$model-$(echo "$b" | tr ' ' '-' | tr -d '-' )"
        # shellcheck disable=SC2086
        run 180 "$name" "$DPART" run "$OUT/$model.toml" -m "plans/models/$model.toml" -c plans/clusters/h100x1.toml \
            -n 6 --backend $b --out-dir "$OUT/$name" || status=1
    done
    "$PY" - "$OUT" "$(echo "$BACKEND" | tr -d '-')" "$model" <<'EOF' 2>&1 | tee -a "$log" || status=1
import sys, re
out, backend, model = sys.argv[1], sys.argv[2], sys.argv[3]
def losses(name):
    text = open(f"{out}/{name}/summary.toml").read()
    return [float(x) for x in re.search(r"^loss = \[([^\]]*)\]", text, re.M).group(1).split(",") if x.strip()]
try:
    cpu = losses(f"{model}-cpu")
    ok = True
    for name, tol in ((f"{model}-{backend}precisionfp32", 1e-4), (f"{model}-{backend}precisionbf16", 2e-2)):
        got = losses(name)
        worst = max(abs(a - b) / abs(b) for a, b in zip(got, cpu))
        passed = len(got) == len(cpu) and worst <= tol
        ok &= passed
        print(f"{name}: losses {['%.6f' % x for x in got]} vs cpu {['%.6f' % x for x in cpu]}: "
              f"worst relative difference {worst:.2e} (tolerance {tol:g}) {'ok' if passed else 'FAIL'}")
    sys.exit(0 if ok else 1)
except Exception as e:
    print(f"FAIL: could not compare the losses: {e}")
    sys.exit(1)
EOF
done

step "2b. tensor parallelism on two partitions (tp 2: split layers, sums through the host) as the CPU backend"
# The whole model as one stage on partitions p0 and p1 (step 2's single-GPU plan gives its last layer).
last=$(sed -n 's/^last_layer = \([0-9]*\).*/\1/p' "$OUT/tiny-gpt.toml" | tail -1)
printf '[plan]\nobjective = "iteration"\nschedule = "1f1b"\nmicrobatches = 2\nmicrobatch_size = 4\n\n[[stage]]\nfirst_layer = 0\nlast_layer = %s\ndevices = ["p0", "p1"]\ntp = 2\n' \
    "$last" >"$OUT/tp2.toml"
for b in cpu "$BACKEND --precision fp32"; do
    name="tp2-$(echo "$b" | tr ' ' '-' | tr -d '-')"
    # shellcheck disable=SC2086
    run 180 "$name" "$DPART" run "$OUT/tp2.toml" -m plans/models/tiny-gpt.toml -c plans/clusters/h100-4partitions.toml \
        -n 6 --backend $b --out-dir "$OUT/$name" || status=1
done
a=$(summary_value "$OUT/tp2-cpu/summary.toml" final_loss)
b=$(summary_value "$OUT/tp2-$(echo "$BACKEND" | tr -d '-')precisionfp32/summary.toml" final_loss)
if awk -v a="$a" -v b="$b" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(a != "" && d <= 1e-4 * a) }'; then
    say "tp 2 on two partitions: final loss $b vs the CPU's $a: ok"
else
    say "tp 2 on two partitions: final loss '$b' vs the CPU's '$a': FAIL"
    status=1
fi

step "2c. two replicas on two partitions, whole and ZeRO-1 (sharing the GPU's memory: sums and gathers on the device)"
# tiny-gpt's tie sends its sums through the host; cpu-mlp (no tie) sums in place on the device,
# each partition reading the other's gradients and master weights. Whole and sharded give the
# same weights (the same sums, in replica order); its device memory is reported against the plan.
for model in tiny-gpt cpu-mlp; do
    if [ "$model" = tiny-gpt ]; then last_m=$last mb='microbatches = 2\nmicrobatch_size = 4'; else last_m=9 mb='microbatches = 4\nmicrobatch_size = 128'; fi
    printf "[plan]\nobjective = \"iteration\"\nschedule = \"1f1b\"\n$mb\n\n[[stage]]\nfirst_layer = 0\nlast_layer = %s\ndevices = [\"p0\", \"p1\"]\ntp = 1\n" \
        "$last_m" >"$OUT/dp2-$model.toml"
    for z in whole sharded; do
        flag=""
        [ "$z" = sharded ] && flag=--shard-optimizer
        # shellcheck disable=SC2086
        run 180 "dp2-$model-$z" "$DPART" run "$OUT/dp2-$model.toml" -m "plans/models/$model.toml" \
            -c plans/clusters/h100-4partitions.toml -n 6 --backend $BACKEND --precision fp32 $flag \
            --out-dir "$OUT/dp2-$model-$z" || status=1
        say "$model $z: device memory peak $(summary_value "$OUT/dp2-$model-$z/summary.toml" peak_bytes | tr -d '[]') B, planned $(summary_value "$OUT/dp2-$model-$z/summary.toml" predicted_bytes | tr -d '[]') B"
    done
    a=$(summary_value "$OUT/dp2-$model-whole/summary.toml" weights_digest)
    b=$(summary_value "$OUT/dp2-$model-sharded/summary.toml" weights_digest)
    if [ -n "$a" ] && [ "$a" = "$b" ]; then
        say "$model, ZeRO-1 on two partitions: weights digest $b, as without it: ok"
    else
        say "$model, ZeRO-1 on two partitions: weights digest '$b' vs '$a' without it: FAIL"
        status=1
    fi
done

step "3. one training step: dpart --backend cuda vs PyTorch eager, same shapes"
sed 's/^global_batch = 512/global_batch = 8/' plans/models/gpt2-small.toml >"$OUT/gpt2-small-b8.toml"
"$DPART" plan "$OUT/gpt2-small-b8.toml" -c plans/clusters/h100x1.toml --microbatches 1 -q --out "$OUT/gpt2-1gpu.toml" >/dev/null 2>&1
run 240 gpt2-step "$DPART" run "$OUT/gpt2-1gpu.toml" -m "$OUT/gpt2-small-b8.toml" -c plans/clusters/h100x1.toml \
    --backend "$BACKEND" -n 12 --out-dir "$OUT/run-gpt2" || status=1
"$DPART" plan plans/models/wide-mlp.toml -c plans/clusters/h100x1.toml --microbatches 1 -q --out "$OUT/mlp-1gpu.toml" >/dev/null 2>&1
run 240 mlp-step "$DPART" run "$OUT/mlp-1gpu.toml" -m plans/models/wide-mlp.toml -c plans/clusters/h100x1.toml \
    --backend "$BACKEND" -n 12 --out-dir "$OUT/run-mlp" || status=1
run 300 torch-step "$PY" bench/torch_step.py all --steps 10 || status=1
grep -E '^(case|gpt2|wide)' "$OUT/torch-step.out" >"$OUT/torch_step.csv"
"$PY" - "$OUT" <<'EOF' 2>&1 | tee -a "$log" || status=1
import csv, sys, re
out = sys.argv[1]
def p50(run):
    try:
        return float(re.search(r"^p50_iteration_ms = ([0-9.e+-]+)", open(f"{out}/{run}/summary.toml").read(), re.M).group(1))
    except Exception:
        return None
torch = {(r["case"], r["variant"]): float(r["median_ms"]) for r in csv.DictReader(open(f"{out}/torch_step.csv"))}
rows = [("GPT-2 small, batch 8, seq 1024, bf16", p50("run-gpt2"), torch.get(("gpt2-small b8 s1024", "sdpa")),
         torch.get(("gpt2-small b8 s1024", "unfused"))),
        ("wide MLP 4 x 8192, batch 8192, bf16", p50("run-mlp"), torch.get(("wide-mlp 4x8192 b8192", "eager")), None)]
ok = True
lines = ["case,dpart_p50_ms,torch_eager_ms,ratio,torch_unfused_attention_ms,ratio_unfused,pass"]
for name, mine, ref, unfused in rows:
    if mine is None or ref is None:
        print(f"{name}: FAIL (missing: dpart {mine}, torch {ref})")
        ok = False
        continue
    ratio = mine / ref
    passed = ratio <= 1.1
    ok &= passed
    extra = f"; vs unfused attention {unfused:.2f} ms: {mine / unfused:.3f}x" if unfused else ""
    print(f"{name}: dpart {mine:.2f} ms, PyTorch eager {ref:.2f} ms: {ratio:.3f}x {'ok' if passed else 'FAIL (> 1.1x)'}{extra}")
    lines.append(f"{name},{mine:.4f},{ref:.4f},{ratio:.4f},{unfused or ''},{(mine / unfused) if unfused else ''},{int(passed)}")
open(f"{out}/run_vs_torch.csv", "w").write("\n".join(lines) + "\n")
sys.exit(0 if ok else 1)
EOF

step "4. a 4-stage pipeline on four green-context partitions: measured vs predicted"
# Predicted twice: from the cluster file's derived figures (the roofline), and from GPT-2 small's
# layers timed on partition p0 itself (`profile --model --cluster --device p0`: the four
# partitions share its kind). The target applies to the second, dpart's prediction with measured
# layer costs; the first is reported.
"$DPART" plan "$OUT/gpt2-small-b8.toml" -c plans/clusters/h100-4partitions.toml --max-replicas 1 --max-tp 1 --out "$OUT/gpt2-4p.toml" 2>&1 | tee -a "$log"
if run 240 pipeline-4p "$DPART" run "$OUT/gpt2-4p.toml" -m "$OUT/gpt2-small-b8.toml" \
    -c plans/clusters/h100-4partitions.toml --backend "$BACKEND" -n 12 --out-dir "$OUT/run-4p"; then
    err=$(summary_value "$OUT/run-4p/summary.toml" prediction_error_pct)
    say "prediction error from the roofline: ${err}%"
else
    status=1
fi
if run 240 layers-p0 "$DPART" profile --model "$OUT/gpt2-small-b8.toml" --layer-times "$OUT/gpt2-p0-layer-times.csv" \
    --backend "$BACKEND" --cluster plans/clusters/h100-4partitions.toml --device p0 --repeats 3 &&
    "$DPART" plan "$OUT/gpt2-small-b8.toml" -c plans/clusters/h100-4partitions.toml --max-replicas 1 --max-tp 1 \
        --layer-times "$OUT/gpt2-p0-layer-times.csv" --out "$OUT/gpt2-4p-measured.toml" 2>&1 | tee -a "$log" &&
    run 240 pipeline-4p-measured "$DPART" run "$OUT/gpt2-4p-measured.toml" -m "$OUT/gpt2-small-b8.toml" \
        -c plans/clusters/h100-4partitions.toml --layer-times "$OUT/gpt2-p0-layer-times.csv" --backend "$BACKEND" \
        -n 12 --out-dir "$OUT/run-4p-measured"; then
    err=$(summary_value "$OUT/run-4p-measured/summary.toml" prediction_error_pct)
    say "prediction error from layers measured on a partition: ${err}% (target within 10%)"
    awk -v e="$err" 'BEGIN { exit !(e != "" && e <= 10 && e >= -10) }' || { say "FAIL: outside 10%"; status=1; }
else
    status=1
fi

step "5. shrinking a partition mid-run with --adaptive"
# p1 slowed 2x at iteration 10 of 60: its green context is re-cut to 16 SMs. The adaptive run
# re-plans from measured speeds; a fresh plan for the shrunk layout (p1 declared with 16 SMs and
# half the figures) is run for comparison. Target: throughput after recovery >= 90% of the
# fresh plan's. The losses of a tiny-gpt adaptive run on the partitions are compared with the
# CPU backend's static run (bf16 tolerance): the weights it ends with train the same model.
printf '[[event]]\niteration = 10\nkind = "slowdown"\ndevice = "p1"\nfactor = 2.0\n' >"$OUT/shrink.toml"
"$PY" - plans/clusters/h100-4partitions.toml "$OUT/h100-shrunk.toml" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
blocks = text.split("[[device]]")
for i, b in enumerate(blocks):
    if 'name = "p1"' in b:
        b = b.replace("sm = 32", "sm = 16")
        b = re.sub(r"^(tflops\w*|mem_bw_gbs) = ([0-9.]+)", lambda m: f"{m.group(1)} = {float(m.group(2)) / 2:.4g}", b, flags=re.M)
        blocks[i] = b
open(sys.argv[2], "w").write("[[device]]".join(blocks).replace('name = "h100-4partitions"', 'name = "h100-p1-shrunk"'))
EOF
adaptive_flags=(--adaptive --window 5 --copy-every 5 --max-replicas 1 --max-tp 1 --min-gain 0.02)
run 300 adaptive-4p "$DPART" run "$OUT/gpt2-4p.toml" -m "$OUT/gpt2-small-b8.toml" -c plans/clusters/h100-4partitions.toml \
    --backend "$BACKEND" -n 60 -s "$OUT/shrink.toml" "${adaptive_flags[@]}" --out-dir "$OUT/run-adaptive" || status=1
"$DPART" plan "$OUT/gpt2-small-b8.toml" -c "$OUT/h100-shrunk.toml" --max-replicas 1 --max-tp 1 -q \
    --out "$OUT/gpt2-shrunk.toml" >/dev/null 2>&1
run 240 fresh-shrunk "$DPART" run "$OUT/gpt2-shrunk.toml" -m "$OUT/gpt2-small-b8.toml" -c "$OUT/h100-shrunk.toml" \
    --backend "$BACKEND" -n 20 --out-dir "$OUT/run-fresh" || status=1
"$DPART" plan plans/models/tiny-gpt.toml -c plans/clusters/h100-4partitions.toml --max-replicas 1 --max-tp 1 -q \
    --out "$OUT/tiny-4p.toml" >/dev/null 2>&1
run 180 tiny-adaptive "$DPART" run "$OUT/tiny-4p.toml" -m plans/models/tiny-gpt.toml \
    -c plans/clusters/h100-4partitions.toml --backend "$BACKEND" -n 30 -s "$OUT/shrink.toml" "${adaptive_flags[@]}" \
    --out-dir "$OUT/tiny-adaptive" || status=1
run 180 tiny-static-cpu "$DPART" run "$OUT/tiny-4p.toml" -m plans/models/tiny-gpt.toml \
    -c plans/clusters/h100-4partitions.toml --backend cpu -n 30 --out-dir "$OUT/tiny-static-cpu" || status=1
"$PY" - "$OUT" <<'EOF' 2>&1 | tee -a "$log" || status=1
import csv, re, statistics, sys
out = sys.argv[1]
ok = True
try:
    rows = list(csv.DictReader(open(f"{out}/run-adaptive/iterations.csv")))
    versions = [int(r["plan_version"]) for r in rows]
    last_change = max([i for i in range(1, len(rows)) if versions[i] != versions[i - 1]], default=None)
    fresh = float(re.search(r"^p50_iteration_ms = ([0-9.e+-]+)", open(f"{out}/run-fresh/summary.toml").read(), re.M).group(1))
    if last_change is None:
        print("FAIL: the adaptive run never repartitioned")
        ok = False
    else:
        after = [float(r["iteration_ms"]) for r in rows[last_change + 2:]]
        mine = statistics.median(after)
        ratio = fresh / mine
        print(f"after the last repartition (iteration {rows[last_change]['iteration']}): p50 {mine:.2f} ms over "
              f"{len(after)} iterations; fresh plan for the shrunk layout: p50 {fresh:.2f} ms; "
              f"throughput ratio {ratio:.3f} {'ok' if ratio >= 0.9 else 'FAIL (< 0.90)'}")
        ok &= ratio >= 0.9
except Exception as e:
    print(f"FAIL: could not compare the adaptive run with the fresh plan: {e}")
    ok = False
try:
    def losses(name):
        text = open(f"{out}/{name}/summary.toml").read()
        return [float(x) for x in re.search(r"^loss = \[([^\]]*)\]", text, re.M).group(1).split(",") if x.strip()]
    a, c = losses("tiny-adaptive"), losses("tiny-static-cpu")
    worst = max(abs(x - y) / abs(y) for x, y in zip(a, c))
    passed = len(a) == len(c) and worst <= 2e-2
    print(f"tiny-gpt adaptive on partitions vs static on the CPU: {len(a)} losses, worst relative difference "
          f"{worst:.2e} (bf16 tolerance 2e-2) {'ok' if passed else 'FAIL'}")
    ok &= passed
except Exception as e:
    print(f"FAIL: could not compare the tiny-gpt losses: {e}")
    ok = False
sys.exit(0 if ok else 1)
EOF

say
say "gpu_run_check: $([[ $status == 0 ]] && echo PASS || echo FAIL); files in $OUT"
exit $status
