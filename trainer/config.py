"""Training configuration: YAML -> small typed dataclasses, one per component.

Layering: dataclass defaults < the YAML file < `key=value` overrides from the command line
(`optim.lr=1e-3`, `data.manifests=[a,b]`, `resume=auto`). Every key is checked against the
dataclass it lands in, and every value against the field's type and allowed range, so a typo
fails with the key's full dotted name instead of being silently ignored. Each component only
sees its own section (the loader gets `DataConfig`, a task its own sections).

The task's sections are declared by the task (`Task.config_class`, trainer/tasks/base.py), so a
new task adds its options without touching this file; they are checked by the same code.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer.data.config import AugmentConfig, DataConfig  # noqa: F401  (AugmentConfig: nested type)
from trainer.errors import UserError
from trainer.fields import between, choice


class ConfigError(UserError):
    """A bad key or value in the config; the message names the key."""


# kept under these names for the task modules' field declarations
_choice = choice
_range = between


@dataclass
class OptimConfig:
    """AdamW; the task decides which parameters are decayed (Task.param_groups)."""

    lr: float = field(default=5e-4, metadata=_range(0.0))  # base lr for a total batch of 256 (see scale_lr)
    scale_lr: bool = True  # lr = lr * total batch / 256, total batch = batch_size * world * grad_accum
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = field(default=1e-6, metadata=_range(0.0))
    weight_decay: float = field(default=0.01, metadata=_range(0.0))  # on the task's "decay" group only
    grad_clip: float = field(default=0.0, metadata=_range(0.0))  # max global grad norm; 0 disables


@dataclass
class ScheduleConfig:
    """How long to train and how the lr moves."""

    epochs: float = field(default=10.0, metadata=_range(0.0))  # used when max_steps is 0
    max_steps: int = field(default=0, metadata=_range(0))  # optimiser steps; 0: epochs * steps per epoch
    warmup_frac: float = field(default=0.1, metadata=_range(0.0, 1.0))  # linear warmup share of all steps
    warmup_steps: int = field(default=-1, metadata=_range(-1))  # overrides warmup_frac when >= 0
    min_lr_ratio: float = field(default=0.0, metadata=_range(0.0, 1.0))  # cosine floor as a fraction of lr
    grad_accum: int = field(default=1, metadata=_range(1))  # micro-batches per optimiser step


@dataclass
class CheckpointConfig:
    """When checkpoints are written and how many are kept."""

    every_steps: int = field(default=1000, metadata=_range(0))  # 0: only at the end
    keep_last: int = field(default=3, metadata=_range(1))  # older checkpoints are deleted (best.pt is kept)
    dir: str = ""  # default: <out_dir>/checkpoints


@dataclass
class LoggingConfig:
    """Console, JSONL and TensorBoard logs (rank 0 only)."""

    every_steps: int = field(default=10, metadata=_range(1))  # also the NaN-check interval
    tensorboard: str = field(default="auto", metadata=_choice("auto", "on", "off"))  # auto: when installed
    jsonl: bool = True  # <out_dir>/log.jsonl


@dataclass
class ValidationConfig:
    """The task's loss on data.val_split (when set): every `every_steps` and at the end; the
    checkpoint with the lowest validation loss is kept as checkpoints/best.pt."""

    every_steps: int = field(default=0, metadata=_range(0))  # 0: only at the end of the run
    max_batches: int = field(default=0, metadata=_range(0))  # batches per validation; 0: the whole split


@dataclass
class Config:
    """A whole training run. Run-wide scalars live at the top level; the task's own sections
    (e.g. image_kd's teacher, student, loss) sit beside the core ones in the YAML and are
    loaded into `task_cfg`, an instance of the task's `config_class`."""

    task: str = "image_kd"  # a registered task (trainer/tasks/__init__.py) or "module:Class"
    out_dir: str = "runs/image_kd"  # run directory (local, s3:// or gs://): resolved config, logs, checkpoints
    # "": fresh run (refuses a run dir with checkpoints); "auto": the newest readable checkpoint if
    # any; "force": auto, but a changed meaning is logged instead of refused; or a checkpoint path
    resume: str = ""
    seed: int = 0  # model init and RNG (data order is data.seed)
    device: str = field(default="auto", metadata=_choice("auto", "cpu", "cuda"))
    precision: str = field(default="bf16", metadata=_choice("bf16", "fp16", "fp32"))  # student autocast
    compile: bool = False  # torch.compile the student
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on GPU)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    task_cfg: Any = field(default=None, metadata={"internal": True})  # the task's sections (not a YAML key)


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass with checking


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Coerce a YAML value to the annotated type, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a section (mapping), got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"config key '{key}': expected a finite number, got {value!r}")
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return _convert(float(value), float, key)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"config key '{key}': expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            if a is type(None) and value is None:
                return None
        return _convert(value, [a for a in typing.get_args(tp) if a is not type(None)][0], key)
    return value


