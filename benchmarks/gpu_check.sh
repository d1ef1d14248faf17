#!/usr/bin/env bash
# The GPU check of issue 12, on ONE CUDA GPU, a few minutes:
#
#   benchmarks/gpu_check.sh [--dry-run] [--bench] [--out FILE]
#
# 1. trains `small` on ML-100K for 2 x 100 steps with bf16 autocast on
#    (`onetrans-mini train --dataset movielens-100k --preset small --steps-per-epoch 100 --epochs 2 --bf16 on`;
#    the raw files come from ONETRANS_DATA_DIR, downloaded there on first use if the machine has a network);
# 2. checks on the device that the request-level forward (`model(batch)`: Stage I once per request) equals
#    the per-candidate `model.forward_full`, in fp32 and under bf16 autocast, forward and gradients, and that
#    a user-cache append equals a fresh Stage I, and a Server fed CPU requests scores on the device as the
#    per-candidate mode does;
# 3. with --bench, runs benchmarks/gpu_bench.sh too (the paper-size systems benchmark, results/gpu.*).
#
# Everything it prints also goes to FILE (default benchmarks/results/gpu_check.txt); it stops at the first
# failure (exit status != 0).
#
# --dry-run: the same steps on CPU at a tiny size (preset nano, 2 x 3 steps, bf16 autocast on CPU, which
# PyTorch supports; FILE defaults to /tmp/gpu_check-dry-run.txt): proves the script runs here, measures nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
BENCH=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --bench) BENCH=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "gpu_check: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-python}"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if ! "$PY" -c "import onetrans_mini" 2>/dev/null; then
  echo "gpu_check: onetrans_mini is not importable with $PY; install it first: $PY -m pip install -e ." >&2
  exit 2
fi

if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  TRAIN=(--preset nano --steps-per-epoch 3 --epochs 2 --batch-requests 8 --eval-batch-requests 64)
  PRESET=nano
  OUT="${OUT:-/tmp/gpu_check-dry-run.txt}"
else
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: CUDA is not available to $PY; use --dry-run to check the script on CPU" >&2
    exit 2
  fi
  DEVICE=cuda
  TRAIN=(--preset small --steps-per-epoch 100 --epochs 2)
  PRESET=small
  OUT="${OUT:-benchmarks/results/gpu_check.txt}"
fi
mkdir -p "$(dirname "$OUT")"
RUN=$(mktemp -d)
trap 'rm -rf "$RUN"' EXIT

{
  echo "# benchmarks/gpu_check.sh$([ "$DRY" = 1 ] && echo ' --dry-run'): $(date '+%Y-%m-%d %H:%M:%S'), $(git log -1 --format='%h %s' | cut -c1-90)"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; fi

  echo
  echo "## 1. training with bf16 autocast on $DEVICE"
  start=$(date +%s)
  "$PY" -m onetrans_mini train --dataset movielens-100k --device "$DEVICE" --bf16 on --no-progress --out "$RUN/run" \
    "${TRAIN[@]}"
  echo "trained in $(( $(date +%s) - start )) s"

  echo
  echo "## 2. request-level forward == forward_full on $DEVICE (fp32 and bf16 autocast), user-cache append == fresh Stage I"
  "$PY" - "$DEVICE" "$PRESET" <<'EOF'
import sys

import torch

from onetrans_mini.bench import bench_model, request_batch
from onetrans_mini.serving import Events, Window
from onetrans_mini.user_cache import UserCache, fresh_stage_one

device, preset = torch.device(sys.argv[1]), sys.argv[2]
L = 16 if preset == "nano" else 256
model = bench_model(preset, L, device)
batch = request_batch(4, 16, L, seed=1).to(device)


def run(fwd, bf16):
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits, loss = fwd(batch, batch.labels)
    loss.backward()
    return logits.float().detach(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


failed = False
for bf16, tol in ((False, 1e-4), (True, 5e-2)):
    (a, ga), (b, gb) = run(model, bf16), run(model.forward_full, bf16)
    d_logits = float((a - b).abs().max())
    d_grads = max(float((ga[n] - gb[n]).abs().max() / gb[n].abs().max().clamp_min(1e-12)) for n in gb)
    ok = d_logits < tol and d_grads < 10 * tol and ga.keys() == gb.keys()
    failed |= not ok
    print(f"{'bf16' if bf16 else 'fp32'}: max |logit diff| {d_logits:.2e}, max relative gradient diff {d_grads:.2e} "
          f"(tolerance {tol:g} / {10 * tol:g}): {'ok' if ok else 'FAILED'}")

model.eval()
n = L - 8
b = request_batch(1, 1, L, seed=3).to(device)
ev = Events({k: v[0] for k, v in b.seq.items()}, b.seq_type[0], torch.arange(L, dtype=torch.float64, device=device))
with torch.inference_mode():
    uc = UserCache()
    uc.advance(model, Window(ev.slice(0, n), 0))
    uc.advance(model, Window(ev, 0))
    got, want = uc.request_cache(), fresh_stage_one(model, Window(ev, 0))
    d = max(float((x.k - y.k).abs().max()) for x, y in zip(got.layers, want.layers))
ok = d < 1e-4
failed |= not ok
print(f"user cache: append 8 events to {n} == fresh Stage I of {L}: max |key diff| {d:.2e}: {'ok' if ok else 'FAILED'}")

# the Server: requests built on the CPU, scored on the device; the cached mode equals the per-candidate one
from onetrans_mini.serving import Request, Server

cpu_ev, ns = ev.to("cpu"), {k: v.cpu() for k, v in request_batch(1, 8, L, seed=4).ns.items()}
servers = {m: Server(model, m) for m in ("none", "both")}
d = 0.0
for a, z in ((0, n // 2), (n // 2, n), (n, L)):
    out = {m: srv.score(Request(0, new_events=cpu_ev.slice(a, z), ns=ns)) for m, srv in servers.items()}
    d = max(d, float((out["both"] - out["none"]).abs().max()))
ok = d < 1e-4 and out["both"].device.type == device.type
failed |= not ok
print(f"server: CPU requests scored on {device.type}, cached == per-candidate over 3 appends: max |logit diff| {d:.2e}: "
      f"{'ok' if ok else 'FAILED'}")
sys.exit(1 if failed else 0)
EOF

  if [ "$BENCH" = 1 ]; then
    echo
    echo "## 3. the systems benchmark"
    if [ "$DRY" = 1 ]; then benchmarks/gpu_bench.sh --dry-run --out "$RUN/bench"; else benchmarks/gpu_bench.sh; fi
  fi
  echo
  echo "gpu_check: all checks passed"
} 2>&1 | tee "$OUT"
echo "gpu_check: output in $OUT" >&2
