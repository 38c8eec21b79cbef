#!/usr/bin/env bash
# Atomic outputs: `dpart replay` and `dpart run` are killed with SIGKILL at random moments (seeded,
# so a failure can be replayed with the same DPART_KILL_SEED), and the out-dir must then hold only
# whole files: no temporary, every CSV with its declared header, every line complete with one cell
# per column, every TOML loading. (`--resume` does not exist yet: a killed run starts over.)
# Usage: atomic_outputs.sh DPART SOURCE_DIR
set -u
dpart=$1
src=$2
. "$src/tests/cli/lib.sh"
RANDOM=${DPART_KILL_SEED:-20261127}
python=/usr/bin/python3
# Under AddressSanitizer (scripts/test.sh --sanitize) runs are several times slower: shorter ones
# keep the test's time (about nine runs) in bounds; the kill moments scale with the measured time.
replay_iterations=400 run_iterations=30
if ldd "$dpart" 2>/dev/null | grep -q libasan; then replay_iterations=100 run_iterations=10; fi

fail() {
    echo "FAIL $*"
    failures=$((failures + 1))
}

# The out-dir holds only the files dpart names, each whole. Prints the files found.
check_dir() {  # check_dir NAME DIR
    checks=$((checks + 1))
    "$python" - "$2" <<'EOF' || fail "$1: partial or unexpected files in $2"
import csv, os, sys, tomllib
d = sys.argv[1]
headers = {
    "iterations.csv": "iteration,plan_version,iteration_ms,samples_per_s,event",
    "stages.csv": "iteration,stage,device,compute_ms,comm_ms,idle_ms",
    "timeline.csv": "iteration,stage,device,kind,microbatch,start_ms,end_ms",
}
tomls = {"summary.toml", "plan.toml"}
ok = True
found = sorted(os.listdir(d)) if os.path.isdir(d) else []
for name in found:
    path = os.path.join(d, name)
    if name in headers:
        with open(path, newline="") as f:
            text = f.read()
        if not text.endswith("\n"):
            print(f"  {name}: the last line is cut ({len(text)} bytes)"); ok = False; continue
        rows = list(csv.reader(text.splitlines()))
        if not rows or ",".join(rows[0]) != headers[name]:
            print(f"  {name}: header {rows[0] if rows else None}"); ok = False; continue
        bad = [i + 1 for i, r in enumerate(rows) if len(r) != len(rows[0])]
        if bad:
            print(f"  {name}: lines {bad[:5]} have the wrong number of cells"); ok = False
    elif name in tomls:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
            if "meta" not in doc:
                print(f"  {name}: no [meta]"); ok = False
            if name == "summary.toml" and "iterations" not in doc.get("summary", {}):
                print(f"  {name}: no iterations"); ok = False
        except Exception as e:
            print(f"  {name}: does not load: {e}"); ok = False
    else:
        print(f"  unexpected file {name} (a temporary?)"); ok = False
print("  files: " + (" ".join(found) if found else "none"))
sys.exit(0 if ok else 1)
EOF
}

# Runs COMMAND... once to measure how long it takes (sets `duration`, in ms; 0 when it failed),
# leaving whole files in DIR.
measure() {  # measure NAME DIR COMMAND...
    local name=$1 dir=$2
    shift 2
    local start end rc
    start=$(date +%s%N)
    "$@" --out-dir "$dir" >"$tmp/out" 2>"$tmp/err"
    rc=$?
    end=$(date +%s%N)
    checks=$((checks + 1))
    duration=$(((end - start) / 1000000))
    if [ "$rc" -ne 0 ]; then
        fail "$name: exit $rc"
        sed 's/^/  /' "$tmp/err" | tail -5
        duration=0
    fi
}

# Kills COMMAND... with SIGKILL after a random delay, TRIALS times, each in a fresh out-dir (and
# once more in a dir that already holds whole files from a finished run, which a write replaces).
# Half the delays fall anywhere in the run, half in its last fifth, where the files are written.
kill_trials() {  # kill_trials NAME TRIALS DURATION_MS COMMAND...
    local name=$1 trials=$2 duration=$3
    shift 3
    local i delay dir pid killed=0 finished=0
    for ((i = 0; i < trials; i++)); do
        if ((i % 2 == 0)); then
            delay=$((RANDOM % (duration + 1)))
        else
            delay=$((duration * 4 / 5 + RANDOM % (duration / 5 + 50)))
        fi
        dir="$tmp/$name-$i"
        if ((i == trials - 1)) && [ -d "$tmp/$name-full" ]; then
            cp -r "$tmp/$name-full" "$dir"
        fi
        "$@" --out-dir "$dir" >/dev/null 2>&1 &
        pid=$!
        sleep "$(printf '%d.%03d' $((delay / 1000)) $((delay % 1000)))"
        if kill -KILL "$pid" 2>/dev/null; then killed=$((killed + 1)); else finished=$((finished + 1)); fi
        wait "$pid" 2>/dev/null
        echo "$name trial $i: SIGKILL at ${delay} ms"
        check_dir "$name trial $i (killed at ${delay} ms)" "$dir"
    done
    echo "$name: $killed killed, $finished finished before the signal"
}

models="$src/plans/models"
clusters="$src/plans/clusters"

# dpart replay: a long adaptive replay with every iteration's timeline (tens of MB written at the end).
if "$dpart" plan "$models/llama3-8b.toml" -c "$clusters/h100-4x8.toml" -q --out "$tmp/plan.toml" 2>"$tmp/err"; then
    replay=("$dpart" replay "$tmp/plan.toml" -m "$models/llama3-8b.toml" -c "$clusters/h100-4x8.toml"
        --scenario "$src/plans/scenarios/slow-gpu.toml" --policy adaptive --iterations "$replay_iterations" --timeline all)
    measure replay "$tmp/replay-full" "${replay[@]}"
    check_dir "replay finished" "$tmp/replay-full"
    echo "replay: a whole run takes ${duration} ms"
    if [ "$duration" -gt 0 ]; then kill_trials replay 8 "$duration" "${replay[@]}"; fi
else
    fail "plan for replay"; sed 's/^/  /' "$tmp/err"
fi

# dpart run: real training steps of the small GPT on two CPU workers (threads).
if "$dpart" plan "$models/tiny-gpt.toml" -c "$clusters/cpu-local.toml" -q --out "$tmp/run-plan.toml" 2>"$tmp/err"; then
    run=("$dpart" run "$tmp/run-plan.toml" -m "$models/tiny-gpt.toml" -c "$clusters/cpu-local.toml" --iterations "$run_iterations"
        --timeline all)
    measure run "$tmp/run-full" "${run[@]}"
    check_dir "run finished" "$tmp/run-full"
    echo "run: a whole run takes ${duration} ms"
    if [ "$duration" -gt 0 ]; then kill_trials run 6 "$duration" "${run[@]}"; fi
else
    fail "plan for run"; sed 's/^/  /' "$tmp/err"
fi

finish
