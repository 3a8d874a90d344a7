#!/usr/bin/env bash
# `make demo`: the whole pipeline on a small embedded dataset, on a fresh machine, offline.
# PY (the venv's python) and DEMO_OUT come from the Makefile.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${DEMO_OUT:-demo_out}
rm -rf "$OUT"
mkdir -p "$OUT"

echo "== 1. a small ImageNet in the hub archive layout"
"$PY" scripts/make_demo_imagenet.py "$OUT/src/imagenet"

echo "== 2. shardify it (2 workers; 2 of 156 train images are broken on purpose)"
"$PY" -m shardify imagenet --source "$OUT/src/imagenet" --out "$OUT/shards/imagenet" \
    --samples-per-shard 16 --workers 2 --max-reject-rate 0.05

echo "== 3. verify every byte and decode every image"
"$PY" -m shardify verify "$OUT/shards/imagenet" --full

echo "== 4. inspect, with a contact sheet"
"$PY" -m shardify inspect "$OUT/shards/imagenet" --grid "$OUT/imagenet-grid.png" -n 32
