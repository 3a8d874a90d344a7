"""A run's student on its own: `trainer export` writes it, `load_student` rebuilds it.

    trainer export RUN_DIR --out student.pt            # best.pt if the run validated, else the latest
    trainer export RUN_DIR/checkpoints/step_00001000.pt --out student.pt

The exported file holds plain data only (read back with `torch.load(weights_only=True)`):

    {"kind": "shardify-kd-student", "version": 1, "task": "image_kd",
     "student_arch": {...},   # what Task.build_student needs to rebuild the module
     "config": {...},         # the run's resolved config (plain dict)
     "state_dict": {...},     # the student's weights
     "step": 1000, "source": "runs/x/checkpoints/best.pt"}

`load_student(path)` accepts an exported file, a training checkpoint or a run directory and
returns the student in eval mode on the CPU with its evaluation encoders; the teacher file is
never needed. Evaluation (trainer/eval) goes through here and never imports the training loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from trainer.checkpoint import BEST_NAME, Checkpointer
from trainer.errors import UserError

EXPORT_KIND = "shardify-kd-student"
EXPORT_VERSION = 1


@dataclass
class LoadedStudent:
    """A rebuilt student and what is known about it."""

    task: str  # the task's registered name (or module:Class)
    task_cls: type
    student: nn.Module  # eval mode, CPU
    encoders: dict[str, nn.Module]
    config: dict[str, Any]  # the run's resolved config
    arch: dict[str, Any]
    step: int
    source: Path  # the file the weights came from
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_dir(run_dir: Path) -> Path:
    """Where a run directory keeps its checkpoints (checkpoint.dir of its config.yaml, if set)."""
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file():
        try:
            cfg = yaml.safe_load(cfg_path.read_text()) or {}
            custom = (cfg.get("checkpoint") or {}).get("dir") if isinstance(cfg, dict) else ""
        except (yaml.YAMLError, AttributeError):
            custom = ""
        if custom:
            return Path(custom)
    return run_dir / "checkpoints"


def find_checkpoint(source: str | Path, which: str = "best") -> Path:
    """A checkpoint file given itself or a run directory: `which` = best (best.pt when the run
    validated, else the latest) or last (the latest step)."""
    src = Path(source)
    if src.is_file():
        return src
    if not src.is_dir():
        raise UserError(f"not found: {src} (give a run directory, a checkpoint or an exported student)")
    ckpts = Checkpointer(checkpoint_dir(src), keep_last=1, is_main=False)
    if which == "best" and ckpts.best_path.is_file():
        return ckpts.best_path
    latest = ckpts.latest()
    if latest is None:
        raise UserError(f"{src} holds no checkpoint (looked in {ckpts.dir})")
    return latest


def _read(path: Path) -> dict:
    state = Checkpointer.load(path)  # weights_only: never runs code from the file
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a checkpoint or an exported student")
    return state


def student_record(state: dict, path: Path) -> dict:
    """The export record of a training checkpoint (or the exported record itself)."""
    if state.get("kind") == EXPORT_KIND:
        if state.get("version") != EXPORT_VERSION:
            raise UserError(f"{path}: exported student version {state.get('version')} is not {EXPORT_VERSION}")
        return state
    missing = [k for k in ("task", "student_arch", "config", "model") if k not in state]
    if missing:
        raise UserError(f"{path} does not describe its student (missing {', '.join(missing)}): "
                        f"was it written by an older version of the trainer?")
    return {"kind": EXPORT_KIND, "version": EXPORT_VERSION, "task": state["task"],
            "student_arch": state["student_arch"], "config": state["config"], "state_dict": state["model"],
            "step": int(state.get("step", 0)), "source": str(path)}


def export_student(source: str | Path, out: str | Path, which: str = "best") -> tuple[Path, dict]:
    """Write the student of a run directory or checkpoint to `out` (atomically)."""
    path = find_checkpoint(source, which)
    record = student_record(_read(path), path)
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        torch.save(record, tmp)
        os.replace(tmp, out)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    return out, record


def load_student(source: str | Path, which: str = "best") -> LoadedStudent:
    """Rebuild the student of an exported file, a checkpoint or a run directory (no teacher)."""
    from trainer.config import task_class  # the registry; imports the task module only

    path = find_checkpoint(source, which)
    record = student_record(_read(path), path)
    cls = task_class(record["task"])
    student = cls.build_student(record["student_arch"])
    try:
        student.load_state_dict(record["state_dict"], strict=True)
    except RuntimeError as e:
        raise UserError(f"{path}: the weights do not fit the described student: {str(e).splitlines()[0]}") from None
    student.eval()
    return LoadedStudent(task=record["task"], task_cls=cls, student=student,
                         encoders=cls.student_encoders(student), config=record["config"],
                         arch=record["student_arch"], step=record["step"], source=path)


__all__ = ["BEST_NAME", "EXPORT_KIND", "LoadedStudent", "export_student", "find_checkpoint", "load_student"]
