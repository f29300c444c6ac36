#!/usr/bin/env bash
# For a maintainer with a CUDA machine: the GPU side of nnfit in one go, in under 5 minutes.
#   bash scripts/gpu_check.sh
# 1. the tests marked `cuda` (placement, precision, OOM recovery under a real allocation cap,
#    streaming a dataset larger than that cap); 2. the throughput benchmark on CUDA (bench/scale.py:
#    4 -> 512x512x512 -> 1, 200k samples, fp32 and bf16);
# 3. a 1-GPU DDP run through torchrun. Prints a summary; exits non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
LOG=${GPU_CHECK_LOG:-$(mktemp -d)/gpu_check}
mkdir -p "$LOG"
declare -A RESULT

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU visible to $PY (torch $("$PY" -c 'import torch; print(torch.__version__)')); nothing to check"
    exit 1
fi
"$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'gpu_check: {torch.cuda.device_count()} x {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}')"

step() {  # step NAME TIMEOUT COMMAND...
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    echo "== $name"
    if timeout "$limit" "$@" >"$LOG/$name.log" 2>&1; then RESULT[$name]="ok"; else RESULT[$name]="FAILED (exit $?)"; fi
    RESULT[$name]="${RESULT[$name]} in $((SECONDS - start)) s"
    tail -n 15 "$LOG/$name.log"
}

step cuda-tests 180 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_memory.py tests/test_devices.py
step throughput 120 "$PY" bench/scale.py --device cuda
RUN=$(mktemp -d)/ddp1
step ddp-1-gpu 120 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m nnfit train \
    --formula "sin(a)*cos(b) + c*d" --domain a=0:3 --domain b=0:3 --domain c=-1:1 --domain d=-1:1 \
    --samples 200000 --hidden 512,512,512 --optimizer adam --batch-size 4096 --epochs 3 --device cuda \
    --no-plots --out "$RUN"
if [ -f "$RUN/summary.json" ]; then
    "$PY" -c "import json,sys; s=json.load(open(sys.argv[1])); print('ddp-1-gpu:', s['world_size'], 'worker,', s['train_seconds'], 's,', s['data'], '; peak', s['peak_memory']['human'])" "$RUN/summary.json" | tee -a "$LOG/ddp-1-gpu.log"
fi

echo
echo "gpu_check summary (logs in $LOG):"
status=0
for name in cuda-tests throughput ddp-1-gpu; do
    printf '  %-12s %s\n' "$name" "${RESULT[$name]}"
    [[ ${RESULT[$name]} == ok* ]] || status=1
done
exit $status
