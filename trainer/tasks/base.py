"""The Task interface: what a training task (teacher, student, loss) gives the loop.

The loop (trainer/loop.py) knows no model, modality or loss. It asks the task for:

- `config_class`: a dataclass whose fields are the top-level config sections the task owns
  (image_kd: `teacher`, `student`, `loss`). They are checked at load time like the core
  sections, so a typo or an out-of-range value fails before anything is built.
- `check_config(cfg)`: cross-checks of the task's sections against `cfg.data` (image size,
  tokenizer, sequence length) without building models or reading data (`--dry-run` runs it).
- `input_files(cfg)`: the files the task reads (teacher checkpoints, model directories), which
  the pre-flight (trainer/preflight.py) checks before a run is built; by default every
  `checkpoint` field and every local-looking `path` field of the task's sections.
- `resume_may_change`: keys of the task's sections a resume may change (trainer/resume_check.py;
  every other key of the task's sections is part of what the run means).
- `data_kind`: the loader kind it needs ("image", "text" or "image_text").
- `student`: the trainable module; the loop optimises it, wraps it in DDP, checkpoints and
  exports it. Teachers stay outside it (never wrapped, never optimised, never saved).
- `param_groups(weight_decay)`: AdamW groups (the no-decay rule belongs to the task).
- `loss(model, batch)`: named scalar losses; "loss" is optimised, every entry is logged.
  `model` is `student`, possibly DDP- or compile-wrapped: forwards that need gradients go
  through it so DDP sees them.
- `after_step(step)`: called once after every optimiser step (e.g. a memory-bank update).
- `state_dict()` / `load_state_dict()`: task state beyond the student (saved in checkpoints).
- `student_arch()` / `build_student(arch)`: a plain description of the student from which an
  untrained copy can be rebuilt without the teacher file (`trainer export`).
- `student_encoders(student)` / `encoders()`: the modules evaluation embeds with.

Encoder contract (trainer/eval relies on it):
- "image": `forward(images_BCHW)` (float, normalised as the loader does) -> tokens_BTD, with
  the [CLS] token at position 0 and patch tokens after it.
- "text": `forward(input_ids_BT, padding_mask_BT)` (padding_mask True at padding) ->
  tokens_BTD, [CLS] at position 0.
A multimodal student's encoders return the shared representation of both modalities, so a
normalised token 0 is the retrieval embedding.

Tasks are registered by lazy "module:Class" names (trainer/tasks/__init__.py); a config may
also name any "module:Class" directly, which is how tests plug in a toy task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:  # the config module imports the registry, not the other way round
    from trainer.config import Config


def default_no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """The common rule: no decay on 1-D parameters (norms, biases)."""
    return param.ndim <= 1 or name.endswith(".bias")


class Task:
    """Base class of the training tasks; subclasses fill in the class attributes and methods."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type | None] = None  # dataclass of the task's top-level sections
    data_kind: ClassVar[str] = "image"  # "image" | "text" | "image_text"
    resume_may_change: ClassVar[tuple[str, ...]] = ()  # dotted keys, e.g. "teacher.dtype"

    student: nn.Module

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg = cfg
        self.device = device

    # -- config -------------------------------------------------------------------------------

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Raise trainer.config.ConfigError (naming the dotted key) when the task's sections do
        not fit each other or cfg.data. Cheap: no models, no data."""

    @classmethod
    def input_files(cls, cfg: Config) -> list[tuple[str, str]]:
        """(dotted config key, path) of every file the task reads, checked before a run starts."""
        from trainer.preflight import default_input_files

        return default_input_files(cfg.task_cfg)

    # -- training -----------------------------------------------------------------------------

    def no_weight_decay(self, name: str, param: torch.Tensor) -> bool:
        return default_no_weight_decay(name, param)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups over the student's trainable parameters: decay, and no decay."""
        decay, no_decay = [], []
        for name, p in self.student.named_parameters():
            if p.requires_grad:
                (no_decay if self.no_weight_decay(name, p) else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
                {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]

    def loss(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after optimiser step `step` (1-based count of steps done)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"task {self.name!r} keeps no state, but the checkpoint has {sorted(state)}")

    # -- export and evaluation ------------------------------------------------------------------

    def student_arch(self) -> dict[str, Any]:
        """JSON-able description of the student; `build_student(arch)` rebuilds it (untrained)."""
        raise NotImplementedError

    @classmethod
    def build_student(cls, arch: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def student_encoders(cls, student: nn.Module) -> dict[str, nn.Module]:
        raise NotImplementedError

    def encoders(self) -> dict[str, nn.Module]:
        return self.student_encoders(self.student)