def _check_field(f: dataclasses.Field, value: Any, key: str) -> None:
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(choices)}")
    rng = f.metadata.get("range")
    if rng is not None:
        lo, hi = rng
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
            raise ConfigError(f"config key '{key}': {value!r} is outside {bounds}")


def _build(cls: type, d: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in d.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields or fields[name].metadata.get("internal"):
            where = f"section '{prefix}'" if prefix else "the top level"
            valid = [n for n, f in fields.items() if not f.metadata.get("internal")]
            raise ConfigError(f"unknown config key '{key}' (valid in {where}: {', '.join(valid)})")
        if isinstance(value, bool) and "on" in fields[name].metadata.get("choices", ()):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        kwargs[name] = _convert(value, hints[name], key)
        _check_field(fields[name], kwargs[name], key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """A plain dict (tuples as lists) that `load_config` reads back to an equal Config."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    d = plain(dataclasses.asdict(cfg))
    if isinstance(cfg, Config):  # the task's sections go back to the top level, where they are written
        d.update(d.pop("task_cfg") or {})
    return d


def _merge(base: dict, upd: dict) -> dict:
    out = dict(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> dict:
    """`a.b.c=VALUE` -> {"a": {"b": {"c": VALUE}}}; VALUE is read as YAML (numbers, lists...)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # a plain string such as a path with odd characters
    if value is None:
        value = ""
    out: dict = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """defaults < YAML file < overrides, checked; raises ConfigError with the key's name."""
    merged: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            raise ConfigError(f"config file {p} is not valid YAML{where}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        merged = loaded
    for o in overrides:
        merged = _merge(merged, parse_override(o))
    return build_config(merged)


def task_class(name: Any) -> type:
    """The Task class named by the config's `task` key, or a ConfigError naming the key."""
    from trainer.tasks import TASKS, get_task  # the registry imports no model code

    if not isinstance(name, str):
        raise ConfigError(f"config key 'task': expected a string, got {name!r}")
    try:
        return get_task(name)
    except KeyError:
        raise ConfigError(f"config key 'task': {name!r} is not one of {', '.join(TASKS)} "
                          f"(or a 'module:Class' name)") from None
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"config key 'task': cannot import {name!r} ({e})") from None


def build_config(merged: dict) -> Config:
    """Split a merged dict into the core sections and the task's, build and check both, then
    let the task check its sections against the rest (Task.check_config)."""
    cls = task_class(merged.get("task", Config.task))
    task_fields = {f.name for f in dataclasses.fields(cls.config_class)} if cls.config_class else set()
    core_fields = {f.name for f in dataclasses.fields(Config) if not f.metadata.get("internal")}
    clash = task_fields & core_fields
    if clash:  # a task author's mistake, not a user's
        raise TypeError(f"{cls.__name__}.config_class redefines core sections {sorted(clash)}")
    for k in merged:
        if k not in core_fields and k not in task_fields:
            valid = ", ".join([*sorted(core_fields), *sorted(task_fields)])
            raise ConfigError(f"unknown config key '{k}' for task {merged.get('task', Config.task)!r} "
                              f"(valid at the top level: {valid})")
    cfg = _build(Config, {k: v for k, v in merged.items() if k in core_fields})
    if cls.config_class is not None:
        cfg.task_cfg = _build(cls.config_class, {k: v for k, v in merged.items() if k in task_fields})
    from trainer.preflight import check_local_kinds

    check_local_kinds(cfg, cls)  # before the task's checks, which read the manifests as its kind
    cls.check_config(cfg)
    return cfg


def config_text(cfg: Config) -> str:
    """The resolved config as YAML; `load_config` of it gives back the same Config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config; `load_config(path)` gives back the same Config."""
    Path(path).write_text(config_text(cfg))
