"""Image distillation (DistilData2Vec2): a frozen Data2Vec2 ViT teacher, a student made of its
embedding stage and first blocks, and an MSE between layer-averaged targets. docs/methods.md
describes the method as the thesis ran it: FFN outputs of every block (`loss.layer_tensor:
ffn`), [CLS] kept, a fixed position embedding, the teacher under float16 autocast. The teacher
is any family of trainer/models/registry.py that gives per-block targets (`teacher.kind`).

The teacher stays outside the trainable module (never wrapped by DDP, never in the optimiser,
never in checkpoints), is kept in eval mode and runs under `torch.inference_mode()`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from trainer.config import Config, ConfigError
from trainer.errors import UserError
from trainer.fields import between, choice
from trainer.losses import layer_average_target, mse_over_tokens
from trainer.models.registry import TEACHERS, TeacherSpec, teacher_spec
from trainer.models.vit import LAYER_TENSORS, Data2Vec2ViT, LastBlockTokens, ViTShape
from trainer.precision import autocast, usable_autocast_dtype
from trainer.tasks.base import Task

log = logging.getLogger(__name__)

@dataclass
class TeacherConfig:
    """The frozen teacher: by default a Data2Vec2 ViT loaded from a fairseq checkpoint."""

    # the teacher family, a key of trainer/models/registry.py's TEACHERS (checked there, so that a
    # family registered by one line is accepted here); it must give per-block targets
    kind: str = "data2vec2"
    checkpoint: str = ""  # path to the teacher's file (data2vec2: the fairseq .pt, e.g. base_imagenet.pt); required
    num_heads: int = field(default=0, metadata=between(0))  # 0: from the checkpoint's cfg (else 12)
    norm_eps: float = field(default=0.0, metadata=between(0.0))  # 0: from the checkpoint's cfg (else 1e-6)
    # autocast dtype of the teacher's blocks (its weights and embedding stage stay fp32):
    # float16 as the thesis ran it; falls back to float32, with a log line, where the device
    # has no autocast in that dtype
    dtype: str = field(default="float16", metadata=choice("float16", "bfloat16", "float32"))


@dataclass
class StudentConfig:
    """The student: the teacher's embedding stage (with any prenet blocks) plus its first
    `depth` shared blocks."""

    depth: int = field(default=6, metadata=between(1))  # number of teacher blocks copied into the student
    init: str = field(default="teacher", metadata=choice("teacher", "random"))  # copy teacher weights or re-initialise
    # false: the sin-cos position embedding stays fixed, as in fairseq and the thesis run (43.1M
    # trainable parameters at ViT-B/16, 6 blocks); true trains it (a timm-style port's default)
    train_pos_embed: bool = False


@dataclass
class LossConfig:
    """How targets are built from layer outputs and compared."""

    # "layer_avg": the thesis recipe (all blocks, instance norm over tokens, average, final
    # parameter-free LayerNorm; student the same over its own blocks; MSE over all tokens).
    # "d2v2_topk": original data2vec 2.0 targets (the teacher's top-K layer tensors, FFN outputs
    # by default, [CLS] excluded); the student regresses them from its last block through a
    # linear head.
    variant: str = field(default="layer_avg", metadata=choice("layer_avg", "d2v2_topk"))
    # the tensor taken from every block, teacher and student alike: "auto" = what the teacher
    # checkpoint's cfg says (`end_of_block_targets`: false -> ffn, true -> block), as fairseq
    # built the thesis's targets; "ffn" = the feed-forward output before the residual add and
    # norm2 (the thesis run); "block" = the block output (the later public port). An explicit
    # value that disagrees with the checkpoint is used, with one warning line.
    layer_tensor: str = field(default="auto", metadata=choice("auto", *LAYER_TENSORS))
    top_k: int = field(default=10, metadata=between(1))  # layers averaged by "d2v2_topk"
    final_layer_norm: bool = True  # parameter-free LayerNorm over features after averaging (images: yes)


@dataclass
class ImageKDConfig:
    """image_kd's sections of the config (top-level keys teacher, student, loss)."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)

