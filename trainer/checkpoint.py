"""Checkpoints: atomic writes, keep-last-K, latest lookup, and RNG state capture.

A checkpoint is one `step_XXXXXXXX.pt` file holding everything needed to continue exactly:
student, optimiser, scheduler, grad scaler, step, the loader's few integers and every rank's
RNG states. It is written to a temporary name, fsynced and renamed, so a run killed mid-write
never leaves a file that `resume=auto` would pick up half-written.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from trainer.errors import UserError

_NAME = re.compile(r"^step_(\d{8})\.pt$")


def rng_state() -> dict:
    """Every RNG a training step may draw from (dropout, init, numpy/python in user code)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    """Saves (rank 0 only) into `directory`, keeping the newest `keep_last` files."""

    def __init__(self, directory: str | Path, keep_last: int, is_main: bool):
        self.dir = Path(directory)
        self.keep_last = keep_last
        self.is_main = is_main

    def path_for(self, step: int) -> Path:
        return self.dir / f"step_{step:08d}.pt"

    def list(self) -> list[Path]:
        """Complete checkpoints, oldest first (temporary files are never listed)."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        ckpts = self.list()
        return ckpts[-1] if ckpts else None

    def save(self, state: dict, step: int) -> Path | None:
        if not self.is_main:
            return None
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.path_for(step)
        tmp = final.with_name(final.name + f".tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a failed write (disk full, signal) leaves nothing behind
            raise
        # make the rename itself durable before deleting older checkpoints
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        for old in self.list()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return final

    @staticmethod
    def load(path: str | Path) -> dict:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"checkpoint not found: {p}")
        try:
            # our own files: RNG states hold numpy arrays and tuples, so not weights_only
            return torch.load(p, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"checkpoint {p} could not be read: {type(e).__name__}: {e}") from None
