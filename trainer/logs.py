"""Run logs: one console line per logging step, the same record as JSONL, and TensorBoard
scalars when the `tensorboard` package is installed. Only rank 0 writes; other ranks get a
logger that does nothing, so callers never branch on rank.

Every record carries a UTC timestamp (`time`); training records also carry every loss the task
returned, elapsed seconds and an ETA. Validation records hold `val_*` keys. After a resume,
the rows of steps later than the checkpoint (logged before the crash, about to be trained again)
are dropped from log.jsonl, so each step appears once.

A failed write to log.jsonl (disk full) does not end training mid-step: the logger says so once,
keeps the reason in `failure`, and the loop stops the run at its next checkpoint. The console
is best effort: a full disk under the job's output file never stops a run either.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from trainer.config import LoggingConfig

# record keys that are not losses: everything else a task returned is printed as a loss
_META = {"step", "total_steps", "lr", "samples_per_s", "data_wait", "peak_mem_bytes", "elapsed_s", "eta_s",
         "time", "val_batches", "val_s", "best"}


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated memory on the GPU, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_record(r: dict) -> str:
    parts = [f"step {r['step']}/{r['total_steps']}"]
    parts += [f"{k} {v:.5f}" for k, v in r.items() if k not in _META and isinstance(v, float)]
    parts.append(f"lr {r['lr']:.3e}")
    parts.append(f"{r['samples_per_s']:.1f} samples/s")
    parts.append(f"data-wait {100 * r['data_wait']:.1f}%")
    parts.append(f"peak mem {r['peak_mem_bytes'] / 2**30:.2f} GiB")
    parts.append(f"elapsed {_duration(r.get('elapsed_s'))} eta {_duration(r.get('eta_s'))}")
    return " | ".join(parts)


def format_val_record(r: dict) -> str:
    parts = [f"validation at step {r['step']}/{r['total_steps']}"]
    parts += [f"{k} {v:.5f}" for k, v in r.items() if k.startswith("val_") and k not in _META]
    parts.append(f"{r['val_batches']} batches in {r['val_s']:.1f} s")
    if r.get("best"):
        parts.append("best so far")
    return " | ".join(parts)


def _console(msg: str, stream) -> None:
    try:
        print(msg, file=stream, flush=True)
    except OSError:
        pass  # the job's output file is on a full disk: log.jsonl and the checkpoints say the rest


def drop_rows_after(path: Path, step: int) -> int:
    """Rewrite a JSONL log without the rows of steps after `step` (atomically); returns how
    many rows were dropped. Lines that are not JSON (a torn last line) are dropped too."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        try:
            tmp.write_text("".join(x + "\n" for x in kept))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # e.g. disk full: the log stays as it was
            raise
    return dropped


class RunLogger:
    """Console messages work at once; the files are opened by `open()`, once the run is set up
    (a refused run writes nothing)."""

    def __init__(self, out_dir: Path, cfg: LoggingConfig, enabled: bool):
        self.enabled = enabled
        self.out_dir = out_dir
        self.cfg = cfg
        self.jsonl = None
        self.tb = None
        self.failure: str | None = None  # why log.jsonl stopped being written (None: it is fine)

    def open(self, resumed_step: int = 0) -> None:
        if not self.enabled:
            return
        cfg, path = self.cfg, self.out_dir / "log.jsonl"
        if cfg.jsonl:
            dropped = drop_rows_after(path, resumed_step)
            if dropped:
                self.info(f"log.jsonl: dropped {dropped} row(s) after step {resumed_step} (trained again now)")
            self.jsonl = open(path, "a", buffering=1)
        if cfg.tensorboard != "off":
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
            except ImportError:
                if cfg.tensorboard == "on":
                    self.info("tensorboard=on but the tensorboard package is not installed; skipping it")
            else:
                self.tb = SummaryWriter(str(self.out_dir / "tb"), purge_step=resumed_step + 1)

    def info(self, msg: str) -> None:
        if self.enabled:
            _console(msg, sys.stderr)

    def _write(self, record: dict, tb_prefix: str) -> None:
        record = {**record, "time": datetime.now(UTC).isoformat(timespec="seconds")}
        if self.jsonl is not None:
            try:
                self.jsonl.write(json.dumps(record) + "\n")
            except OSError as e:
                self._jsonl_failed(e, record["step"])
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "total_steps", "best") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{tb_prefix}/{k}", v, record["step"])

    def _jsonl_failed(self, e: OSError, step: int) -> None:
        path = self.out_dir / "log.jsonl"
        self.failure = f"cannot write {path} ({e.strerror or e}) since step {step}"
        self.info(f"warning: {self.failure}; training goes on and stops at the next checkpoint")
        with contextlib.suppress(OSError):
            self.jsonl.close()  # flushing what is buffered may fail the same way
        self.jsonl = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        _console(format_record(record), sys.stdout)
        self._write(record, "train")

    def log_val(self, record: dict) -> None:
        if not self.enabled:
            return
        _console(format_val_record(record), sys.stdout)
        self._write(record, "val")

    def close(self) -> None:
        if self.jsonl is not None:
            with contextlib.suppress(OSError):  # already reported through `failure` if it failed
                self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        self.jsonl = self.tb = None
