#!/usr/bin/env bash
# Prepares, on a machine with internet access (PyPI), what the GPU check needs on a bare GPU
# machine that has only torch and torchvision and no network: simplejpeg wheels (the CPU
# decoder) for CPython 3.10-3.13 on x86-64 Linux, a timm wheel (the multimodal stage's BEiTv2
# teacher), and a copy of the real benchmark photos.
# Everything goes into one ignored folder, gpu_check_data/ (about 25 MB), that travels with
# the check (docs/benchmarks.md, "GPU check"). Run from the repository root: make gpu-check-prep
set -euo pipefail
DATA=${GPU_CHECK_DATA:-gpu_check_data}
IMAGES=${IMAGES:-../shared/bench-images}
PY=${PY:-python3}
VER=${SIMPLEJPEG_VERSION:-$("$PY" -c "import importlib.metadata as m; print(m.version('simplejpeg'))" 2>/dev/null || echo 1.9.0)}
mkdir -p "$DATA/wheels" "$DATA/images"
for v in 3.10 3.11 3.12 3.13; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$v" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DATA/wheels" "simplejpeg==$VER" || echo "note: no simplejpeg $VER wheel for Python $v"
done
# timm (pure Python): the multimodal stage's BEiTv2 teacher is timm's Beit
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DATA/wheels" "timm>=1.0" || echo "note: no timm wheel"
if [ -d "$IMAGES" ]; then
  find "$IMAGES" -maxdepth 1 -type f -exec cp {} "$DATA/images/" \;
  echo "copied $(ls "$DATA/images" | wc -l) photos from $IMAGES"
else
  echo "note: $IMAGES not found: the check will generate photo-like JPEGs instead"
fi
ls "$DATA/wheels"
du -sh "$DATA"
