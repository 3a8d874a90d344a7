"""A toy teacher family, as docs/extending.md adds one: its own file layout (a plain
`torch.save` of {"toy_vit": {"shape": ..., "weights": ...}}, read with weights_only=True) and a
loader that builds a module with the image task's contract. It is registered by the one line in
`register` (tests/test_extending.py)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from trainer.errors import UserError
from trainer.models.registry import TEACHERS, TeacherSpec
from trainer.models.vit import Data2Vec2ViT, LastBlockTokens, ViTShape


def write_toy_teacher(path: Path, shape: ViTShape, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = Data2Vec2ViT(shape)
    torch.save({"toy_vit": {"shape": asdict(shape), "weights": model.state_dict()}}, path)
    return path


def load_toy_teacher(path, num_heads: int = 0, norm_eps: float = 0.0) -> Data2Vec2ViT:
    """The family's loader: one line of error for a file of another family."""
    doc = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(doc, dict) or "toy_vit" not in doc:
        raise UserError(f"{path} is not a toy teacher (no 'toy_vit' entry)")
    model = Data2Vec2ViT(ViTShape(**doc["toy_vit"]["shape"]))
    model.load_state_dict(doc["toy_vit"]["weights"])
    return model


def register(teachers: dict = TEACHERS) -> None:
    # the one line a new family adds to trainer/models/registry.py
    teachers["toy"] = TeacherSpec(load_toy_teacher, LastBlockTokens, lambda t: t.shape.img_size, layer_targets=True)
