#!/usr/bin/env bash
# tools/plot/plot_csv.py on a real `dpart inspect --csv` file, and its refusal of a bad column.
# Usage: plot.sh DPART SOURCE_DIR
set -eu
dpart=$1
src=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$dpart" inspect -q "$src/plans/models/vgg16.toml" --csv "$tmp/vgg16.csv"
/usr/bin/python3 "$src/tools/plot/plot_csv.py" "$tmp/vgg16.csv" --x name --y fwd_flops --y bwd_flops --kind bar \
    --log -o "$tmp/vgg16.png"
test -s "$tmp/vgg16.png" || { echo "FAIL no plot written"; exit 1; }
[ "$(head -c 4 "$tmp/vgg16.png" | tail -c 3)" = "PNG" ] || { echo "FAIL not a PNG"; exit 1; }
set +e
/usr/bin/python3 "$src/tools/plot/plot_csv.py" "$tmp/vgg16.csv" --x name --y no_such_column -o "$tmp/bad.png" 2>"$tmp/err"
rc=$?
set -e
[ "$rc" -eq 2 ] || { echo "FAIL exit $rc for a missing column"; exit 1; }
grep -q "no_such_column" "$tmp/err" || { echo "FAIL the missing column is not named"; cat "$tmp/err"; exit 1; }
[ ! -e "$tmp/bad.png" ] || { echo "FAIL a plot was written for a bad column"; exit 1; }
out=$(/usr/bin/python3 "$src/tools/plot/plot_csv.py" "$tmp/vgg16.csv" --x name --y fwd_flops -o "$tmp/noext")
[ -s "$tmp/noext.png" ] && [ "$out" = "wrote $tmp/noext.png (1 series)" ] ||
    { echo "FAIL an output without an extension: '$out'"; exit 1; }
echo "3 passed, 0 failed"
