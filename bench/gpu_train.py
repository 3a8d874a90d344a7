"""GPU training benchmark, prepared to run as is on a CUDA machine: Data2Vec2 ViT-B/16 teacher
(random weights in the fairseq format, so the real loading code runs) distilled into a 6-block
student, bf16 autocast, batch 256, through the real Trainer.

    python bench/gpu_train.py                         # synthetic batches already on the GPU
    python bench/gpu_train.py --shards DIR            # real shards through trainer.data
    python bench/gpu_train.py --compile               # with torch.compile
    python bench/gpu_train.py --tiny --device cpu     # a seconds-long smoke run of this script

Prints one line per timed interval and a summary:
`gpu-train: N images/s, data-wait W%, peak mem M GiB (...)`. Synthetic data measures the
model step alone (data-wait is then the loop's own overhead); --shards adds decoding.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.config import load_config  # noqa: E402
from trainer.errors import UserError  # noqa: E402
from trainer.loop import Trainer  # noqa: E402
from trainer.models.vit import ViTShape, write_fairseq_checkpoint  # noqa: E402


class SyntheticLoader:
    """One normalised random batch made on the device and served `length` times per epoch."""

    def __init__(self, cfg, rank, world_size, device, kind, length=1000):
        dtype = torch.bfloat16 if cfg.output_dtype == "bfloat16" else torch.float32
        g = torch.Generator(device="cpu").manual_seed(rank)
        self.batch = self.make_batch(cfg, g, device, dtype)
        self.length, self.pos, self.epoch = length, 0, 0

    def make_batch(self, cfg, g: torch.Generator, device, dtype) -> dict:
        s = cfg.augment.size
        return {
            "image": torch.randn(cfg.batch_size, 3, s, s, generator=g).to(device, dtype),
            "label": torch.zeros(cfg.batch_size, dtype=torch.long, device=device),
            "is_pad": torch.zeros(cfg.batch_size, dtype=torch.bool, device=device),
        }

    def __len__(self):
        return self.length

    def set_epoch(self, e):
        self.epoch, self.pos = e, 0

    def __iter__(self):
        while self.pos < self.length:
            self.pos += 1
            yield self.batch
        self.set_epoch(self.epoch + 1)

    def state_dict(self):
        return {"epoch": self.epoch, "samples": self.pos}

    def load_state_dict(self, d):
        self.epoch, self.pos = d["epoch"], d["samples"]


def timing_overrides(steps: int, repeats: int) -> list[str]:
    """Config keys of every training benchmark: one log row per timed interval of `steps`,
    `repeats` intervals after a warm-up one, no checkpoints, no TensorBoard."""
    return [f"schedule.max_steps={steps * (1 + repeats)}", f"logging.every_steps={steps}",
            "checkpoint.every_steps=0", "logging.tensorboard=off"]


def add_gpu_arguments(ap, steps: int) -> None:
    """The options gpu_overrides reads: --steps (default `steps`), --repeats, --compile, --device."""
    ap.add_argument("--steps", type=int, default=steps, help="steps per timed interval")
    ap.add_argument("--repeats", type=int, default=3, help="timed intervals after one warm-up interval")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--device", default="cuda")


def gpu_overrides(args) -> list[str]:
    """timing_overrides plus what the GPU benchmarks share: bf16 on --device, --compile."""
    return [*timing_overrides(args.steps, args.repeats), f"device={args.device}", "precision=bf16",
            "teacher.dtype=bfloat16", f"compile={str(args.compile).lower()}"]


def train_and_measure(cfg, loader_factory=None):
    """Train `cfg` to its last step (TF32 matmuls on CUDA), then the medians over the logged
    intervals after the first (a warm-up): (trainer, device name, samples/s, data-wait share,
    peak memory in GiB)."""
    if cfg.device != "cpu" and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    trainer = Trainer(cfg, loader_factory=loader_factory)
    try:
        trainer.train()
    finally:
        trainer.close()
    records = [json.loads(x) for x in (Path(cfg.out_dir) / "log.jsonl").read_text().splitlines()]
    records = [r for r in records if "samples_per_s" in r][1:]  # validation rows out; the warm-up out
    name = torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda" else "cpu"
    return (trainer, name, statistics.median(r["samples_per_s"] for r in records),
            statistics.median(r["data_wait"] for r in records),
            max(r["peak_mem_bytes"] for r in records) / 2**30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="", help="real shards (manifest.json or dir); default synthetic")
    ap.add_argument("--batch", type=int, default=256)
    add_gpu_arguments(ap, steps=20)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers for --shards (0: the config's)")
    ap.add_argument("--tiny", action="store_true", help="small model and images: a smoke run of this script")
    ap.add_argument("--out", default="bench_out/gpu_train")
    args = ap.parse_args()

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    shape = ViTShape(32, 8, 64, 4, 4) if args.tiny else ViTShape(224, 16, 768, 12, 12)
    teacher = write_fairseq_checkpoint(out / "teacher.pt", shape)
    over = [
        f"teacher.checkpoint={teacher}", f"teacher.num_heads={shape.num_heads}", f"out_dir={out / 'run'}",
        *gpu_overrides(args), f"student.depth={2 if args.tiny else 6}",
        f"data.batch_size={args.batch}", f"data.augment.size={shape.img_size}", "data.output_dtype=bfloat16",
    ]
    if args.shards:
        over += [f"data.manifests=[{args.shards}]", "data.decode_device=auto"]
        if args.workers:
            over.append(f"data.num_workers={args.workers}")
    cfg = load_config(REPO / "configs" / "image_kd.yaml", over)
    _, name, ips, wait, peak = train_and_measure(cfg, None if args.shards else SyntheticLoader)
    print(f"device: {name}; torch {torch.__version__}; data: {'shards ' + args.shards if args.shards else 'synthetic'}")
    print(f"gpu-train: {ips:.0f} images/s, data-wait {100 * wait:.1f}%, peak mem {peak:.1f} GiB "
          f"(batch {args.batch}, bf16, {'tiny' if args.tiny else 'ViT-B/16'} teacher + "
          f"{cfg.task_cfg.student.depth}-block student, compile={args.compile})")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
