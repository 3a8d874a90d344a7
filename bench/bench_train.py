"""CPU training benchmark: the demo config (tiny Data2Vec2 teacher, 2-block student, 32 px) on
the demo shards through the real streaming loader, for a fixed number of steps.

    python bench/bench_train.py --shards demo_out/shards/imagenet [--steps 25 --repeats 5]

When the shards are missing (no `make demo` yet) it builds the demo ImageNet and shards it
into bench_out/train/shards first (about 20 s).

The run is cut into one warm-up interval and `--repeats` timed intervals of `--steps` steps;
the figures are medians over the timed intervals (shared machines are noisy). The same steps are
then timed on one synthetic batch held in memory (the baseline: the model step with no data
path), and the ratio printed. Ends with `train: S steps/s, data-wait W%` (the streaming run).
Writes its teacher and runs under bench_out/ (removed first).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.config import load_config  # noqa: E402
from trainer.errors import UserError  # noqa: E402
from trainer.models.vit import ViTShape, write_fairseq_checkpoint  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from gpu_train import SyntheticLoader, timing_overrides, train_and_measure  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="demo_out/shards/imagenet", help="manifest.json or its directory")
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--steps", type=int, default=25, help="optimiser steps per timed interval")
    ap.add_argument("--repeats", type=int, default=5, help="timed intervals (the median is reported)")
    ap.add_argument("--out", default="bench_out/train")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads; 1 by default: on a shared 2-core machine two spinning OpenMP "
                         "threads measured 10-40x slower under load than one")
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    if not (Path(args.shards) / "manifest.json").is_file() and not Path(args.shards).is_file():
        args.shards = str(build_demo_shards(out / "shards"))
    teacher = write_fairseq_checkpoint(out / "teacher.pt", ViTShape(32, 8, 64, 4, 4))
    steps_per_s, wait, trainer = measure(args, teacher, out / "stream", None)
    base_steps_per_s, _, _ = measure(args, teacher, out / "baseline", SyntheticLoader)
    print(f"machine: {trainer.device.type}, {args.threads} thread(s), global batch {trainer.global_batch}, "
          f"{args.repeats} intervals of {args.steps} steps, shards {args.shards}")
    print(f"baseline (one in-memory batch, no data path): {base_steps_per_s:.2f} steps/s; "
          f"streaming runs at {steps_per_s / base_steps_per_s:.2f}x of it")
    print(f"train: {steps_per_s:.2f} steps/s, data-wait {100 * wait:.1f}%")


def build_demo_shards(out: Path) -> Path:
    """The demo ImageNet (scripts/make_demo_imagenet.py) sharded as `make demo` does."""
    print(f"no shards at the given path: building the demo ImageNet shards in {out}", flush=True)
    src = out.parent / "src"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_demo_imagenet.py"), str(src)], check=True)
    subprocess.run([sys.executable, "-m", "shardify", "imagenet", "--source", str(src), "--out", str(out),
                    "--samples-per-shard", "16", "--max-reject-rate", "0.05", "--no-progress"], check=True,
                   cwd=REPO)
    return out


def measure(args, teacher: Path, out: Path, loader_factory):
    """Median steps/s and data-wait share over the timed intervals of one run."""
    cfg = load_config(args.config, [
        f"data.manifests=[{args.shards}]", f"teacher.checkpoint={teacher}", f"out_dir={out}",
        *timing_overrides(args.steps, args.repeats), *args.overrides,
    ])
    trainer, _, samples_per_s, wait, _ = train_and_measure(cfg, loader_factory)
    return samples_per_s / trainer.global_batch, wait, trainer


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
