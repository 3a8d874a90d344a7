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

import io
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch

from trainer.errors import UserError
from trainer.rundir import LocalStore, RemoteStore, check_bucket, open_store, scheme_of

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


def _write_local(store: LocalStore, state: dict, name: str, kept: str = "") -> Path:
    """torch.save into the store's atomic write (temporary name, fsync, rename). A failed write
    (disk full, signal) leaves nothing behind; an OSError anywhere (ENOSPC, EDQUOT, EIO, ...) is
    one UserError naming the file, with `kept` (what is still there) appended."""
    sink = None

    def fill(f) -> None:
        nonlocal sink
        sink = _KeepWriteError(f)
        torch.save(state, sink)

    try:
        return store.write(name, fill)
    except (OSError, RuntimeError) as e:
        cause = e if isinstance(e, OSError) else (sink.error if sink is not None else None)
        if cause is None:
            raise  # not an I/O error: a bug, keep its traceback
        raise UserError(f"cannot write checkpoint {store.path(name)}: {cause.strerror or cause}{kept}") from None


class Checkpointer:
    """Saves (rank 0 only) into `directory` (a local path, or s3:// / gs:// through
    trainer/rundir.py), keeping the newest `keep_last` files."""

    def __init__(self, directory: str | Path, keep_last: int, is_main: bool):
        self.store = open_store(directory, "checkpoint.dir")
        if isinstance(self.store, RemoteStore):
            check_bucket(self.store, "checkpoint.dir")
        self.dir = self.store.dir if isinstance(self.store, LocalStore) else self.store.url
        self.keep_last = keep_last
        self.is_main = is_main

    def path_for(self, step: int) -> Path | str:
        return self.store.path(f"step_{step:08d}.pt")

    def list(self) -> list[Path | str]:
        """Complete checkpoints, oldest first (temporary files are never listed)."""
        found = [(int(m.group(1)), n) for n in self.store.names() if (m := _NAME.match(n))]
        return [self.store.path(n) for _, n in sorted(found)]

    def latest(self) -> Path | str | None:
        ckpts = self.list()
        return ckpts[-1] if ckpts else None

    def _write(self, state: dict, name: str) -> Path | str:
        """Publish `name` atomically; a failed write names the file and the checkpoint kept."""
        if self.store.remote:
            return self.store.write(name, lambda f: torch.save(state, f))
        prev = self.latest()
        kept = (f" (the previous checkpoint {_basename(prev)} is kept: free space, then continue with resume=auto)"
                if prev is not None else "")
        try:
            self.store.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create checkpoint directory {self.store.dir}: {e.strerror or e}") from None
        return _write_local(self.store, state, name, kept)

    def save(self, state: dict, step: int) -> Path | str | None:
        if not self.is_main:
            return None
        final = self._write(state, f"step_{step:08d}.pt")
        for old in self.list()[: -self.keep_last]:
            self.store.delete(_basename(old))
        return final

    @property
    def best_path(self) -> Path | str:
        return self.store.path(BEST_NAME)

    def save_best(self, state: dict) -> Path | str | None:
        """Replace best.pt (kept whatever keep_last says)."""
        if not self.is_main:
            return None
        return self._write(state, BEST_NAME)

    @staticmethod
    def load(path: str | Path) -> dict:
        """The checkpoint at `path` (local or remote), read safely; a UserError saying what is
        wrong with it otherwise (missing, damaged, or from an older format)."""
        url = str(path)
        try:
            if scheme_of(url):
                store = open_store(url.rsplit("/", 1)[0], "resume")
                name = _basename(url)
                if not store.exists(name):
                    raise UserError(f"checkpoint not found: {url}")
                source = io.BytesIO(store.read(name))
            else:
                source = Path(url)
                if not source.is_file():
                    raise UserError(f"checkpoint not found: {source}")
        except OSError as e:
            raise UserError(f"checkpoint {url} could not be read: {e}") from None
        try:
            # weights_only: tensors and containers only, never code from the file's pickle
            return torch.load(source, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            why = f"({type(e).__name__}: {first[:300]})"
            if isinstance(e, pickle.UnpicklingError) and "weights only" in first.lower():
                raise UserError(f"checkpoint {url} could not be read safely {why}; checkpoints from before "
                                f"format {CHECKPOINT_FORMAT} cannot be resumed") from None
            raise UserError(f"checkpoint {url} is damaged or not a checkpoint {why}") from None


def _basename(path: Path | str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]
