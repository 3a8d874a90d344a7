#!/usr/bin/env bash
# The GPU checks, as one short call for a session that is lent a GPU machine (see
# docs/benchmarks.md): decode+augment throughput (GPU path against CPU path), one training
# setup in bf16 (ViT-B/16 teacher + 6-block student, batch 256), and the CUDA tests.
# Runs with the machine's own python3 (no installs there: carry missing wheels), from the
# repository root, and writes everything it prints to $OUT (or ./gpu_check_out) too.
set -uo pipefail
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
  echo "== loader: decode + augment images/s"
  timeout 180 "$PY" bench/gpu_loader.py --seconds 8
  echo "== training: bf16, batch 256, ViT-B/16 teacher + 6-block student"
  timeout 180 "$PY" bench/gpu_train.py
  echo "== CUDA tests"
  timeout 180 "$PY" -m pytest -q -m cuda tests
} 2>&1 | tee "$OUT/gpu_check.log"
