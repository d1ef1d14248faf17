#!/usr/bin/env bash
# The systems benchmark (the paper's Table 4 on our model) at paper-like size on ONE CUDA GPU.
#
#   benchmarks/gpu_bench.sh [--out DIR] [--dry-run] [any `onetrans-mini bench` option ...]
#
# Size (the `gpu` suite of onetrans_mini/bench.py): preset S (6 layers, d=256, 4 heads), L_S = 1024
# events, 12 NS tokens; training batch 2048 candidates (128 requests x 16) as 8 micro-batches of 256;
# inference: one request of 100 candidates, p50/p99 of 100 calls; two-stage sweep C = 1..1000; appends
# of 1..256 events to a 1024-event history; the unoptimized rows in fp32 (TF32 off, PyTorch's default
# for matmuls), the mixed-precision rows in bf16. MFU against 989 TFLOP/s (dense bf16 of H100/H200).
# Expected run time on an H100/H200: about 3-5 minutes (the fp32 unoptimized rows dominate).
#
# Writes DIR/gpu.json and DIR/gpu.md (default DIR: benchmarks/results) and prints the table.
#
# --dry-run: the SAME command line on CPU at a tiny size (nano preset, 16 events, 4 requests of 4
# candidates as 2 micro-batches, one repetition): seconds; checks that the script runs end to end and
# measures nothing worth reading. Writes DIR/gpu-dry-run.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=benchmarks/results
DRY=0
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done

PY="${PYTHON:-python}"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if ! "$PY" -c "import onetrans_mini" 2>/dev/null; then
  echo "gpu_bench: onetrans_mini is not importable with $PY; install it first: $PY -m pip install -e ." >&2
  exit 2
fi

start=$(date +%s)
if [ "$DRY" = 1 ]; then
  OMP_WAIT_POLICY=PASSIVE "$PY" -m onetrans_mini bench --suite gpu --device cpu --name gpu-dry-run --out "$OUT" \
    --preset nano --seq-len 16 --ns-tokens 4 --requests 4 --candidates 4 --micro-requests 2 \
    --infer-candidates 4 --sweep-candidates 1,10 --append-cached 12 --append-new 1,4 \
    --reps 1 --latency-reps 3 --warmup 1 --threads 1 --peak-tflops 989 ${EXTRA[@]+"${EXTRA[@]}"}
else
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_bench: CUDA is not available to $PY (torch $("$PY" -c 'import torch; print(torch.__version__)')); " \
         "use --dry-run to check the script on CPU" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -m onetrans_mini bench --suite gpu --device cuda --name gpu --out "$OUT" ${EXTRA[@]+"${EXTRA[@]}"}
fi
echo "gpu_bench: done in $(( $(date +%s) - start )) s; results in $OUT" >&2
