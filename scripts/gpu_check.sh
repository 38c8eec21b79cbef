#!/usr/bin/env bash
# Every GPU check, on the H100 machine (../shared/DEVICE.md), in one run:
# - `dpart profile` (issue 7): every gpu.* and nccl.* probe writing $OUT/cluster.toml and
#   $OUT/profile.csv; references measured without dpart (PyTorch: a bf16 8192^3 matmul, a 1 GiB
#   device copy, a pinned 1 GiB host-to-device copy) and dpart's figure / reference for each
#   (target >= 0.95); then `dpart plan` on the measured cluster, and with GPT-2 small's layers
#   timed on the GPU (`dpart profile --model --backend cuda`);
# - the CUDA backend of `dpart run` (issue 8): scripts/gpu_run_check.sh (kernel tests, training
#   against the CPU backend, steps against PyTorch eager, a pipeline on green-context partitions).
# Everything it writes is under $OUT.
#
#   scripts/gpu_check.sh [DPART]        DPART: the binary (default: .devbin/dpart, else build-h/dpart)
#
# Exit code: 0 when every ratio is >= 0.95 and every step ran; 1 otherwise.
#
# Getting the binary there (no CMake step on the GPU machine: toml++ is not there, and nothing
# can be installed). On the CPU machine:
#   cmake -S . -B build-h -DCMAKE_CUDA_ARCHITECTURES=90 && cmake --build build-h -j2 --target dpart dpart_gpu_tests
#   mkdir -p .devbin && strip -o .devbin/dpart build-h/dpart     # under the 64 MiB a run carries
#   strip -o .devbin/dpart_gpu_tests build-h/dpart_gpu_tests
#   ldd build-h/dpart                                            # what it needs at run time
# toml++ is compiled into the binary and fmt is header-only; the CUDA runtime is static. It
# needs libnccl, libcudnn, libcublas (there: /lib/x86_64-linux-gnu, /usr/local/cuda/lib64),
# OpenMPI's libmpi (there: OpenMPI is installed) and OpenBLAS (libopenblas.so.0, with
# libgfortran): the check below prints any of them the machine lacks. A lacking library can be
# carried: copy it from the CPU machine into .devbin/lib (e.g. `cp -L
# /lib/x86_64-linux-gnu/libopenblas.so.0 /lib/x86_64-linux-gnu/libgfortran.so.5 .devbin/lib/`)
# and this script puts .devbin/lib on LD_LIBRARY_PATH. With the device tool:
#   run(command="scripts/gpu_check.sh", carry=[".devbin"], timeout_s=600)
# (.devbin must be ignored by git, e.g. listed in .git/info/exclude, to be carried.)
set -u
cd "$(dirname "$0")/.."
DPART=${1:-}
if [[ -z $DPART ]]; then
    if [[ -x .devbin/dpart ]]; then DPART=.devbin/dpart; else DPART=build-h/dpart; fi
fi
OUT=${OUT:-/tmp/dpart-gpu-check}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$PWD/.devbin/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
PY=${PYTHON:-python3}
status=0
log="$OUT/gpu_check.log"
: >"$log"
say() { echo "$@" | tee -a "$log"; }
step() { say; say "== $* =="; }

step "machine"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 || true
  echo "binary: $DPART"; "$DPART" --version 2>&1 || true; } | tee -a "$log"

step "shared libraries"
if [[ ! -x $DPART ]]; then
    say "MISSING: the binary $DPART (see the recipe at the top of this script)"
    exit 1
fi
missing=$(ldd "$DPART" 2>&1 | grep "not found" || true)
if [[ -n $missing ]]; then
    say "MISSING shared libraries (copy them into .devbin/lib on the CPU machine and carry .devbin):"
    say "$missing"
    status=1
else
    say "every shared library found"
    ldd "$DPART" | grep -E "nccl|cudnn|cublas|openblas|mpi" | tee -a "$log"
fi

step "dpart profile -p gpu. -p nccl."
start=$(date +%s)
"$DPART" profile -p gpu. -p nccl. --name h100-measured --out "$OUT/cluster.toml" --csv "$OUT/profile.csv" 2>&1 |
    tee -a "$log"
rc=${PIPESTATUS[0]}
say "dpart profile: exit $rc in $(( $(date +%s) - start )) s"
[[ $rc == 0 ]] || status=1

step "references measured with PyTorch, and dpart / reference"
"$PY" - "$OUT/profile.csv" "$OUT/reference.csv" <<'EOF' 2>&1 | tee -a "$log"
import csv, statistics, sys
import torch

profile_csv, reference_csv = sys.argv[1], sys.argv[2]
dev = torch.device("cuda", 0)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(dev)}")

