#!/usr/bin/env bash
# tools/plot/dpart_plot.py on real replay output: the three plots are written and not blank, and
# a malformed file is refused (exit 2, file and line named).
# Usage: plot_replay.sh DPART SOURCE_DIR
set -eu
dpart=$1
src=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
plot="/usr/bin/python3 $src/tools/plot/dpart_plot.py"
m="$src/plans/models/vgg16.toml"
c="$src/plans/clusters/h100-4x8.toml"
"$dpart" plan "$m" -c "$c" -q --microbatch-size 32 --out "$tmp/plan.toml"
for p in static adaptive; do
    "$dpart" replay "$tmp/plan.toml" -m "$m" -c "$c" --scenario "$src/plans/scenarios/slow-gpu.toml" \
        --iterations 150 --policy "$p" --out-dir "$tmp/$p" >/dev/null
done
"$dpart" compare "$tmp/static" "$tmp/adaptive" --csv "$tmp/compare.csv" >/dev/null
$plot iterations "$tmp/static" "$tmp/adaptive" -o "$tmp/iterations.png"
$plot gantt "$tmp/adaptive/timeline.csv" --iteration 20 -o "$tmp/gantt.png"
$plot compare "$tmp/compare.csv" -o "$tmp/compare.png"
/usr/bin/python3 - "$tmp"/iterations.png "$tmp"/gantt.png "$tmp"/compare.png <<'PY'
import sys
import matplotlib.image as mpimg
for path in sys.argv[1:]:
    img = mpimg.imread(path)
    if img.ndim < 2 or img.shape[0] < 100 or img.shape[1] < 100:
        sys.exit(f"FAIL {path}: {img.shape} is too small")
    if float(img.std()) < 0.01:
        sys.exit(f"FAIL {path}: blank (pixel spread {img.std()})")
print("plots written and not blank")
PY
printf 'iteration,plan_version,iteration_ms,samples_per_s,event\n0,1,fast,3,\n' >"$tmp/bad.csv"
set +e
$plot iterations "$tmp/bad.csv" -o "$tmp/bad.png" 2>"$tmp/err"
rc=$?
set -e
[ "$rc" -eq 2 ] || { echo "FAIL exit $rc for a malformed file"; exit 1; }
grep -q 'bad.csv:2: column "iteration_ms": "fast" is not a number' "$tmp/err" || { echo "FAIL message"; cat "$tmp/err"; exit 1; }
[ ! -e "$tmp/bad.png" ] || { echo "FAIL a plot was written for a bad file"; exit 1; }
# Bad outputs and odd inputs: one message and exit 2, never a traceback.
refused() {  # refused NAME TEXT COMMAND...: exit 2, TEXT in the message, no traceback
    local name=$1 text=$2
    shift 2
    set +e
    "$@" 2>"$tmp/err" >/dev/null
    local rc=$?
    set -e
    [ "$rc" -eq 2 ] || { echo "FAIL $name: exit $rc"; cat "$tmp/err"; exit 1; }
    grep -qF -- "$text" "$tmp/err" || { echo "FAIL $name: '$text' not in:"; cat "$tmp/err"; exit 1; }
    ! grep -q Traceback "$tmp/err" || { echo "FAIL $name: a traceback"; exit 1; }
}
refused "an output without an extension" "name the output with one of the extensions" \
    $plot compare "$tmp/compare.csv" -o "$tmp/noext"
refused "an output in a missing folder" "cannot write" $plot compare "$tmp/compare.csv" -o "$tmp/no/such/x.png"
printf 'iteration,plan_version,iteration_ms,samples_per_s,event\n0,1,\xff,3,\n' >"$tmp/latin1.csv"
refused "a file that is not UTF-8" "not UTF-8 text" $plot iterations "$tmp/latin1.csv" -o "$tmp/l.png"
{ printf '\xef\xbb\xbf'; cat "$tmp/static/iterations.csv"; } >"$tmp/bom.csv"
$plot iterations "$tmp/bom.csv" -o "$tmp/bom.png" >/dev/null || { echo "FAIL a CSV with a byte-order mark"; exit 1; }
ls "$tmp" | grep -q '\.tmp\.' && { echo "FAIL a temporary file was left"; exit 1; }
echo "9 passed, 0 failed"
