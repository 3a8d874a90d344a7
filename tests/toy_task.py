"""A toy task registered from the tests by its "module:Class" name: it proves that a new task
plugs into the loop with no change to trainer/loop.py or trainer/config.py (own config section
with choices and ranges, a data check, several named losses, after_step, task state, export)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from trainer.config import ConfigError
from trainer.fields import between, choice
from trainer.tasks.base import Task


@dataclass
class ToySection:
    """The toy task's own section (top-level key `toy`)."""

    width: int = field(default=4, metadata=between(1, 64))  # feature width of the student
    pool: str = field(default="mean", metadata=choice("mean", "max"))  # how patches are pooled
    l1_weight: float = field(default=0.5, metadata=between(0.0, 1.0))  # weight of the l1 term


@dataclass
class ToyConfig:
    toy: ToySection = field(default_factory=ToySection)


class ToyStudent(nn.Module):
    def __init__(self, width: int, pool: str):
        super().__init__()
        self.pool = pool
        self.proj = nn.Conv2d(3, width, kernel_size=4, stride=4)

    def forward(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(img_BCHW.float()).flatten(2).transpose(1, 2)  # B, patches, width
        cls = tokens.mean(1, keepdim=True) if self.pool == "mean" else tokens.amax(1, keepdim=True)
        return torch.cat([cls, tokens], 1)


class ToyTask(Task):
    name = "toy"
    config_class = ToyConfig
    data_kind = "image"

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.data.augment.size % 4:
            raise ConfigError(f"config key 'data.augment.size': {cfg.data.augment.size} is not a multiple "
                              f"of the toy patch size 4")

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        torch.manual_seed(cfg.seed)
        t = cfg.task_cfg.toy
        self.student = ToyStudent(t.width, t.pool).to(device)
        self.steps_seen: list[int] = []

    def loss(self, model, batch):
        tokens = model(batch["image"])
        l2 = (tokens - 1).pow(2).mean()
        l1 = tokens.abs().mean()
        return {"loss": l2 + self.cfg.task_cfg.toy.l1_weight * l1, "l2": l2, "l1": l1}

    def after_step(self, step: int) -> None:
        self.steps_seen.append(step)

    def state_dict(self):
        return {"steps_seen": torch.tensor(self.steps_seen, dtype=torch.long)}

    def load_state_dict(self, state):
        self.steps_seen = state["steps_seen"].tolist()

    def student_arch(self):
        return {"width": self.student.proj.out_channels, "pool": self.student.pool}

    @classmethod
    def build_student(cls, arch):
        return ToyStudent(arch["width"], arch["pool"])

    @classmethod
    def student_encoders(cls, student):
        return {"image": student}
