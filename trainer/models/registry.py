"""The teacher registry: one line per teacher family, `kind -> TeacherSpec`.

A spec says how to build a teacher from its file and how to read it, so that the image task and
`trainer eval` never name a family themselves (the same idea as torchtitan's ModelSpec table).
The multimodal task's [CLS] teacher (`teacher.kind: beitv2|data2vec2` in its own config) is
still chosen in trainer/tasks/multimodal.py; its loaders are the ones registered here.

- `load(path, num_heads=0, norm_eps=0.0)` -> the teacher as an fp32 nn.Module on the CPU; a file
  that is not of this family raises UserError in one line. `num_heads`/`norm_eps` override what
  the file does not say; a family whose files say everything ignores them.
- `encoder(teacher)` -> the evaluation view: images [B, 3, H, W] -> the last block's tokens
  [B, 1+N, D], [CLS] first (`trainer eval probe --teacher KIND`).
- `img_size(teacher)` -> the image size its positions are made for.
- `layer_targets`: the teacher also follows the image task's contract (a `shape` ViTShape and
  `forward(images, tensor="ffn"|"block")` returning one [B, 1+N, D] tensor per block, with the
  state-dict names of trainer.models.vit.Data2Vec2ViT so that `student.init: teacher` can copy
  it). Only such teachers can be distilled by `image_kd`; the others serve evaluation.

A new teacher family = its model module (with the loader) + one `TEACHERS[...] = TeacherSpec(...)`
line here. docs/extending.md walks through it; tests/test_extending.py does it with a toy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from trainer.errors import UserError
from trainer.models import vit


@dataclass(frozen=True)
class TeacherSpec:
    """How to load and read one teacher family (see the module docstring)."""

    load: Callable[..., nn.Module]
    encoder: Callable[[nn.Module], nn.Module]
    img_size: Callable[[nn.Module], int]
    layer_targets: bool = False
    describe: str = ""  # the file it reads, for help texts and errors


def _beitv2_load(path, num_heads: int = 0, norm_eps: float = 0.0) -> nn.Module:
    # imported when used: distilling a Data2Vec2 teacher needs no timm (bare GPU machines lack it)
    from trainer.models import beitv2

    return beitv2.load_teacher(path, num_heads, norm_eps)


TEACHERS: dict[str, TeacherSpec] = {
    "data2vec2": TeacherSpec(vit.load_data2vec2, vit.LastBlockTokens, lambda t: t.shape.img_size,
                             layer_targets=True, describe="Data2Vec2 fairseq checkpoint (base_imagenet.pt)"),
    "beitv2": TeacherSpec(_beitv2_load, lambda t: t, lambda t: t.shape.img_size,
                          describe="BEiTv2 checkpoint in the original layout (beitv2_base_patch16_224_pt1k.pth)"),
}


def teacher_spec(kind: str, what: str = "teacher kind") -> TeacherSpec:
    """The spec of `kind`; a kind nobody registered is a one-line UserError naming the known ones."""
    spec = TEACHERS.get(kind)
    if spec is None:
        raise UserError(f"{what} {kind!r} is not registered (known: {', '.join(sorted(TEACHERS))})")
    return spec
