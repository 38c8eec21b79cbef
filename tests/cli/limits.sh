#!/usr/bin/env bash
# Limits (docs/LIMITS.md): sizes overflowing 64 bits, NaN and infinity, zero bandwidth, zero
# devices, a model of a million layers, a cluster of 100,000 devices. Each must end in a clear
# error (exit 2, the message checked) or a correct answer, within a time and a peak memory
# (checked, and printed for every case), never a hang or an out-of-memory kill. The large inputs are
# generated here, in a temporary folder.
# Usage: limits.sh DPART SOURCE_DIR
set -u
dpart=$1
src=$2
. "$src/tests/cli/lib.sh"
models="$src/plans/models"
clusters="$src/plans/clusters"
# Under AddressSanitizer (scripts/test.sh --sanitize) everything is slower and takes more memory.
if ldd "$dpart" 2>/dev/null | grep -q libasan; then
    max_s=900 max_mib=6144
else
    max_s=300 max_mib=3072
fi

# Runs a command, writing its stdout and stderr to $tmp/out and $tmp/err; prints "EXIT SECONDS MIB".
cat >"$tmp/measure.py" <<'EOF'
import resource, subprocess, sys, time
start = time.monotonic()
with open(sys.argv[1], "w") as out, open(sys.argv[2], "w") as err:
    rc = subprocess.run(sys.argv[3:], stdout=out, stderr=err).returncode
seconds = time.monotonic() - start
mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(rc if rc >= 0 else 128 - rc, f"{seconds:.1f}", f"{mib:.0f}")
EOF

# limit NAME EXPECTED_EXIT TEXT COMMAND...: the exit code, TEXT in stderr (or in stdout on success;
# "" for none), no NaN or infinity in what a success prints, and the time and memory bounds.
limit() {
    local name=$1 expected=$2 text=$3
    shift 3
    local rc seconds mib
    read -r rc seconds mib < <(/usr/bin/python3 "$tmp/measure.py" "$tmp/out" "$tmp/err" "$@")
    checks=$((checks + 1))
    printf '%-56s exit %s  %7.1f s  %6s MiB\n' "$name" "$rc" "$seconds" "$mib"
    local why=""
    if [ "$rc" != "$expected" ]; then why="exit $rc, expected $expected"
    elif [ -n "$text" ] && [ "$expected" -ne 0 ] && ! grep -qF -- "$text" "$tmp/err"; then why="stderr lacks '$text'"
    elif [ -n "$text" ] && [ "$expected" -eq 0 ] && ! grep -qF -- "$text" "$tmp/out"; then why="stdout lacks '$text'"
    elif [ "$expected" -eq 0 ] && grep -qiwE -- '-?(nan|inf)' "$tmp/out"; then why="a NaN or infinity in the output"
    elif [ "$expected" -eq 2 ] && [ -s "$tmp/out" ]; then why="a rejected input printed on stdout"
    elif awk -v s="$seconds" -v m="$max_s" 'BEGIN { exit !(s > m) }'; then why="took over $max_s s"
    elif [ "$mib" -gt "$max_mib" ]; then why="peak memory over $max_mib MiB"
    fi
    if [ -n "$why" ]; then
        echo "FAIL $name: $why"
        sed 's/^/  stderr: /' "$tmp/err" | head -5
        failures=$((failures + 1))
    fi
}

network='[network]
intra_node_gbs = 370.0
intra_node_latency_us = 3.0
inter_node_gbs = 50.0
inter_node_latency_us = 8.0'
group() {  # group NAME NODES DEVICES_PER_NODE [EXTRA NETWORK LINES]: a cluster of identical devices
    printf '[cluster]\nname = "%s"\n%s\n[[device_group]]\nnodes = %s\ndevices_per_node = %s\nkind = "H100"\ntflops = 790.0\nmem_gib = 80.0\nmem_bw_gbs = 3000.0\n' \
        "$1" "$network" "$2" "$3"
}
transformer() {  # transformer NAME BLOCKS: a tiny transformer of BLOCKS blocks (+ 4 layers)
    printf '[model]\nname = "%s"\ndtype = "bf16"\nglobal_batch = 8\n[transformer]\nlayers = %s\nhidden = 8\nheads = 2\nvocab = 16\nseq_len = 4\n' "$1" "$2"
}

