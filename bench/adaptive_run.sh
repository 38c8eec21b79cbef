#!/usr/bin/env bash
# The adaptive runtime's figures (issue 6), on emulated devices (plans/clusters/cpu-4emulated.toml:
# each worker computes for real, then waits out the time the cluster file gives its task, so that
# four devices run on a 2-core host with the cluster's timing; docs/METHOD.md, "Emulated devices").
#
# One of 4 devices is slowed 3x at iteration 20 of 100 (plans/scenarios/slow-emulated.toml). Runs:
#   static    the planner's plan, as it is, under the scenario
#   adaptive  the same with --adaptive (window 10)
#   fresh     the optimal plan for the degraded cluster (dev2 at a third of its speed), run on it
# and prints: adaptive's throughput after recovery against fresh's and static's over the same
# iterations, the time to detect, re-plan and migrate, and `dpart replay --policy adaptive` of the
# same scenario (the run's calibration: the cluster file) against the adaptive run's total time.
# Usage: bench/adaptive_run.sh [DPART] [MODEL]     (defaults: build/dpart, plans/models/emu-mlp.toml)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dpart=${1:-$root/build/dpart}
model=${2:-$root/plans/models/emu-mlp.toml}
cluster=$root/plans/clusters/cpu-4emulated.toml
scenario=$root/plans/scenarios/slow-emulated.toml
iterations=100
event=20
tmp=$(mktemp -d)
trap '[ -n "${KEEP:-}" ] || rm -rf "$tmp"' EXIT
[ -n "${KEEP:-}" ] && echo "files in $tmp"

# The degraded cluster: dev2 a third as fast (compute and memory), the rest unchanged.
/usr/bin/python3 - "$cluster" "$tmp/degraded.toml" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
parts = text.split("[[device]]")
for i, p in enumerate(parts):
    if 'name = "dev2"' in p:
        p = re.sub(r"tflops = ([0-9.e-]+)", lambda m: f"tflops = {float(m.group(1)) / 3!r}", p)
        p = re.sub(r"mem_bw_gbs = ([0-9.e-]+)", lambda m: f"mem_bw_gbs = {float(m.group(1)) / 3!r}", p)
        parts[i] = p
open(sys.argv[2], "w").write("[[device]]".join(parts))
EOF

# Pipeline-only plans (one device per stage), for all three: the setting in which an adaptive run's
# weights stay bitwise those of a static run. (With data-parallel replicas, a slowed replica's
# best answer is often a new share of each microbatch, which re-planning does not yet do.)
limits=(--max-replicas 1 --max-tp 1)
"$dpart" plan "$model" -c "$cluster" "${limits[@]}" -q --out "$tmp/plan.toml"
"$dpart" plan "$model" -c "$tmp/degraded.toml" "${limits[@]}" -q --out "$tmp/fresh.toml"
echo "static run ..."
"$dpart" run "$tmp/plan.toml" -m "$model" -c "$cluster" -n $iterations --emulate -s "$scenario" --out-dir "$tmp/static" >/dev/null
echo "adaptive run ..."
"$dpart" run "$tmp/plan.toml" -m "$model" -c "$cluster" -n $iterations --emulate -s "$scenario" --adaptive --window 10 \
    "${limits[@]}" --out-dir "$tmp/adaptive" | tee "$tmp/adaptive.txt" | sed -n '2,/^iteration ms/p' | grep -v '^iteration ms'
echo "fresh plan on the degraded cluster ..."
"$dpart" run "$tmp/fresh.toml" -m "$model" -c "$tmp/degraded.toml" -n $iterations --emulate --out-dir "$tmp/fresh" >/dev/null
"$dpart" replay "$tmp/plan.toml" -m "$model" -c "$cluster" -s "$scenario" -n $iterations --policy adaptive --window 10 \
    "${limits[@]}" --out-dir "$tmp/replay" >/dev/null

/usr/bin/python3 - "$tmp" "$event" <<'EOF'
import csv, sys, tomllib
tmp, event = sys.argv[1], int(sys.argv[2])
def rows(name):
    with open(f"{tmp}/{name}/iterations.csv") as f:
        return [r for r in csv.DictReader(l for l in f if not l.startswith("#"))]
def rate(rs):  # iterations per second over these rows
    return len(rs) / (sum(float(r["iteration_ms"]) for r in rs) / 1e3)
static, adaptive, fresh, replay = rows("static"), rows("adaptive"), rows("fresh"), rows("replay")
last = max(int(r["plan_version"]) for r in adaptive)
# After recovery: the rows of the last plan version, less its first (which carries the migration).
recovered = [r for r in adaptive if int(r["plan_version"]) == last][1:]
if last == 1 or not recovered:
    sys.exit("the adaptive run did not repartition")
first_it = int(recovered[0]["iteration"])
a, f_ = rate(recovered), rate(fresh[first_it:])
s = rate([r for r in static if int(r["iteration"]) >= first_it])
s_all = rate([r for r in static if int(r["iteration"]) >= event])
a_all = rate([r for r in adaptive if int(r["iteration"]) >= event])
moved = next(r for r in adaptive if int(r["plan_version"]) == last and r["event"])
summary = tomllib.load(open(f"{tmp}/adaptive/summary.toml", "rb"))
ad = summary["adaptive"]
run_total = sum(float(r["iteration_ms"]) for r in adaptive)
replay_total = sum(float(r["iteration_ms"]) for r in replay)
detect_it = next(int(r["iteration"]) for r in adaptive if int(r["plan_version"]) == 2)
detect_ms = sum(float(r["iteration_ms"]) for r in adaptive if event <= int(r["iteration"]) < detect_it)
print()
print("| figure | value | target |")
print("| --- | --- | --- |")
print(f"| adaptive after recovery (iterations {first_it}-{int(recovered[-1]['iteration'])}), iterations/s | {a:.3f} | |")
print(f"| fresh optimal plan for the degraded cluster, same iterations, iterations/s | {f_:.3f} | |")
print(f"| static under the slowdown, same iterations, iterations/s | {s:.3f} | |")
print(f"| adaptive / fresh | {a / f_:.3f} | >= 0.90 |")
print(f"| adaptive / static (after recovery) | {a / s:.2f}x | >= 1.5x |")
print(f"| adaptive / static (every iteration from the slowdown on, detection and migration included) | {a_all / s_all:.2f}x | |")
print(f"| time to detect: iterations (ms) from the slowdown to the repartition | {detect_it - event} ({detect_ms:.0f} ms) | |")
print(f"| re-planning (planner's search, all decisions) | {ad['replan_ms']:.3g} ms | |")
print(f"| migrated | {ad['migrated_bytes']} B in {summary['summary']['migration_ms']:.3g} ms | |")
print(f"| adaptive run's total time | {run_total:.0f} ms | |")
print(f"| replay --policy adaptive's prediction of it | {replay_total:.0f} ms ({(replay_total - run_total) / run_total * 100:+.1f}%) | within 15% |")
EOF
