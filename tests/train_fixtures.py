"""Fixtures for the trainer tests: tiny image shards, the real loader or a stand-in, tiny configs.

Data: when `trainer.data.build_loader` exists (the streaming loader is merged), the tests train
on tiny real shards written here in the docs/format.md layout, through the real loader;
otherwise on `build_fake_loader`. `USE_REAL_SHARDS` is that one switch.

`build_fake_loader` follows the loader contract (docs in trainer/data): the order of an epoch is
a pure function of (seed, epoch); rank r of W takes its slice of each global batch, so every
rank has the same number of batches and a run can resume on another process count; the state
is (epoch, samples consumed). Images are random but a pure function of (seed, sample id), so
two runs see identical data. Swap to real shards by dropping the `loader=` override and setting
`data.manifests` (see `tiny_overrides`).

Fault injection for the kill-and-resume test (either loader): with FAKE_LOADER_KILL_AT=N in the
environment, the process SIGKILLs itself when asked for its N-th batch (counted from 0 over the
whole run).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainer.models.vit import ViTShape, write_fairseq_checkpoint

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
FAKE_SAMPLES = 48  # dataset size; global batches per epoch = FAKE_SAMPLES // global batch


def _real_loader_available() -> bool:
    if importlib.util.find_spec("trainer.data.loader") is None:
        return False
    import trainer.data

    return hasattr(trainer.data, "build_loader")


USE_REAL_SHARDS = _real_loader_available()


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
            self.served += 1
            yield batch


def build_real_loader(cfg, rank, world_size, device, kind):
    """trainer.data.build_loader, with the fault injection hook."""
    from trainer.data import build_loader

    return KillAt(build_loader(cfg, rank, world_size, device, kind), kill_at_from_env())


def write_image_shards(root: Path, n: int = FAKE_SAMPLES, per_shard: int = 10) -> Path:
    """n JPEGs of odd sizes with cls and json, over ceil(n/per_shard) shards, plus manifest.json."""
    root.mkdir(parents=True, exist_ok=True)
    shards, i = [], 0
    for s in range((n + per_shard - 1) // per_shard):
        name = f"train-{s:06d}.tar"
        keys = []
        with tarfile.open(root / name, "w", format=tarfile.USTAR_FORMAT) as tf:
            for _ in range(min(per_shard, n - i)):
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
    split = {"samples": n, "inputs": n, "rejected": 0, "bytes": sum(x["bytes"] for x in shards), "shards": shards}
    manifest = {"schema_version": 1, "tool": {"name": "trainer-tests", "version": "0"}, "dataset": "fixture",
                "source": {}, "options": {}, "fields": ["cls", "jpg", "json"], "classes": [str(c) for c in range(10)],
                "splits": {"train": split}, "totals": {k: split[k] for k in ("samples", "inputs", "rejected", "bytes")}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


class FakeImageLoader:
    def __init__(self, cfg, rank: int, world_size: int, device: torch.device, kind: str):
        assert kind == "image"
        self.cfg, self.rank, self.world, self.device = cfg, rank, world_size, device
        self.global_batch = cfg.batch_size * world_size
        self.epoch = 0
        self.consumed = 0  # samples of this epoch consumed by all ranks together

    def __len__(self) -> int:
        return FAKE_SAMPLES // self.global_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.consumed = epoch, 0

    def _image(self, sample: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.cfg.seed * 100003 + sample)
        s = self.cfg.augment.size
        return torch.randn(3, s, s, generator=g)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.epoch)
        order = torch.randperm(FAKE_SAMPLES, generator=g).tolist()
        while self.consumed + self.global_batch <= FAKE_SAMPLES:
            start = self.consumed + self.rank * self.cfg.batch_size
            ids = order[start : start + self.cfg.batch_size]
            batch = {
                "image": torch.stack([self._image(i) for i in ids]).to(self.device),
                "label": torch.tensor([i % 10 for i in ids]).to(self.device),
                "key": [f"fake_{i:05d}" for i in ids],
                "is_pad": torch.zeros(len(ids), dtype=torch.bool, device=self.device),
            }
            # count the batch as consumed once it is handed out, like the real loader's state
            self.consumed += self.global_batch
            yield batch
        self.set_epoch(self.epoch + 1)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, d: dict) -> None:
        assert d["consumed"] % self.global_batch == 0, "resume needs the same global batch"
        self.epoch, self.consumed = d["epoch"], d["consumed"]


def build_fake_loader(cfg, rank, world_size, device, kind):
    return KillAt(FakeImageLoader(cfg, rank, world_size, device, kind), kill_at_from_env())


def make_teacher(path: Path, dim: int = 32, depth: int = 3, heads: int = 2, patch: int = 8, img: int = 16) -> Path:
    return write_fairseq_checkpoint(path, ViTShape(img, patch, dim, depth, heads), seed=0)


def tiny_overrides(tmp: Path, teacher: Path, **extra) -> list[str]:
    """A deterministic CPU config on top of configs/demo.yaml: real shards through the real
    loader when it is there (written once per test directory), else the stand-in loader."""
    data = {"loader": "tests.train_fixtures:build_fake_loader"}
    if USE_REAL_SHARDS:
        shards = tmp / "shards"  # the writer is deterministic: every run directory gets the same data
        if not (shards / "manifest.json").is_file():
            write_image_shards(shards)
        data = {"loader": "tests.train_fixtures:build_real_loader", "data.manifests": f"[{shards}]"}
    over = {
        "out_dir": str(tmp / "run"),
        **data,
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
