"""CPU training benchmark: the demo config (tiny Data2Vec2 teacher, 2-block student, 32 px) on
the demo shards through the real streaming loader, for a fixed number of steps.

    python bench/bench_train.py --shards demo_out/shards/imagenet [--steps 10 --repeats 3]

The run is cut into one warm-up interval and `--repeats` timed intervals of `--steps` steps;
the figures are medians over the timed intervals (shared machines are noisy). Ends with
`train: S steps/s, data-wait W%`. Writes its teacher and run under bench_out/ (removed first).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="demo_out/shards/imagenet", help="manifest.json or its directory")
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--steps", type=int, default=10, help="optimiser steps per timed interval")
    ap.add_argument("--repeats", type=int, default=3, help="timed intervals (the median is reported)")
    ap.add_argument("--out", default="bench_out/train")
    ap.add_argument("--loader", default="trainer.data:build_loader",
                    help="loader factory (tests.train_fixtures:build_fake_loader: synthetic, no shards)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads; 1 by default: on a shared 2-core machine two spinning OpenMP "
                         "threads measured 10-40x slower under load than one")
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    teacher = write_fairseq_checkpoint(out / "teacher.pt", ViTShape(32, 8, 64, 4, 4))
    steps = args.steps * (1 + args.repeats)
    cfg = load_config(args.config, [
        f"data.manifests=[{args.shards}]", f"teacher.checkpoint={teacher}", f"out_dir={out / 'run'}",
        f"loader={args.loader}", f"schedule.max_steps={steps}", f"logging.every_steps={args.steps}",
        "checkpoint.every_steps=0", "logging.tensorboard=off", *args.overrides,
    ])
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    records = [json.loads(x) for x in (out / "run" / "log.jsonl").read_text().splitlines()][1:]  # drop warm-up
    steps_per_s = statistics.median(r["samples_per_s"] / trainer.global_batch for r in records)
    wait = statistics.median(r["data_wait"] for r in records)
    print(f"machine: {trainer.device.type}, {args.threads} thread(s), global batch {trainer.global_batch}, {len(records)} intervals "
          f"of {args.steps} steps, loader {args.loader}")
    print(f"train: {steps_per_s:.2f} steps/s, data-wait {100 * wait:.1f}%")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