def resolve_targets(lcfg: LossConfig, flags: dict[str, bool] | None) -> tuple[str, dict[str, bool]]:
    """(layer tensor, per-layer norms for d2v2_topk) from `loss` and the checkpoint's target flags.

    The tensor follows `end_of_block_targets` under `layer_tensor: auto` (ffn when the file has no
    cfg: the thesis run). The per-layer norm flags apply to the original data2vec 2.0 recipe only:
    the thesis's layer_avg instance-normalises every layer whatever the checkpoint says (its
    `prepare_output`), and so do we."""
    if flags is None:
        if lcfg.layer_tensor == "auto":
            log.warning("loss.layer_tensor auto: the teacher checkpoint has no cfg; using ffn (the thesis run)")
        tensor = "ffn" if lcfg.layer_tensor == "auto" else lcfg.layer_tensor
        return tensor, {"instance_norm": True, "layer_norm": False}
    says = "block" if flags["end_of_block_targets"] else "ffn"
    tensor = says if lcfg.layer_tensor == "auto" else lcfg.layer_tensor
    if tensor != says:
        log.warning("loss.layer_tensor %s: the teacher checkpoint says end_of_block_targets=%s (its targets are %s "
                    "outputs); using %s as configured", tensor, flags["end_of_block_targets"], says, tensor)
    norms = {"instance_norm": flags["instance_norm_target_layer"], "layer_norm": flags["layer_norm_target_layer"]}
    return tensor, norms


