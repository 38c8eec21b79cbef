#!/usr/bin/env bash
# Builds the libFuzzer harnesses of tests/fuzz/ with clang (ASan + UBSan) in build-fuzz/ and fuzzes
# each for SECONDS (default 60) from its checked-in corpus, with its dictionary. New inputs go to
# build-fuzz/corpus/TARGET (the checked-in corpus is only read); a finding is saved in
# build-fuzz/findings/TARGET/. Prints the inputs executed per target; fails when any target found
# a crash, a sanitizer report, a leak, a slow input (over 10 s) or one that takes over 2 GiB.
#   scripts/fuzz.sh [SECONDS] [TARGET...]     TARGET: model cluster plan scenario csv (default: all)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:-60}
[ $# -gt 0 ] && shift
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(model cluster plan scenario csv)
build=${FUZZ_BUILD_DIR:-$root/build-fuzz}

"$root/scripts/setup.sh"
CC=clang CXX=clang++ cmake -S "$root" -B "$build" -DDPART_FUZZ=ON -DDPART_BUILD_BENCH=OFF -DDPART_WITH_CUDA=OFF \
  -DDPART_WITH_MPI=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build" -j "${JOBS:-2}" --target "${targets[@]/#/fuzz_}"

failed=0
summary=()
for t in "${targets[@]}"; do
  work="$build/corpus/$t"
  findings="$build/findings/$t"
  log="$build/fuzz-$t.log"
  mkdir -p "$work" "$findings"
  dict=()
  [ -f "$root/tests/fuzz/$t.dict" ] && dict=(-dict="$root/tests/fuzz/$t.dict")
  echo "fuzz: $t for ${seconds}s (log: $log)"
  set +e
  "$build/tests/fuzz/fuzz_$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$findings/" "${dict[@]}" "$work" "$root/tests/fuzz/corpus/$t" >"$log" 2>&1
  rc=$?
  set -e
  execs=$(awk '/stat::number_of_executed_units/ { print $2 }' "$log" | tail -1)
  rate=$(awk '/stat::average_exec_per_sec/ { print $2 }' "$log" | tail -1)
  units=$(find "$work" -type f | wc -l)
  status=ok
  if [ "$rc" -eq 0 ] && [ "${execs:-0}" -eq 0 ]; then
    status="FAILED: no input was executed"
    failed=$((failed + 1))
  elif [ "$rc" -ne 0 ]; then
    status="FAILED (exit $rc): $(grep -m1 -E 'runtime error|ERROR:|dpart fuzz finding|SUMMARY' "$log" || echo 'see the log')"
    failed=$((failed + 1))
    tail -40 "$log"
  fi
  summary+=("$(printf '%-9s %10s  %8s/s  %10s  %s' "$t" "${execs:-?}" "${rate:-?}" "$units" "$status")")
done
echo
echo "target       executed        rate      new inputs  result"
printf '%s\n' "${summary[@]}"
[ "$failed" -eq 0 ]
