"""Checkpoints: atomic writes, keep-last-K plus the best, latest lookup, and RNG state capture.

A checkpoint is one `step_XXXXXXXX.pt` file holding everything needed to continue exactly:
student, optimiser, scheduler, grad scaler, step, the loader's few integers, the task's state
and every rank's RNG states; and a self-description (task name, resolved config, student
architecture) from which `trainer export` rebuilds the student without the teacher file.
The one with the lowest validation loss is also kept as `best.pt`, outside the keep-last-K
rotation. Files are written to a temporary name, fsynced and renamed, so a run killed
mid-write never leaves a file that `resume=auto` would pick up half-written. A write that fails
(disk full, quota) is one UserError naming the file; the previous checkpoint stays.

Checkpoints are read with `torch.load(weights_only=True)`: tensors, numbers, strings and
containers only, so loading a checkpoint someone sent never runs code from its pickle.
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
CHECKPOINT_FORMAT = 2  # 2: self-describing, weights_only-loadable (format 1 pickled numpy RNG state)
BEST_NAME = "best.pt"


def rng_state() -> dict:
    """Every RNG a training step may draw from (dropout, init, numpy/python in user code)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        # as a tensor and plain numbers: a weights_only load accepts no numpy arrays
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuples(x):
    """random.setstate wants the nested tuples back (a round trip may give lists)."""
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


class _KeepWriteError:
    """The file torch.save writes through, keeping the first OSError of a write: torch turns it
    into a RuntimeError that names neither the cause nor the file ("[enforce fail at
    inline_container.cc:672] . unexpected pos")."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def _write_atomic(state: dict, final: Path, kept: str = "") -> None:
    """Write, fsync, rename. A failed write (disk full, signal) leaves nothing behind; an
    OSError anywhere (ENOSPC, EDQUOT, EIO, ...) is one UserError naming the file, with `kept`
    (what is still there) appended."""
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    sink = None
    try:
        try:
            with open(tmp, "wb") as f:
                sink = _KeepWriteError(f)
                torch.save(state, sink)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        # make the rename itself durable before anything older is deleted
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except (OSError, RuntimeError) as e:
        cause = e if isinstance(e, OSError) else (sink.error if sink is not None else None)
        if cause is None:
            raise  # not an I/O error: a bug, keep its traceback
        raise UserError(f"cannot write checkpoint {final}: {cause.strerror or cause}{kept}") from None


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
        final = self.path_for(step)
        self._write(state, final)
        for old in self.list()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return final

    @property
    def best_path(self) -> Path:
        return self.dir / BEST_NAME

    def save_best(self, state: dict) -> Path | None:
        """Replace best.pt (kept whatever keep_last says)."""
        if not self.is_main:
            return None
        self._write(state, self.best_path)
        return self.best_path

    def _write(self, state: dict, final: Path) -> None:
        prev = self.latest()
        kept = (f" (the previous checkpoint {prev.name} is kept: free space, then continue with resume=auto)"
                if prev is not None else "")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create checkpoint directory {self.dir}: {e.strerror or e}") from None
        _write_atomic(state, final, kept)

    @staticmethod
    def load(path: str | Path) -> dict:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"checkpoint not found: {p}")
        try:
            # weights_only: tensors and containers only, never code from the file's pickle
            return torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise UserError(f"checkpoint {p} could not be read safely ({type(e).__name__}: {first[:300]}); "
                            f"checkpoints from before format {CHECKPOINT_FORMAT} cannot be resumed") from None
