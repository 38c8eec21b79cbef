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
echo "4 passed, 0 failed"
