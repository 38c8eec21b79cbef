# Shared by the command-line tests, sourced once `dpart` and `src` are set: a temporary folder
# removed on exit, the counters, `check`, `contains` and `finish`.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failures=0
checks=0

check() {  # check NAME EXPECTED_EXIT|nonzero COMMAND...: stdout in $tmp/out, stderr in $tmp/err
    local name=$1 expected=$2
    shift 2
    "$@" >"$tmp/out" 2>"$tmp/err"
    local rc=$?
    checks=$((checks + 1))
    if { [ "$expected" = nonzero ] && [ "$rc" -eq 0 ]; } || { [ "$expected" != nonzero ] && [ "$rc" -ne "$expected" ]; }; then
        echo "FAIL $name: exit $rc, expected $expected"
        sed 's/^/  stdout: /' "$tmp/out" | tail -5
        sed 's/^/  stderr: /' "$tmp/err" | tail -8
        failures=$((failures + 1))
        return 1
    fi
    return 0
}

contains() {  # contains NAME FILE TEXT
    checks=$((checks + 1))
    if ! grep -qF -- "$3" "$2"; then
        echo "FAIL $1: '$3' not found in:"
        tail -8 "$2" | sed 's/^/  /'
        failures=$((failures + 1))
    fi
}

finish() {  # the summary line; the exit status fails when a check failed or none ran
    echo "$checks checks, $((checks - failures)) passed, $failures failed"
    [ "$failures" -eq 0 ] && [ "$checks" -gt 0 ]
}