# Two CPU-like devices with figures of our own (the bundled cpu-local.toml is a measurement that
# `dpart profile` rewrites): the base of the edits below.
two="$tmp/two.toml"
printf '[cluster]\nname = "two"\n[network]\nintra_node_gbs = 10.0\nintra_node_latency_us = 1.0\ninter_node_gbs = 1.0\ninter_node_latency_us = 50.0\n' >"$two"
for d in cpu0 cpu1; do
    printf '[[device]]\nname = "%s"\nnode = "localhost"\ntflops = 0.05\nmem_gib = 8.0\nmem_bw_gbs = 10.0\n' "$d" >>"$two"
done

echo "--- a million layers"
transformer deep 999996 >"$tmp/deep.toml"
limit "inspect a [transformer] of 1,000,000 layers" 0 "" "$dpart" inspect -q "$tmp/deep.toml"
limit "plan it: refused at once" 2 "has 1000000 layers; the planner searches at most 4096" \
    "$dpart" plan "$tmp/deep.toml" -c "$two"
/usr/bin/python3 - "$tmp/deep-list.toml" <<'EOF'
import sys
with open(sys.argv[1], "w") as f:
    f.write('[model]\nname = "deep-list"\ndtype = "fp32"\nglobal_batch = 8\n\n')
    f.write('[[layer]]\nname = "l0"\nop = "linear"\nin_features = 16\nout_features = 16\n\n')
    f.write("".join(f'[[layer]]\nname = "l{i}"\nop = "relu"\n\n' for i in range(1, 1000000)))
EOF
limit "inspect 1,000,000 [[layer]] tables (40 MB)" 0 "" "$dpart" inspect -q "$tmp/deep-list.toml"
# A plan of one stage over the million layers, replayed: estimate_plan on every layer.
printf '[plan]\nobjective = "iteration"\nschedule = "1f1b"\nmicrobatch_size = 4\nmicrobatches = 2\n[[stage]]\nfirst_layer = 0\nlast_layer = 999999\ndevices = ["cpu0"]\ntp = 1\n' >"$tmp/deep-plan.toml"
limit "replay a one-stage plan of them" 0 "replayed 2 iterations" \
    "$dpart" replay "$tmp/deep-plan.toml" -m "$tmp/deep-list.toml" -c "$two" -n 2
transformer deeper 1048573 >"$tmp/deeper.toml"
limit "1,048,577 layers: refused before allocating" 2 "are more than the 1048576 layers dpart accepts" \
    "$dpart" inspect "$tmp/deeper.toml"
transformer deepest 1000000000000 >"$tmp/deepest.toml"
limit "10^12 blocks: refused before allocating" 2 "are more than the 1048576 layers dpart accepts" \
    "$dpart" inspect "$tmp/deepest.toml"
transformer plannable 4092 >"$tmp/plannable.toml"
limit "plan 4096 layers (the planner's limit) on 8 devices" 0 "predicted iteration" \
    "$dpart" plan "$tmp/plannable.toml" -c "$clusters/dgx-h100.toml" --objective throughput

echo "--- 100,000 devices"
group huge 12500 8 >"$tmp/c100k.toml"
limit "inspect 100,000 devices ([[device_group]])" 0 "100000 devices" "$dpart" inspect --cluster "$tmp/c100k.toml"
limit "plan seed-mlp on them" 0 "predicted iteration" \
    "$dpart" plan "$models/seed-mlp.toml" -c "$tmp/c100k.toml" --out "$tmp/p100k.toml"
limit "replay that plan on them" 0 "replayed 3 iterations" \
    "$dpart" replay "$tmp/p100k.toml" -m "$models/seed-mlp.toml" -c "$tmp/c100k.toml" -n 3 --out-dir "$tmp/r100k"
group bigger 25000 8 >"$tmp/c200k.toml"
limit "plan on 200,000 devices: refused at once" 2 "has 200000 devices; the planner searches at most 131072" \
    "$dpart" plan "$models/seed-mlp.toml" -c "$tmp/c200k.toml"
limit "4096 layers on 100,000 devices: refused at once" 2 "is beyond what the planner searches" \
    "$dpart" plan "$tmp/plannable.toml" -c "$tmp/c100k.toml"
