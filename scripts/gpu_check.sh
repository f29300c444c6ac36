#!/usr/bin/env bash
# For a maintainer with a CUDA machine: the GPU side of nnfit in one go, in under 6 minutes
# (time limits: tests 130 s + bench 160 s + DDP 40 s = 330 s; with the install and summary under 360 s).
#   bash scripts/gpu_check.sh            # logs and bench markdown go to $OUT/gpu_check (or a temp folder)
# 0. installs this checkout into python3 (--no-deps: the machine's own torch) unless nnfit from here imports;
# 1. the WHOLE test suite with --device auto (so cuda:0), in parallel shards, every failure listed
#    (the tests marked `cuda` among them: the captured step, placement, precision, OOM recovery);
# 2. bench/gpu.py: the GPU issue's throughput table, the 4-512x3-1 network in fp32/bf16, an ensemble of
#    8 tutorial networks against one at batch 1024 (the ensembles issue's <= 1.3x target; the captured
#    ensemble step's first run on a GPU), and the tutorial exercise's time to a test MSE of 1e-7 on the
#    GPU and on the CPU;
# 3. a 1-GPU DDP run through torchrun.
# Prints a short summary at the end; exits non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
LOG=${OUT:+$OUT/gpu_check}
LOG=${LOG:-$(mktemp -d)/gpu_check}
mkdir -p "$LOG"
declare -A RESULT
T0=$SECONDS

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU visible to $PY (torch $("$PY" -c 'import torch; print(torch.__version__)' 2>&1)); nothing to check"
    exit 1
fi
if ! "$PY" -c "import nnfit, sys; sys.exit(0 if nnfit.__file__.startswith(sys.argv[1]) else 1)" "$ROOT/src" 2>/dev/null; then
    echo "== install (pip install --no-deps --no-build-isolation -e .)"
    if ! "$PY" -m pip install --no-deps --no-build-isolation -e . >"$LOG/install.log" 2>&1; then
        tail -n 20 "$LOG/install.log"; echo "gpu_check: install failed (log: $LOG/install.log)"; exit 1
    fi
fi
"$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'gpu_check: {torch.cuda.device_count()} x {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}')" | tee "$LOG/gpu.txt"

step() {  # step NAME TIMEOUT COMMAND...: stdout and stderr to $LOG/NAME.log (STDERR=err: stderr to NAME.err)
    local name=$1 limit=$2; shift 2
    local start=$SECONDS rc=0
    echo "== $name"
    if [ "${STDERR:-}" = err ]; then
        timeout "$limit" "$@" >"$LOG/$name.log" 2>"$LOG/$name.err" || rc=$?
    else
        timeout "$limit" "$@" >"$LOG/$name.log" 2>&1 || rc=$?
    fi
    if [ $rc -eq 0 ]; then RESULT[$name]="ok"; else RESULT[$name]="FAILED (exit $rc)"; fi
    RESULT[$name]="${RESULT[$name]} in $((SECONDS - start)) s"
}

# 1. The whole suite, in shards that share the GPU (largest files first, dealt round-robin).
SHARDS=${GPU_CHECK_SHARDS:-6}
mapfile -t FILES < <(ls -S tests/test_*.py)
echo "== tests (${#FILES[@]} files in $SHARDS shards, device auto)"
start=$SECONDS
pids=()
for ((i = 0; i < SHARDS; i++)); do
    part=()
    for j in "${!FILES[@]}"; do (( j % SHARDS == i )) && part+=("${FILES[$j]}"); done
    [ ${#part[@]} -eq 0 ] && continue
    OMP_NUM_THREADS=2 timeout 130 "$PY" -m pytest -q -p no:cacheprovider -rfE --durations=5 "${part[@]}" \
        >"$LOG/tests-$i.log" 2>&1 &
    pids+=($!)
done
status_tests=0
for pid in "${pids[@]}"; do wait "$pid" || status_tests=$?; done
cat "$LOG"/tests-*.log >"$LOG/tests.log"
counts=$("$PY" - "$LOG" <<'EOF'
import glob, re, sys
tot = {}
for f in sorted(glob.glob(sys.argv[1] + "/tests-*.log")):
    lines = open(f, errors="replace").read().splitlines()
    last = next((l for l in reversed(lines) if re.search(r"\d+ (passed|failed|error)", l) and " in " in l), None)
    if last is None:
        tot["unfinished shards"] = tot.get("unfinished shards", 0) + 1
        continue
    for n, what in re.findall(r"(\d+) (\w+)", last.split(" in ")[0]):
        tot[what] = tot.get(what, 0) + int(n)
print(", ".join(f"{v} {k}" for k, v in tot.items()))
EOF
)
RESULT[tests]="$([ $status_tests -eq 0 ] && echo ok || echo "FAILED (exit $status_tests)"): $counts in $((SECONDS - start)) s"
grep -h "^FAILED\|^ERROR" "$LOG"/tests-*.log | cut -c1-220 >"$LOG/failures.txt"

# 2. The benchmark (the GPU is quiet now): its markdown (stdout, each table flushed when done, so a timeout
# keeps the finished ones) becomes gpu_bench.md; its progress lines and errors go to bench.err.
STDERR=err step bench 160 "$PY" bench/gpu.py
cp "$LOG/bench.log" "$LOG/gpu_bench.md"

# 3. One GPU through torchrun.
RUN=$(mktemp -d)/ddp1
step ddp-1-gpu 40 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m nnfit train \
    --formula "sin(a)*cos(b) + c*d" --domain a=0:3 --domain b=0:3 --domain c=-1:1 --domain d=-1:1 \
    --samples 200000 --hidden 512,512,512 --optimizer adam --batch-size 4096 --epochs 3 --device cuda \
    --no-plots --out "$RUN"
if [ -f "$RUN/summary.json" ]; then
    "$PY" -c "import json,sys; s=json.load(open(sys.argv[1])); print('ddp-1-gpu:', s['world_size'], 'worker,', s['train_seconds'], 's,', s['data'])" "$RUN/summary.json" >>"$LOG/ddp-1-gpu.log"
fi

echo
echo "---- bench/gpu.py ----"
cat "$LOG/gpu_bench.md"
[[ ${RESULT[bench]} == ok* ]] || { echo "(bench.err's last lines:)"; tail -n 5 "$LOG/bench.err"; }
echo
echo "---- test failures ($(wc -l <"$LOG/failures.txt")) ----"
head -n 40 "$LOG/failures.txt"
echo
echo "gpu_check summary ($((SECONDS - T0)) s; logs in $LOG):"
status=0
for name in tests bench ddp-1-gpu; do
    printf '  %-10s %s\n' "$name" "${RESULT[$name]}"
    [[ ${RESULT[$name]} == ok* ]] || status=1
done
grep -h "captured as a CUDA graph\|not a CUDA graph" "$LOG/gpu_bench.md" | sort | uniq -c | head -n 8
grep -h -A5 "^Ensemble: K stacked" "$LOG/gpu_bench.md"
exit $status
