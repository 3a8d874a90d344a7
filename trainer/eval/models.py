"""What an evaluation runs: the encoders of a model file, its preprocessing and its provenance.

Two kinds of model file:
- a student: an exported student (`trainer export`), a training checkpoint or a run directory,
  read by `trainer.export.load_student` (no teacher file needed); its encoders follow the
  contract of trainer/tasks/base.py and its resolved config gives the image size, the
  normalisation and the tokenizer it was trained with;
- a teacher's own file (`--teacher KIND`, a family of trainer/models/registry.py; `--data2vec2`
  is the older spelling of `--teacher data2vec2`), to measure the teacher with the same protocol;
  its encoder returns the last block's tokens ([CLS] first).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from torch import nn

from trainer.data import AugmentConfig
from trainer.errors import UserError

from .features import file_sha256


@dataclass
class EvalModel:
    kind: str  # "student" or the teacher's kind ("data2vec2", "beitv2", ...)
    task: str  # the training task ("image_kd", "multimodal", ...) or the teacher's kind
    encoders: dict[str, nn.Module]
    source: str  # the file the weights were read from
    sha256: str  # of that file
    config: dict = field(default_factory=dict)  # the run's resolved config (students)
    step: int | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # image size and normalisation
    tokenizer: str = ""  # tokenizer path for text towers
    text_max_len: int = 64

    def describe(self) -> dict:
        return {"kind": self.kind, "task": self.task, "source": self.source, "sha256": self.sha256,
                "step": self.step}

    def encoder(self, name: str, command: str) -> nn.Module:
        if name not in self.encoders:
            article = "an" if name[0] in "aeiou" else "a"
            raise UserError(f"{command} needs {article} {name} encoder; this {self.task} model has "
                            f"{', '.join(sorted(self.encoders)) or 'none'}")
        return self.encoders[name]


def _augment_from(config: dict, size: int | None) -> AugmentConfig:
    raw = (config.get("data") or {}).get("augment") or {}
    names = {f.name for f in fields(AugmentConfig)}
    aug = AugmentConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in names})
    if size:
        aug.size = size
    aug.train = False
    return aug


def load_eval_model(path: str, teacher: str = "", image_size: int | None = None,
                    interpolation: str | None = None, data2vec2: bool = False) -> EvalModel:
    """Load a student (export, checkpoint or run directory) or, with `teacher` (a kind of
    trainer/models/registry.py), a teacher's own file. `data2vec2=True` is the older spelling of
    teacher="data2vec2", kept for existing callers."""
    if not Path(path).exists():
        raise UserError(f"model not found: {path}")
    teacher = teacher or ("data2vec2" if data2vec2 else "")
    if teacher:
        return _load_teacher(path, teacher, image_size, interpolation)
    try:
        from trainer.export import load_student
    except ImportError:
        raise UserError("this checkout has no trainer.export (student loading): pass --teacher data2vec2 to "
                        "evaluate a Data2Vec2 checkpoint, or update the project") from None
    try:
        loaded = load_student(path)
    except UserError as e:
        if Path(path).is_file():  # a teacher checkpoint given as a student is the likely mistake
            raise UserError(f"{e} (a teacher's checkpoint? `trainer eval probe` takes one with --teacher KIND, "
                            f"e.g. --teacher data2vec2, formerly --data2vec2)") from None
        raise
    config = loaded.config or {}
    data = config.get("data") or {}
    aug = _augment_from(config, image_size)
    if interpolation:
        aug.interpolation = interpolation
    return EvalModel("student", loaded.task, dict(loaded.encoders), str(loaded.source),
                     file_sha256(loaded.source), config=config, step=loaded.step, augment=aug,
                     tokenizer=str(data.get("tokenizer") or ""), text_max_len=int(data.get("text_max_len") or 64))


def _load_teacher(path: str, kind: str, image_size: int | None, interpolation: str | None) -> EvalModel:
    """A registered teacher family's file as an image encoder (its last block's tokens)."""
    from trainer.models.registry import teacher_spec

    spec = teacher_spec(kind, "--teacher")
    model = spec.load(path)
    aug = AugmentConfig(size=image_size or spec.img_size(model), interpolation=interpolation or "bicubic",
                        train=False)
    return EvalModel(kind, kind, {"image": spec.encoder(model).eval()}, str(path), file_sha256(path), augment=aug)
