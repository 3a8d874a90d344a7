#!/usr/bin/env bash
# The GPU check: one call of about 4 minutes on a bare GPU machine that has torch and
# torchvision but no network (docs/benchmarks.md, "GPU check", says how to prepare and run it).
#
#   make gpu-check-prep          # here, with PyPI: simplejpeg wheels + photos into gpu_check_data/
#   bash scripts/gpu_check.sh    # there, from the repository root, gpu_check_data/ carried along
#
# Stages, each with its own timeout inside an overall budget (GPU_CHECK_BUDGET seconds, 420 by
# default), so one stuck stage cannot eat the rest: install simplejpeg from the carried wheels
# (or carry on without it, saying so); build shards of real or photo-like JPEGs; loader images/s
# (GPU path whole, its device stage alone, CPU path); GPU against CPU pixels on the same samples;
# GPU memory over 40 batches; training with synthetic batches and with the GPU loader; the CUDA
# test files. Everything printed goes to $OUT/gpu_check.log (OUT defaults to gpu_check_out);
# the last line is the summary, starting with `GPU-CHECK SUMMARY:`. GPU_CHECK_ONLY="loader memory"
# reruns only the stages named (on a machine still warm, the shards of the first run are reused).
set -uo pipefail
T0=$(date +%s)
OUT=${OUT:-gpu_check_out}
DATA=${GPU_CHECK_DATA:-gpu_check_data}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
BUDGET=${GPU_CHECK_BUDGET:-480}
ONLY=${GPU_CHECK_ONLY:-}  # e.g. "loader compare": rerun only these stages (prepare runs if shards are missing)
PY=${PY:-python3}
CORES=$(nproc 2>/dev/null || echo 8)
WORKERS=$(( CORES > 3 ? CORES - 2 : 1 ))
mkdir -p "$OUT" "$WORK"
LOG="$OUT/gpu_check.log"
STAGES="$OUT/stages.txt"
: > "$STAGES"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1

stage() {  # stage NAME SECONDS COMMAND...: run under its own timeout, cut to what the budget has left
  local name=$1 secs=$2 left t rc
  shift 2
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]] && { [ "$name" != prepare ] || [ -f "$WORK/shards/manifest.json" ]; }; then
    echo "$name=not-selected" >> "$STAGES"
    return
  fi
  left=$(( BUDGET - ($(date +%s) - T0) - 5 ))
  (( secs > left )) && secs=$left
  if (( secs < 10 )); then
    echo "!! $name: skipped, the budget of ${BUDGET}s is spent"
    echo "$name=skipped" >> "$STAGES"
    return
  fi
  echo "== $name (timeout ${secs}s)"
  t=$(date +%s)
  timeout --kill-after=10 "$secs" "$@"
  rc=$?
  if (( rc == 124 || rc == 137 )); then echo "!! $name: timed out after ${secs}s"; fi
  echo "-- $name: exit $rc, $(( $(date +%s) - t ))s"
  echo "$name=$rc" >> "$STAGES"
}

install_wheels() {
  if "$PY" -c "import simplejpeg" 2>/dev/null; then
    echo "simplejpeg: already installed"
  elif ls "$DATA"/wheels/*.whl >/dev/null 2>&1; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" \
        --find-links "$DATA/wheels" simplejpeg; then
      echo "simplejpeg: installed from $DATA/wheels"
    else
      echo "note: simplejpeg did not install from $DATA/wheels: CPU-path stages will say so and skip"
    fi
  else
    echo "note: no $DATA/wheels (run make gpu-check-prep and carry $DATA): CPU-path stages will skip"
  fi
  if ! "$PY" -c "import timm" 2>/dev/null && ls "$DATA"/wheels/timm-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" \
        --find-links "$DATA/wheels" timm && echo "timm: installed from $DATA/wheels" \
      || echo "note: timm did not install from $DATA/wheels: the multimodal stage will say so"
  fi
}

run_all() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "note: nvidia-smi failed"
  "$PY" -c "import sys, torch, torchvision; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"
  echo "cores: $CORES, DataLoader workers: $WORKERS, budget: ${BUDGET}s"
  install_wheels
  [ -d "$WORK/site" ] && export PYTHONPATH="$PYTHONPATH:$WORK/site"
  stage prepare 90 "$PY" bench/gpu_loader.py prepare --out "$WORK/shards" --images "$DATA/images" --samples 8192
  stage loader 100 "$PY" bench/gpu_loader.py loader --shards "$WORK/shards" --workers "$WORKERS" --seconds 8
  stage compare 60 "$PY" bench/gpu_loader.py compare --shards "$WORK/shards" --workers "$WORKERS"
  stage memory 60 "$PY" bench/gpu_loader.py memory --shards "$WORK/shards" --workers "$WORKERS" --batches 40
  stage train_synthetic 90 "$PY" bench/gpu_train.py --out "$WORK/train_synthetic"
  stage train_loader 100 "$PY" bench/gpu_train.py --shards "$WORK/shards" --workers "$WORKERS" --out "$WORK/train_loader"
  # by file: test modules of other parts need packages this machine may not have
  stage cuda_tests 120 "$PY" -m pytest -q -rfEs -p no:cacheprovider tests/test_loader_cuda.py \
    tests/test_train_cuda.py tests/test_loader_gpu_path.py
  # the text and multimodal tasks at thesis batch sizes, bf16 (need transformers: the GPU image has it)
  stage text_kd 90 "$PY" bench/gpu_text_kd.py --steps 5 --repeats 2 --workers "$WORKERS" --out "$WORK/text_kd"
  stage multimodal 110 "$PY" bench/gpu_multimodal.py --steps 5 --repeats 2 --out "$WORK/multimodal"
}

section() {  # the log lines of one stage
  awk -v n="$1" '$0 ~ "^== " n " " {f=1} f {print} $0 ~ "^-- " n ":" {f=0}' "$LOG"
}

summary() {
  local loader compare memory train_s train_l tests text_kd multimodal
  loader=$(section loader | grep -h "^gpu-check: loader" | sed 's/^gpu-check: loader //')
  compare=$(section compare | grep -h "^gpu-check: compare" | sed 's/^gpu-check: compare //')
  memory=$(section memory | grep -h "^gpu-check: memory" | sed 's/^gpu-check: memory //')
  train_s=$(section train_synthetic | grep -h "^gpu-train:" | sed 's/^gpu-train: //; s/ (.*//')
  train_l=$(section train_loader | grep -h "^gpu-train:" | sed 's/^gpu-train: //; s/ (.*//')
  tests=$(section cuda_tests | grep -E "(passed|failed|error).* in [0-9.]+s" | tail -1 | tr -d '=' | xargs)
  text_kd=$(section text_kd | grep -h "^gpu-text-kd:" | sed 's/^gpu-text-kd: //')
  multimodal=$(section multimodal | grep -h "^gpu-multimodal:" | sed 's/^gpu-multimodal: //; s/ (.*//')
  echo "GPU-CHECK SUMMARY: loader [$loader] compare [$compare] memory [$memory]" \
       "train synthetic [$train_s] train with GPU loader [$train_l] tests [$tests]" \
       "text_kd [$text_kd] multimodal [$multimodal]" \
       "stages [$(tr '\n' ' ' < "$STAGES" | xargs)] $(( $(date +%s) - T0 ))s"
}

run_all 2>&1 | tee "$LOG"
summary | tee -a "$LOG"