class KDStudent(nn.Module):
    """The trainable part: the student ViT (plus a regression head for "d2v2_topk"). Its
    forward returns the prediction compared with the teacher's target."""

    def __init__(self, vit: Data2Vec2ViT, variant: str, final_layer_norm: bool, layer_tensor: str = "ffn"):
        super().__init__()
        self.vit = vit
        self.variant = variant
        self.final_layer_norm = final_layer_norm
        self.layer_tensor = layer_tensor
        # data2vec regresses its targets through a projection; our student has no decoder, so a
        # linear head plays that role in the original-recipe variant
        self.head = nn.Linear(vit.shape.dim, vit.shape.dim) if variant == "d2v2_topk" else None
        unused = self.params_without_gradient()
        if unused:
            # DDP stops on trainable parameters that get no gradient; these stay trainable (as in
            # the thesis run: their grad is None and AdamW leaves them as they are) and DDP is
            # told to leave them out of its all-reduce
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, unused)

    def params_without_gradient(self) -> list[str]:
        """Parameters the loss never reaches. With FFN targets (layer_avg) the last block's
        norm2 is computed but its output feeds nothing: the layer results stop at the FFN."""
        if self.head is None and self.layer_tensor == "ffn":
            last = len(self.vit.blocks) - 1
            return [f"vit.blocks.{last}.norm2.weight", f"vit.blocks.{last}.norm2.bias"]
        return []

    def forward(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            # the same recipe as the teacher's targets, over the student's own blocks
            layers = self.vit(img_BCHW, tensor=self.layer_tensor)
            return layer_average_target(layers, final_layer_norm=self.final_layer_norm)
        return self.head(self.vit(img_BCHW)[-1][:, 1:])  # patch tokens only, as the targets


def build_student(teacher: Data2Vec2ViT, scfg: StudentConfig) -> Data2Vec2ViT:
    if scfg.depth > teacher.shape.depth:
        raise UserError(f"config key 'student.depth': {scfg.depth} is more than the teacher's "
                        f"{teacher.shape.depth} blocks")
    student = Data2Vec2ViT(replace(teacher.shape, depth=scfg.depth), train_pos_embed=scfg.train_pos_embed)
    if scfg.init == "teacher":
        # everything but blocks >= depth: embeddings, [CLS], positions, norm_pre, the prenet
        # blocks (part of the embedding stage), the first `depth` shared blocks
        sd = {k: v for k, v in teacher.state_dict().items()
              if not k.startswith("blocks.") or int(k.split(".")[1]) < scfg.depth}
        student.load_state_dict(sd, strict=True)
    return student


class ImageKDTask(Task):
    """Builds teacher and student; `loss(model, batch)` returns {"loss": MSE}."""

    name = "image_kd"
    config_class = ImageKDConfig
    data_kind = "image"

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        tc = cfg.task_cfg
        spec = _teacher_spec(tc.teacher.kind)
        if not tc.teacher.checkpoint:
            raise ConfigError(f"config key 'teacher.checkpoint' is empty: give the teacher's file ({spec.describe})")

    def __init__(self, cfg: Config, device: torch.device):
        super().__init__(cfg, device)
        tc = cfg.task_cfg
        spec = _teacher_spec(tc.teacher.kind)
        teacher = spec.load(tc.teacher.checkpoint, num_heads=tc.teacher.num_heads, norm_eps=tc.teacher.norm_eps)
        if cfg.data.augment.size != teacher.shape.img_size:
            raise UserError(f"config key 'data.augment.size': {cfg.data.augment.size} px, but the teacher "
                            f"expects {teacher.shape.img_size} px images")
        # the student copies the teacher's fp32 weights before the teacher moves to its device
        torch.manual_seed(cfg.seed)
        vit = build_student(teacher, tc.student)
        self.layer_tensor, self.target_norms = resolve_targets(tc.loss, getattr(teacher, "target_flags", None))
        self.student = KDStudent(vit, tc.loss.variant, tc.loss.final_layer_norm, self.layer_tensor).to(device)
        teacher.requires_grad_(False)
        self.teacher = teacher.to(device).eval()
        if tc.loss.variant == "d2v2_topk" and tc.loss.top_k > teacher.shape.depth:
            raise UserError(f"config key 'loss.top_k': {tc.loss.top_k} is more than the teacher's "
                            f"{teacher.shape.depth} blocks")
        self.teacher_dtype = usable_autocast_dtype(device, tc.teacher.dtype, "teacher.dtype", "teacher")
        self.student_dtype = usable_autocast_dtype(device, cfg.precision, "precision", "student")

    def no_weight_decay(self, name: str, param: torch.Tensor) -> bool:
        return no_weight_decay(name, param)

    def student_arch(self) -> dict[str, Any]:
        vit = self.student.vit
        return {"vit": asdict(vit.shape), "train_pos_embed": vit.pos_embed.requires_grad,
                "variant": self.student.variant, "final_layer_norm": self.student.final_layer_norm,
                "layer_tensor": self.student.layer_tensor}

    @classmethod
    def build_student(cls, arch: dict[str, Any]) -> nn.Module:
        vit = Data2Vec2ViT(ViTShape(**arch["vit"]), train_pos_embed=arch["train_pos_embed"])
        # exports written before layer_tensor existed regressed block outputs
        return KDStudent(vit, arch["variant"], arch["final_layer_norm"], arch.get("layer_tensor", "block"))

    @classmethod
    def student_encoders(cls, student: nn.Module) -> dict[str, nn.Module]:
        return {"image": LastBlockTokens(student.vit)}

    @property
    def img_size(self) -> int:
        return self.teacher.shape.img_size

    def teacher_targets(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        lcfg = self.cfg.task_cfg.loss
        self.teacher.eval()  # guards against a stray .train() on a parent module
        with torch.inference_mode(), autocast(self.device, self.teacher_dtype):
            layers = self.teacher(img_BCHW, tensor=self.layer_tensor)
            if lcfg.variant == "layer_avg":
                target = layer_average_target(layers, final_layer_norm=lcfg.final_layer_norm)
            else:  # data2vec 2.0: the top K layers, [CLS] left out, normed as the checkpoint says
                target = layer_average_target([t[:, 1:] for t in layers], top_k=lcfg.top_k,
                                              final_layer_norm=lcfg.final_layer_norm, **self.target_norms)
        # inference tensors cannot be saved for backward; a clone outside the mode is a normal one
        return target.clone()

    def loss(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        img = batch["image"]
        if self.cfg.precision == "fp32":
            img = img.float()
        target = self.teacher_targets(img)
        with autocast(self.device, self.student_dtype):
            pred = model(img)
        # always weighted when the loader marks padding: testing for any pad would sync the GPU
        weight = (~batch["is_pad"]).to(pred.device, torch.float32) if "is_pad" in batch else None
        return {"loss": mse_over_tokens(pred, target, weight)}


def _teacher_spec(kind: str) -> TeacherSpec:
    """The registered family of `teacher.kind`; it must give the per-block targets this task regresses."""
    try:
        spec = teacher_spec(kind)
    except UserError as e:
        raise ConfigError(f"config key 'teacher.kind': {e}") from None
    if not spec.layer_targets:
        raise ConfigError(f"config key 'teacher.kind': {kind!r} gives no per-block targets, which image_kd "
                          f"regresses (kinds that do: {', '.join(k for k, s in TEACHERS.items() if s.layer_targets)})")
    return spec


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """The thesis's rule: no decay on 1-D params, biases, position embedding and [CLS]."""
    return param.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "cls_token" in name
