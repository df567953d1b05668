#!/usr/bin/env bash
# The GPU benchmark of issue 8, one prepared run on one H100/H200 with no internet:
#   here:  bash benchmarks/fetch_wheels.sh
#   there: bash benchmarks/gpu.sh            (device run: carry [".whl"], writes under $OUT)
# It measures the bf16 matmul peak, then MD4-S training (configs/owt_small.yaml: seq 1024, GPT-2
# vocabulary; batch 32 per GPU, the issue's shape, as D3PM's all-state posteriors need the memory)
# through `md4 fit` one lever at a time, GenMD4/SEDD/D3PM at the same shape, and sampling
# (the config's 1000 steps, batch 32), and prints one table. Each training row is a fresh process.
# Dry run on the CPU (a few minutes): CONFIG=configs/owt_tiny.yaml BATCH=8 bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=python3  # the GPU image's Python; here, the project's venv
[ -x .venv/bin/python ] && PY=.venv/bin/python
if [ -d .whl ] && ! "$PY" -c "import jsonargparse, torch_fidelity" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$OUT/gpu.txt" || true
"$PY" -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
"$PY" -m benchmarks.speed --config "${CONFIG:-configs/owt_small.yaml}" --batch "${BATCH:-32}" --sample-batch 32 \
  --warmup 10 --steps 30 --methods "${METHODS:-all}" --work /tmp/md4_speed --out "$OUT" \
  2>&1 | tee "$OUT/speed.log"
