"""Fixtures for the trainer tests: a stand-in for trainer.data.build_loader and tiny configs.

`build_fake_loader` follows the loader contract (docs in trainer/data): the order of an epoch is
a pure function of (seed, epoch); rank r of W takes its slice of each global batch, so every
rank has the same number of batches and a run can resume on another process count; the state
is (epoch, samples consumed). Images are random but a pure function of (seed, sample id), so
two runs see identical data. Swap to real shards by dropping the `loader=` override and setting
`data.manifests` (see `tiny_overrides`).

Fault injection for the kill-and-resume test: with FAKE_LOADER_KILL_AT=N in the environment,
the process SIGKILLs itself when asked for its N-th batch (counted from 0 over the whole run).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

from trainer.models.vit import ViTShape, write_fairseq_checkpoint

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
FAKE_SAMPLES = 48  # dataset size; global batches per epoch = FAKE_SAMPLES // global batch


class FakeImageLoader:
    def __init__(self, cfg, rank: int, world_size: int, device: torch.device, kind: str):
        assert kind == "image"
        self.cfg, self.rank, self.world, self.device = cfg, rank, world_size, device
        self.global_batch = cfg.batch_size * world_size
        self.epoch = 0
        self.consumed = 0  # samples of this epoch consumed by all ranks together
        self.served = 0  # batches served by this process (for fault injection)
        self.kill_at = int(os.environ.get("FAKE_LOADER_KILL_AT", "-1"))

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
            if self.served == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
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
            self.served += 1
            yield batch
        self.set_epoch(self.epoch + 1)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "samples": self.consumed}

    def load_state_dict(self, d: dict) -> None:
        assert d["samples"] % self.global_batch == 0, "resume needs the same global batch"
        self.epoch, self.consumed = d["epoch"], d["samples"]


def build_fake_loader(cfg, rank, world_size, device, kind):
    return FakeImageLoader(cfg, rank, world_size, device, kind)


def make_teacher(path: Path, dim: int = 32, depth: int = 3, heads: int = 2, patch: int = 8, img: int = 16) -> Path:
    return write_fairseq_checkpoint(path, ViTShape(img, patch, dim, depth, heads), seed=0)


def tiny_overrides(tmp: Path, teacher: Path, **extra) -> list[str]:
    """A deterministic CPU config on top of configs/demo.yaml, data from the fake loader."""
    over = {
        "out_dir": str(tmp / "run"),
        "loader": "tests.train_fixtures:build_fake_loader",  # real shards: drop this, set data.manifests
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