def median_seconds(f, per_sample, samples=7):
    """Median over samples of the event-timed time of per_sample calls, / per_sample; one warm-up."""
    out = []
    for i in range(samples + 1):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(per_sample):
            f()
        stop.record()
        stop.synchronize()
        if i > 0:
            out.append(start.elapsed_time(stop) / 1e3 / per_sample)
    return statistics.median(out)

n = 8192
a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
c = torch.empty(n, n, device=dev, dtype=torch.bfloat16)
t = median_seconds(lambda: torch.matmul(a, b, out=c), 10)
ref_gemm = 2 * n**3 / t / 1e12
del a, b, c

size = 1 << 30
src = torch.empty(size, dtype=torch.uint8, device=dev).fill_(1)
dst = torch.empty(size, dtype=torch.uint8, device=dev)
t = median_seconds(lambda: dst.copy_(src), 10)
ref_copy = size / t / 1e9  # GB copied per second (read + written is twice this)
del src, dst

host = torch.empty(size, dtype=torch.uint8, pin_memory=True).fill_(1)
d = torch.empty(size, dtype=torch.uint8, device=dev)
t = median_seconds(lambda: d.copy_(host, non_blocking=True), 4)
ref_h2d = size / t / 1e9

figures = {}
with open(profile_csv) as f:
    for row in csv.DictReader(f):
        if row["status"] == "ok" and row["unit"]:
            figures[(row["key"], row["figure"])] = float(row["value"])

checks = [
    ("bf16 GEMM 8192^3, TFLOP/s", ("gpu.gemm_bf16", "gpu0.tflops"), ref_gemm),
    ("device copy 1 GiB, GB/s copied", ("gpu.memory_bw", "gpu0.gbs_copied"), ref_copy),
    ("pinned host-to-device 1 GiB, GB/s", ("gpu.h2d_pinned", "gpu0.gbs"), ref_h2d),
]
ok = True
rows = ["figure,dpart,reference,ratio,pass"]
print(f"{'figure':<36} {'dpart':>10} {'PyTorch':>10} {'ratio':>7}")
for name, key, ref in checks:
    mine = figures.get(key)
    if mine is None:
        print(f"{name:<36} {'missing':>10} {ref:>10.1f}      -   FAIL (dpart did not measure {key[0]} {key[1]})")
        rows.append(f"{name},,{ref:.6g},,0")
        ok = False
        continue
    ratio = mine / ref
    passed = ratio >= 0.95
    ok &= passed
    print(f"{name:<36} {mine:>10.1f} {ref:>10.1f} {ratio:>7.3f}   {'ok' if passed else 'FAIL (< 0.95)'}")
    rows.append(f"{name},{mine:.6g},{ref:.6g},{ratio:.4f},{int(passed)}")
with open(reference_csv, "w") as f:
    f.write("\n".join(rows) + "\n")
sys.exit(0 if ok else 1)
EOF
rc=${PIPESTATUS[0]}
[[ $rc == 0 ]] || status=1

step "dpart plan plans/models/gpt2-small.toml -c \$OUT/cluster.toml"
if [[ -f $OUT/cluster.toml ]]; then
    sed -n '1,200p' "$OUT/cluster.toml" | tee -a "$log"
    "$DPART" plan plans/models/gpt2-small.toml -c "$OUT/cluster.toml" --out "$OUT/plan.toml" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    [[ $rc == 0 ]] || status=1
    # Measured layer costs: GPT-2 small's layers timed by the device layers on this GPU (kind:
    # its name, as cluster.toml's), then the plan from them instead of the roofline.
    sed 's/^global_batch = 512/global_batch = 8/' plans/models/gpt2-small.toml >"$OUT/gpt2-small-b8-profile.toml"
    timeout 180 "$DPART" profile --model "$OUT/gpt2-small-b8-profile.toml" --layer-times "$OUT/gpt2-layer-times.csv" \
        --backend cuda --precision bf16 --repeats 3 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    if [[ $rc == 0 ]]; then
        "$DPART" plan "$OUT/gpt2-small-b8-profile.toml" -c "$OUT/cluster.toml" --layer-times "$OUT/gpt2-layer-times.csv" \
            --out "$OUT/plan-measured.toml" 2>&1 | tee -a "$log"
        [[ ${PIPESTATUS[0]} == 0 ]] || status=1
    else
        status=1
    fi
else
    say "no cluster.toml was written"
    status=1
fi

step "the CUDA backend of dpart run (scripts/gpu_run_check.sh)"
TESTS=$(dirname "$DPART")/dpart_gpu_tests
OUT="$OUT" scripts/gpu_run_check.sh "$DPART" "$TESTS" || status=1

say
say "gpu_check: $([[ $status == 0 ]] && echo PASS || echo FAIL); files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
