"""Image distillation (DistilData2Vec2): a frozen Data2Vec2 ViT teacher, a student made of its
embeddings and first blocks, and an MSE between layer-averaged targets.

The teacher stays outside the trainable module (never wrapped by DDP, never in the optimiser,
never in checkpoints), is kept in eval mode and runs under `torch.inference_mode()`.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
from torch import nn

from trainer.config import Config
from trainer.errors import UserError
from trainer.losses import layer_average_target, mse_over_tokens
from trainer.models.vit import Data2Vec2ViT, load_data2vec2

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
           "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def autocast(device: torch.device, dtype_name: str):
    """Autocast to the named dtype, or nothing for fp32."""
    dtype = _DTYPES[dtype_name]
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class KDStudent(nn.Module):
    """The trainable part: the student ViT (plus a regression head for "d2v2_topk"). Its
    forward returns the prediction compared with the teacher's target."""

    def __init__(self, vit: Data2Vec2ViT, variant: str, final_layer_norm: bool):
        super().__init__()
        self.vit = vit
        self.variant = variant
        self.final_layer_norm = final_layer_norm
        # data2vec regresses its targets through a projection; our student has no decoder, so a
        # linear head plays that role in the original-recipe variant
        self.head = nn.Linear(vit.shape.dim, vit.shape.dim) if variant == "d2v2_topk" else None

    def forward(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        layers = self.vit(img_BCHW)
        if self.head is None:
            return layer_average_target(layers, final_layer_norm=self.final_layer_norm)
        return self.head(layers[-1][:, 1:])  # patch tokens only, as the targets


def build_student(teacher: Data2Vec2ViT, cfg: Config) -> Data2Vec2ViT:
    scfg = cfg.student
    if scfg.depth > teacher.shape.depth:
        raise UserError(f"config key 'student.depth': {scfg.depth} is more than the teacher's "
                        f"{teacher.shape.depth} blocks")
    student = Data2Vec2ViT(replace(teacher.shape, depth=scfg.depth), train_pos_embed=scfg.train_pos_embed)
    if scfg.init == "teacher":
        # everything but blocks >= depth: embeddings, [CLS], positions, norm_pre, first blocks
        sd = {k: v for k, v in teacher.state_dict().items()
              if not k.startswith("blocks.") or int(k.split(".")[1]) < scfg.depth}
        student.load_state_dict(sd, strict=True)
    return student


class ImageKDTask:
    """Builds teacher and student; `loss(model, batch)` returns named losses ("loss" is optimised)."""

    data_kind = "image"

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg = cfg
        self.device = device
        if not cfg.teacher.checkpoint:
            raise UserError("config key 'teacher.checkpoint' is empty: give the Data2Vec2 fairseq checkpoint")
        teacher = load_data2vec2(cfg.teacher.checkpoint, cfg.teacher.num_heads, cfg.teacher.norm_eps)
        # the student copies the teacher's fp32 weights before the teacher moves to its device
        torch.manual_seed(cfg.seed)
        vit = build_student(teacher, cfg)
        self.student = KDStudent(vit, cfg.loss.variant, cfg.loss.final_layer_norm).to(device)
        teacher.requires_grad_(False)
        self.teacher = teacher.to(device).eval()
        if cfg.loss.variant == "d2v2_topk" and cfg.loss.top_k > teacher.shape.depth:
            raise UserError(f"config key 'loss.top_k': {cfg.loss.top_k} is more than the teacher's "
                            f"{teacher.shape.depth} blocks")

    @property
    def img_size(self) -> int:
        return self.teacher.shape.img_size

    def teacher_targets(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        lcfg = self.cfg.loss
        self.teacher.eval()  # guards against a stray .train() on a parent module
        with torch.inference_mode(), autocast(self.device, self.cfg.teacher.dtype):
            if lcfg.variant == "layer_avg":
                target = layer_average_target(self.teacher(img_BCHW), final_layer_norm=lcfg.final_layer_norm)
            else:
                _, ffns = self.teacher(img_BCHW, with_ffn=True)
                target = layer_average_target([f[:, 1:] for f in ffns], top_k=lcfg.top_k,
                                              final_layer_norm=lcfg.final_layer_norm)
        # inference tensors cannot be saved for backward; a clone outside the mode is a normal one
        return target.clone()

    def loss(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        img = batch["image"]
        if self.cfg.precision == "fp32":
            img = img.float()
        target = self.teacher_targets(img)
        with autocast(self.device, self.cfg.precision):
            pred = model(img)
        # always weighted when the loader marks padding: testing for any pad would sync the GPU
        weight = (~batch["is_pad"]).to(pred.device, torch.float32) if "is_pad" in batch else None
        return {"loss": mse_over_tokens(pred, target, weight)}


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """The reference's rule: no decay on 1-D params, biases, position embedding and [CLS]."""
    return param.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "cls_token" in name
