"""Fixtures for the trainer tests: tiny image shards, the loader with a kill hook, tiny configs.

The tests train on tiny shards written here in the docs/format.md layout (deterministic JPEGs of
odd sizes), through the real streaming loader (`trainer.data.build_loader`).

Fault injection for the kill-and-resume test: `python -m tests.train_fixtures CONFIG key=value...`
trains through the real loader wrapped in a hook; with FAKE_LOADER_KILL_AT=N in the environment,
the process SIGKILLs itself when asked for its N-th batch (counted from 0 over the whole run).
With FAKE_LOADER_SIGNAL_AT=N:SIGNAME[:parent|:group], rank 0 sends that signal to itself (or to
its parent, e.g. torchrun, or to its whole process group) at its N-th batch and waits until the
signal has reached it, so the stop comes at a known step.
"""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from trainer.models.vit import ViTShape, write_fairseq_checkpoint

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
SAMPLES = 48  # size of the fixture dataset


def kill_at_from_env() -> int:
    return int(os.environ.get("FAKE_LOADER_KILL_AT", "-1"))


class KillAt:
    """Wraps a loader; SIGKILLs the process when batch number `kill_at` (whole run) is asked for."""

    def __init__(self, inner, kill_at: int):
        self.inner, self.kill_at, self.served = inner, kill_at, 0

    def __len__(self):
        return len(self.inner)

    def set_epoch(self, e):
        self.inner.set_epoch(e)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, d):
        self.inner.load_state_dict(d)

    def __iter__(self):
        for batch in self.inner:
            if self.served == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            signal_at_from_env(self.served)
            self.served += 1
            yield batch


def signal_at_from_env(served: int) -> None:
    """FAKE_LOADER_SIGNAL_AT=N:SIGNAME[:parent|:group] (rank 0 only): signal, then wait until it arrived."""
    import time

    from trainer import signals

    spec = os.environ.get("FAKE_LOADER_SIGNAL_AT", "").split(":")
    if len(spec) < 2 or int(spec[0]) != served or os.environ.get("RANK", "0") != "0":
        return
    sig = getattr(signal, spec[1])
    if spec[2:] == ["group"]:  # every process of the group, loader workers too (as SLURM signals a job step)
        os.killpg(os.getpgid(0), sig)
    else:
        os.kill(os.getppid() if spec[2:] == ["parent"] else os.getpid(), sig)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not ((s := signals.current()) and s.requested):
        time.sleep(0.02)


def build_real_loader(cfg, rank, world_size, device, kind):
    """trainer.data.build_loader, with the fault injection hook."""
    from trainer.data import build_loader

    return KillAt(build_loader(cfg, rank, world_size, device, kind), kill_at_from_env())


def _write_split(root: Path, split: str, n: int, per_shard: int, first: int) -> dict:
    shards, i = [], first
    for s in range((n + per_shard - 1) // per_shard):
        name = f"{split}-{s:06d}.tar"
        keys = []
        with tarfile.open(root / name, "w", format=tarfile.USTAR_FORMAT) as tf:
            for _ in range(min(per_shard, first + n - i)):
                key = f"img_{i:05d}"
                rng = np.random.default_rng(i)
                h, w = 20 + (7 * i) % 30, 20 + (11 * i) % 40
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
                meta = {"source": "test", "width": w, "height": h, "format": "jpeg"}
                for ext, data in (("cls", str(i % 10).encode()), ("jpg", buf.getvalue()),
                                  ("json", json.dumps(meta).encode())):
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
                keys.append(key)
                i += 1
        shards.append({"name": name, "samples": len(keys), "inputs": len(keys), "rejected": 0,
                       "bytes": (root / name).stat().st_size, "sha256": "", "first_key": keys[0],
                       "last_key": keys[-1]})
    return {"samples": n, "inputs": n, "rejected": 0, "bytes": sum(x["bytes"] for x in shards), "shards": shards}


def write_image_shards(root: Path, n: int = SAMPLES, per_shard: int = 10, val: int = 0) -> Path:
    """n JPEGs of odd sizes with cls and json, over ceil(n/per_shard) shards, plus manifest.json;
    with val > 0 also a "validation" split of `val` more images."""
    root.mkdir(parents=True, exist_ok=True)
    splits = {"train": _write_split(root, "train", n, per_shard, 0)}
    if val:
        splits["validation"] = _write_split(root, "validation", val, per_shard, n)
    totals = {k: sum(sp[k] for sp in splits.values()) for k in ("samples", "inputs", "rejected", "bytes")}
    manifest = {"schema_version": 1, "tool": {"name": "trainer-tests", "version": "0"}, "dataset": "fixture",
                "source": {}, "options": {}, "fields": ["cls", "jpg", "json"], "classes": [str(c) for c in range(10)],
                "splits": splits, "totals": totals}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def make_teacher(path: Path, dim: int = 32, depth: int = 3, heads: int = 2, patch: int = 8, img: int = 16) -> Path:
    return write_fairseq_checkpoint(path, ViTShape(img, patch, dim, depth, heads), seed=0)


def tiny_overrides(tmp: Path, teacher: Path, **extra) -> list[str]:
    """A deterministic CPU config on top of configs/demo.yaml, on tiny shards (written once per
    test directory) through the real loader with the kill hook."""
    shards = tmp / "shards"  # the writer is deterministic: every run directory gets the same data
    if not (shards / "manifest.json").is_file():
        write_image_shards(shards)
    over = {
        "out_dir": str(tmp / "run"),
        "data.manifests": f"[{shards}]",
        "teacher.checkpoint": str(teacher),
        "teacher.dtype": "float32",
        "precision": "fp32",
        "device": "cpu",
        "student.depth": 2,
        "data.batch_size": 8,
        "data.augment.size": 16,
        "data.num_workers": 0,
        "schedule.max_steps": 8,
        "schedule.warmup_steps": 2,
        "checkpoint.every_steps": 4,
        "logging.every_steps": 2,
        "logging.tensorboard": "off",
        "optim.lr": 1e-3,
        "optim.scale_lr": False,  # lr 1e-3 as is: the weights move visibly in 8 steps
        "optim.grad_clip": 1.0,
    }
    over.update(extra)
    return [f"{k}={v}" for k, v in over.items()]


def train_in_process(config, overrides: list[str]):
    """Train `config` with `overrides` to its last step in this process, on one thread as the
    subprocess runs do (spinning OpenMP threads crawl on a shared 2-core machine); returns the
    closed Trainer."""
    import torch

    from trainer.config import load_config
    from trainer.loop import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(load_config(config, overrides))
        try:
            trainer.train()
        finally:
            trainer.close()
    finally:
        torch.set_num_threads(threads)
    return trainer


if __name__ == "__main__":  # python -m tests.train_fixtures CONFIG key=value ... (also under torchrun)
    import sys

    from trainer.cli import train
    from trainer.errors import UserError

    try:
        train(sys.argv[1], sys.argv[2:], loader_factory=build_real_loader)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