group too-big 131073 8 >"$tmp/c1m.toml"
limit "1,048,584 devices: refused before allocating" 2 "more than the 1048576 dpart accepts" \
    "$dpart" inspect --cluster "$tmp/c1m.toml"

echo "--- sizes overflowing 64 bits"
group overflow 4294967296 4294967296 >"$tmp/overflow.toml"
limit "nodes x devices_per_node = 2^64" 2 "nodes x devices_per_node overflows 64 bits" \
    "$dpart" inspect --cluster "$tmp/overflow.toml"
custom() {  # custom NAME KEY VALUE: a one-layer custom model with KEY = VALUE
    printf '[model]\nname = "%s"\ndtype = "fp32"\nglobal_batch = 8\n[[layer]]\nname = "a"\nop = "custom"\nfwd_flops = 1e6\nbwd_flops = 2e6\nparams = 1000\nout_bytes = 4\n' "$1" |
        sed "s/^$2 = .*/$2 = $3/"
}
custom big params 18446744073709551616 >"$tmp/literal.toml"
limit "an integer literal of 2^64" 2 "TOML syntax error" "$dpart" inspect "$tmp/literal.toml"
custom big params 1e20 >"$tmp/float.toml"
limit "a count of 1e20" 2 '"params" = 1e+20 overflows 64 bits' "$dpart" inspect "$tmp/float.toml"
custom big params 1.8e19 >"$tmp/bytes.toml"
limit "1.8e19 parameters: their bytes overflow" 2 "its sizes overflow 64 bits" "$dpart" inspect "$tmp/bytes.toml"
custom big params 4e18 >"$tmp/state.toml"
limit "4e18 parameters: the training state exceeds 2^64 B" 3 "no plan fits in memory" \
    "$dpart" plan "$tmp/state.toml" -c "$two"
printf '[plan]\nobjective = "iteration"\nschedule = "1f1b"\nmicrobatch_size = 9223372036854775807\nmicrobatches = 4\n[[stage]]\nfirst_layer = 0\nlast_layer = 3\ndevices = ["cpu0"]\ntp = 1\n' >"$tmp/plan-overflow.toml"
limit "microbatch_size x microbatches overflows" 2 "microbatch_size x microbatches overflows 64 bits" \
    "$dpart" replay "$tmp/plan-overflow.toml" -m "$models/seed-mlp.toml" -c "$two"
limit "--iterations 2^64" 2 "--iterations" \
    "$dpart" replay "$tmp/plan-overflow.toml" -m "$models/seed-mlp.toml" -c "$two" -n 18446744073709551616
limit "--microbatch-size 2^64" 2 "--microbatch-size must be a positive integer" \
    "$dpart" plan "$models/seed-mlp.toml" -c "$two" --microbatch-size 18446744073709551616

echo "--- NaN and infinity"
sed 's/tflops = 0.05/tflops = nan/' "$two" >"$tmp/nan.toml"
limit "tflops = nan" 2 '"tflops" must be a finite number, got NaN' "$dpart" inspect --cluster "$tmp/nan.toml"
sed 's/mem_gib = 8.0/mem_gib = inf/' "$two" >"$tmp/inf.toml"
limit "mem_gib = inf" 2 '"mem_gib" must be a finite number, got infinity' "$dpart" inspect --cluster "$tmp/inf.toml"
custom nan fwd_flops nan >"$tmp/nan-model.toml"
limit "fwd_flops = nan" 2 '"fwd_flops" must be a non-negative integer, got NaN' "$dpart" inspect "$tmp/nan-model.toml"
sed 's/tflops = 0.05/tflops = 1e-300/' "$two" >"$tmp/tiny.toml"
limit "tflops = 1e-300 (every time would be 1e297 ms)" 2 "is below 1e-06 TFLOP/s" "$dpart" inspect --cluster "$tmp/tiny.toml"
"$dpart" plan "$models/seed-mlp.toml" -c "$two" -q --out "$tmp/seed-plan.toml"
printf '[[event]]\niteration = 1\nkind = "slowdown"\ndevice = "cpu0"\nfactor = inf\n' >"$tmp/inf-scenario.toml"
limit "a slowdown factor of inf" 2 '"factor" must be a finite number, got infinity' \
    "$dpart" replay "$tmp/seed-plan.toml" -m "$models/seed-mlp.toml" -c "$two" -s "$tmp/inf-scenario.toml"
