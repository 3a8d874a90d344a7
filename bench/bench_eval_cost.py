"""What each thesis evaluation costs at full scale: a measured CPU step, counted FLOPs, a GPU estimate.

    python bench/bench_eval_cost.py [--batch 4] [--repeats 3]

For each protocol of `trainer eval` it builds the thesis-sized model (random weights: cost does not
depend on them), times one training step on this CPU (forward, backward, AdamW) at a small batch,
counts the step's FLOPs with torch's FlopCounterMode, and scales to the thesis's run (its epochs,
data-set size and batch): total FLOPs = FLOPs per sample x samples seen (+ the evaluation
passes). The GPU time is total FLOPs / the rate the thesis's own image KD run achieved on its
RTX 4090 (10 ImageNet epochs of a 12-block teacher forward plus a 6-block student step in 6.9 h;
the same counting gives that rate, so the estimate carries the thesis's real data-loading and
mixed-precision overheads). The CPU figures are printed beside it: CPU seconds per sample and the
ratio of the two rates.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

THESIS_KD_HOURS = 6.9  # image KD on one RTX 4090 (REFERENCE: cost reported)
IMAGENET_TRAIN, IMAGENET_VAL = 1_281_167, 50_000


def vit(depth: int):
    from trainer.models.vit import Data2Vec2ViT, LastBlockTokens, ViTShape

    return LastBlockTokens(Data2Vec2ViT(ViTShape(depth=depth)))


def bert(layers: int):
    import transformers

    cfg = transformers.BertConfig(num_hidden_layers=layers)
    return transformers.BertModel(cfg, add_pooling_layer=True)


def count_and_time(step, repeats: int) -> tuple[float, float]:
    """(FLOPs of one call, median seconds of one call)."""
    with FlopCounterMode(display=False) as fc:
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return float(fc.get_total_flops()), sorted(times)[len(times) // 2]


def train_step(model: nn.Module, forward, params=None):
    opt = torch.optim.AdamW(params if params is not None else model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        forward().float().sum().backward()
        opt.step()
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    B = args.batch
    img = torch.randn(B, 3, 224, 224)

    # calibration: the thesis's image KD sample = 12-block teacher forward + 6-block student step
    teacher, student = vit(12).eval(), vit(6)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        teacher(img)
    kd_teacher = fc.get_total_flops() / B
    kd_student, _ = count_and_time(train_step(student, lambda: student(img)), 1)
    kd_per_sample = kd_teacher + kd_student / B
    gpu_rate = kd_per_sample * 10 * IMAGENET_TRAIN / (THESIS_KD_HOURS * 3600)
    del teacher

    rows = []
    # image fine-tuning / linear probe: 6-block student + head, 15 epochs at 224 px; eval passes every epoch
    from trainer.eval.finetune import ImageClassifier

    for linear in (False, True):
        clf = ImageClassifier(vit(6), 768, 1000, linear=linear)
        params = [p for p in clf.parameters() if p.requires_grad]
        flops, sec = count_and_time(train_step(clf, lambda m=clf: m(img), params), args.repeats)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            clf(img)
        fwd = fc.get_total_flops() / B
        for name, n_train, n_val in (("ImageNet-1k", IMAGENET_TRAIN, IMAGENET_VAL), ("CIFAR-10/100", 50_000, 10_000)):
            total = 15 * (n_train * flops / B + n_val * fwd)
            rows.append((f"{'linear' if linear else 'finetune'} {name}", flops / B, sec / B, total))
    # GLUE: 6-layer BERT with pooler, 256 tokens (the thesis pads to the batch's longest; 256 is the bound)
    model = bert(6)
    ids = torch.randint(0, 30000, (B, 256))
    flops, sec = count_and_time(train_step(model, lambda: model(input_ids=ids).pooler_output), args.repeats)
    glue = {"mnli": (392_702, 10, 19_647), "qqp": (363_846, 10, 40_430), "qnli": (104_743, 10, 5_463),
            "sst2": (67_349, 10, 872), "cola": (8_551, 20, 1_043), "stsb": (5_749, 20, 1_500),
            "mrpc": (3_668, 20, 408), "rte": (2_490, 20, 277), "wnli": (635, 20, 71)}
    total = sum(ep * (n * flops / B + v * flops / B / 3) for n, ep, v in glue.values())
    rows.append(("GLUE, 9 tasks (256 tokens)", flops / B, sec / B, total))
    # retrieval fine-tuning: 6-block ViT + 6-layer BERT (64 tokens) + shared block; 20 epochs
    towers = nn.ModuleDict({"image": vit(6), "text": bert(6)})
    cap = torch.randint(0, 30000, (B, 64))
    flops, sec = count_and_time(train_step(towers, lambda: towers["image"](img)[:, 0].sum()
                                           + towers["text"](input_ids=cap).last_hidden_state[:, 0].sum()),
                                args.repeats)
    for name, pairs in (("retrieval-finetune COCO (566k pairs)", 566_747),
                        ("retrieval-finetune Flickr30k (145k)", 145_000)):
        rows.append((name, flops / B, sec / B, 20 * pairs * flops / B))

    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load {os.getloadavg()[0]:.1f}; batch {B}")
    print(f"calibration: thesis image KD {kd_per_sample / 1e9:.1f} GFLOP/sample x 10 epochs in "
          f"{THESIS_KD_HOURS} h on an RTX 4090 = {gpu_rate / 1e12:.1f} TFLOP/s achieved")
    print("| evaluation | GFLOP per training sample | CPU s per sample (measured) | CPU TFLOP/s | "
          "total PFLOP (thesis scale) | RTX 4090 hours (est.) | GPU/CPU rate |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, f, s, total in rows:
        cpu_rate = f / s
        print(f"| {name} | {f / 1e9:.1f} | {s:.3f} | {cpu_rate / 1e12:.3f} | {total / 1e15:.1f} | "
              f"{total / gpu_rate / 3600:.2f} | {gpu_rate / cpu_rate:.0f}x |")


if __name__ == "__main__":
    main()
