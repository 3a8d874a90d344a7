"""What an evaluation runs: the encoders of a model file, its preprocessing and its provenance.

Two kinds of model file:
- a student: an exported student (`trainer export`), a training checkpoint or a run directory,
  read by `trainer.export.load_student` (no teacher file needed); its encoders follow the
  contract of trainer/tasks/base.py and its resolved config gives the image size, the
  normalisation and the tokenizer it was trained with;
- a Data2Vec2 fairseq checkpoint (`--data2vec2`), to measure the teacher with the same
  protocol; its encoder returns the last block's tokens ([CLS] first).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from trainer.data import AugmentConfig
from trainer.errors import UserError

from .features import file_sha256


@dataclass
class EvalModel:
    kind: str  # "student" | "data2vec2"
    task: str  # the training task ("image_kd", "multimodal", ...) or "data2vec2"
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


class LastBlockTokens(nn.Module):
    """A Data2Vec2 ViT as an encoder: the last block's output [B, 1+N, D]."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        return self.vit(img_BCHW)[-1]


def _augment_from(config: dict, size: int | None) -> AugmentConfig:
    raw = (config.get("data") or {}).get("augment") or {}
    names = {f.name for f in fields(AugmentConfig)}
    aug = AugmentConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in names})
    if size:
        aug.size = size
    aug.train = False
    return aug


def load_eval_model(path: str, data2vec2: bool = False, image_size: int | None = None,
                    interpolation: str | None = None) -> EvalModel:
    """Load a student (export, checkpoint or run directory) or, with data2vec2, a fairseq teacher."""
    if not Path(path).exists():
        raise UserError(f"model not found: {path}")
    if data2vec2:
        from trainer.models.vit import load_data2vec2

        vit = load_data2vec2(path)
        aug = AugmentConfig(size=image_size or vit.shape.img_size, interpolation=interpolation or "bicubic",
                            train=False)
        return EvalModel("data2vec2", "data2vec2", {"image": LastBlockTokens(vit).eval()}, str(path),
                         file_sha256(path), augment=aug)
    try:
        from trainer.export import load_student
    except ImportError:
        raise UserError("this checkout has no trainer.export (student loading): pass --data2vec2 to "
                        "evaluate a Data2Vec2 checkpoint, or update the project") from None
    try:
        loaded = load_student(path)
    except UserError as e:
        if Path(path).is_file():  # a teacher checkpoint given as a student is the likely mistake
            raise UserError(f"{e} (a Data2Vec2 fairseq checkpoint? `trainer eval probe` takes it with "
                            f"--data2vec2)") from None
        raise
    config = loaded.config or {}
    data = config.get("data") or {}
    aug = _augment_from(config, image_size)
    if interpolation:
        aug.interpolation = interpolation
    return EvalModel("student", loaded.task, dict(loaded.encoders), str(loaded.source),
                     file_sha256(loaded.source), config=config, step=loaded.step, augment=aug,
                     tokenizer=str(data.get("tokenizer") or ""), text_max_len=int(data.get("text_max_len") or 64))