limit "--jitter nan" 2 "--jitter: must be a finite number" \
    "$dpart" replay "$tmp/seed-plan.toml" -m "$models/seed-mlp.toml" -c "$two" --jitter nan
printf 'iteration,plan_version,iteration_ms,samples_per_s,event\n0,1,inf,3,\n' >"$tmp/inf.csv"
limit "compare an iteration of inf ms" 2 'column "iteration_ms": "inf" is not a finite number' "$dpart" compare "$tmp/inf.csv"
printf '[[event]]\niteration = 1\nkind = "slowdown"\ndevice = "cpu0"\nfactor = 1e6\n[[event]]\niteration = 2\nkind = "link"\na = "cpu0"\nb = "cpu1"\nfactor = 1e6\n' >"$tmp/extreme.toml"
for policy in static adaptive oracle; do
    limit "the most extreme factors (1e6), $policy policy" 0 "replayed 4 iterations" \
        "$dpart" replay "$tmp/seed-plan.toml" -m "$models/seed-mlp.toml" -c "$two" \
        -s "$tmp/extreme.toml" -n 4 --policy "$policy" --window 1 --out-dir "$tmp/extreme-$policy"
done

echo "--- zero bandwidth"
sed 's/inter_node_gbs = 1.0/inter_node_gbs = 0/' "$two" >"$tmp/zero-bw.toml"
limit "inter_node_gbs = 0" 2 '"inter_node_gbs" must be positive, got 0' "$dpart" inspect --cluster "$tmp/zero-bw.toml"
sed 's/intra_node_gbs = 10.0/intra_node_gbs = 1e-6/' "$two" >"$tmp/slow-link.toml"
limit "the slowest link (1e-6 GB/s): a finite plan" 0 "predicted iteration" \
    "$dpart" plan "$models/gpt2-small.toml" -c "$tmp/slow-link.toml"
printf '[[event]]\niteration = 1\nkind = "link"\na = "cpu0"\nb = "cpu1"\nfactor = 0\n' >"$tmp/zero-link.toml"
limit "a link event of factor 0" 2 '"factor" must be positive, got 0' \
    "$dpart" replay "$tmp/seed-plan.toml" -m "$models/seed-mlp.toml" -c "$two" -s "$tmp/zero-link.toml"

echo "--- zero devices"
printf '[cluster]\nname = "empty"\n%s\n' "$network" >"$tmp/empty.toml"
limit "a cluster without devices" 2 "the cluster has no devices" "$dpart" inspect --cluster "$tmp/empty.toml"
group none 0 8 >"$tmp/none.toml"
limit "a device group of 0 nodes" 2 '"nodes" must be a positive integer, got 0' "$dpart" inspect --cluster "$tmp/none.toml"
printf '[plan]\nobjective = "iteration"\nschedule = "1f1b"\nmicrobatch_size = 64\nmicrobatches = 1\n[[stage]]\nfirst_layer = 0\nlast_layer = 3\ndevices = []\ntp = 1\n' >"$tmp/no-devices-plan.toml"
limit "a plan stage without devices" 2 "a stage needs at least one device" \
    "$dpart" replay "$tmp/no-devices-plan.toml" -m "$models/seed-mlp.toml" -c "$two"
printf '[[event]]\niteration = 1\nkind = "fail"\ndevice = "cpu0"\n[[event]]\niteration = 1\nkind = "fail"\ndevice = "cpu1"\n' >"$tmp/all-fail.toml"
for policy in static adaptive oracle; do
    limit "every device fails, $policy policy: stops, files written" 1 "" \
        "$dpart" replay "$tmp/seed-plan.toml" -m "$models/seed-mlp.toml" -c "$two" \
        -s "$tmp/all-fail.toml" -n 5 --policy "$policy" --out-dir "$tmp/all-fail-$policy"
    checks=$((checks + 1))
    grep -q "stop" "$tmp/all-fail-$policy/summary.toml" 2>/dev/null ||
        { echo "FAIL every device fails ($policy): no summary saying it stopped"; failures=$((failures + 1)); }
done

finish
