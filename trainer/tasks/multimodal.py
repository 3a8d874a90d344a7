"""Multimodal distillation (S-SMKE): an image tower and a text tower taken from the original
unimodal teachers, one shared block, an image-text contrastive loss and a contrastive
distillation from a frozen image teacher (BEiTv2) with a memory bank of earlier targets.

    loss = itc_weight * ITC + kd_weight * KD
    ITC  = CLIP loss on `x` (averaged with the same loss on `x_interm` when loss.itc_on_interm),
           each with its own learnable logit scale, features gathered over ranks with gradients
    KD   = for the image and the caption embedding (`encoder_out`) of every sample: cross-entropy
           of "which teacher target is my image's?" over the teacher's [CLS] targets of the
           global batch plus the memory bank, at a fixed temperature (0.07, as the thesis ran
           it; `loss.learn_kd_temperature: true` learns it)

The teacher sees its own view of each image when the loader cuts one (`data.teacher_view`,
batch key `image_teacher`: the thesis's BEiTv2 view with colour jitter), else the student's.
Validation reports the thesis's validation loss as `loss` (KD over the global batch alone: no
bank, no ITC), which decides best.pt; ITC and the KD with bank negatives are logged beside it.

Differences from the reference code, on purpose (each has a test): the bank works on one
process and on many; negatives are the global batch, not the local one; the bank starts empty
and only filled rows are negatives; its size need not be a multiple of the global batch. The
bank is task state: it is saved in and restored from checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.config import ConfigError
from trainer.errors import UserError
from trainer.fields import between, choice
from trainer.losses import LOGIT_SCALE_MAX, MemoryBank, contrastive_kd_loss, itc_loss
from trainer.models import beitv2 as beit
from trainer.models import vit as d2v
from trainer.models.smke import (
    ImageEncoder,
    SMKEStudent,
    TextEncoder,
    image_tower_from_data2vec2,
    load_bert_tower,
    log_inv,
    read_bert_config,
)
from trainer.precision import autocast, usable_autocast_dtype
from trainer.tasks.base import Task, default_no_weight_decay


@dataclass
class ImageTowerConfig:
    """The image tower: Data2Vec2 embeddings and first blocks, from the fairseq teacher checkpoint."""

    checkpoint: str = ""  # Data2Vec2 fairseq checkpoint (base_imagenet.pt); required
    depth: int = field(default=6, metadata=between(1))  # blocks copied into the tower
    num_heads: int = field(default=0, metadata=between(0))  # 0: from the checkpoint's cfg (else 12)
    norm_eps: float = field(default=0.0, metadata=between(0.0))  # 0: from the checkpoint's cfg (else 1e-6)
    train_pos_embed: bool = False  # the sin-cos positions stay fixed (fairseq, the thesis); True trains them


@dataclass
class TextTowerConfig:
    """The text tower: BERT embeddings and first layers, from a local Hugging Face directory."""

    path: str = ""  # directory with config.json + model.safetensors (e.g. bert-base-uncased); required
    depth: int = field(default=6, metadata=between(1))  # layers copied into the tower


@dataclass
class MultimodalTeacherConfig:
    """The frozen image teacher whose last-block [CLS] is the distillation target."""

    kind: str = field(default="beitv2", metadata=choice("beitv2", "data2vec2"))  # checkpoint format
    checkpoint: str = ""  # beitv2: original .pth (beitv2_base_patch16_224_pt1k.pth); data2vec2: fairseq .pt
    final_norm: bool = False  # beitv2: keep the final LayerNorm (the thesis replaces it by an identity)
    drop_path: float = field(default=0.1, metadata=between(0.0, 1.0))  # built with it; inactive in eval mode
    num_heads: int = field(default=0, metadata=between(0))  # data2vec2 only: 0 = from the checkpoint's cfg
    dtype: str = field(default="bfloat16", metadata=choice("bfloat16", "float16", "float32"))  # forward precision


@dataclass
class SharedModelConfig:
    """The new parts of the student: token-type embedding and the shared block."""

    num_heads: int = field(default=12, metadata=between(1))  # heads of the shared block
    mlp_ratio: float = field(default=4.0, metadata=between(0.0))  # shared block MLP width / model width
    layer_scale: float = field(default=0.2, metadata=between(0.0))  # LayerScale init of the shared block
    token_type_scale: float = field(default=1e-5, metadata=between(0.0))  # LayerScale init on the token-type embedding


@dataclass
class MultimodalLossConfig:
    """Image-text contrastive loss and contrastive distillation with a memory bank."""

    itc_weight: float = field(default=1.0, metadata=between(0.0))  # weight of the image-text contrastive loss
    itc_on_interm: bool = True  # also the ITC loss on x_interm, averaged (reference code; the thesis text drops it)
    temperature: float = field(default=0.07, metadata=between(0.01, 1.0))  # ITC logit scales start at ln(1/t)
    kd_weight: float = field(default=1.0, metadata=between(0.0))  # weight of the contrastive distillation
    # the distillation logit scale starts at ln(1/t)
    kd_temperature: float = field(default=0.07, metadata=between(0.01, 1.0))
    # fixed at kd_temperature, as in the thesis run (never optimised); True learns it
    learn_kd_temperature: bool = False
    # earlier teacher targets kept as negatives; 0: none
    memory_bank_size: int = field(default=65536, metadata=between(0))


@dataclass
class MultimodalConfig:
    """The task's top-level config sections."""

    image_tower: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text_tower: TextTowerConfig = field(default_factory=TextTowerConfig)
    teacher: MultimodalTeacherConfig = field(default_factory=MultimodalTeacherConfig)
    model: SharedModelConfig = field(default_factory=SharedModelConfig)
    loss: MultimodalLossConfig = field(default_factory=MultimodalLossConfig)


# ---------------------------------------------------------------------------------------------
# teachers


class Data2Vec2CLS(nn.Module):
    """A Data2Vec2 ViT as a [CLS] teacher: the last block's [CLS]."""

    def __init__(self, vit: d2v.Data2Vec2ViT):
        super().__init__()
        self.vit = vit
        self.dim = vit.shape.dim

    def forward_cls(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        return self.vit(img_BCHW)[-1][:, 0]


def build_teacher(tcfg: MultimodalTeacherConfig) -> nn.Module:
    """The frozen teacher in eval mode; `forward_cls(images)` -> [B, D] targets."""
    if tcfg.kind == "beitv2":
        model = beit.load_beitv2(tcfg.checkpoint, drop_path_rate=tcfg.drop_path, final_norm=tcfg.final_norm)
        model.dim = model.shape.dim
    else:
        model = Data2Vec2CLS(d2v.load_data2vec2(tcfg.checkpoint, tcfg.num_heads))
    return model.requires_grad_(False).eval()


# ---------------------------------------------------------------------------------------------
# cheap shape reading for check_config (no model is built)


def _peek_tensors(path: str, key: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config key '{key}': file not found: {p}")
    try:  # memory-mapped: only the tensors' headers are read
        ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001  (a pickled fairseq cfg, or an old non-zip file)
        ckpt = d2v.read_checkpoint(p)
    for wrap in ("model", "module", "state_dict"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(wrap), dict):
            return ckpt[wrap]
    return ckpt if isinstance(ckpt, dict) else {}


def image_geometry(kind: str, path: str, key: str) -> tuple[int, int, int]:
    """(img_size, dim, depth) of a Data2Vec2 or BEiTv2 checkpoint, from its tensor shapes."""
    sd = _peek_tensors(path, key)
    try:
        if kind == "data2vec2":
            shape = d2v.shape_from_state_dict(d2v.map_fairseq_keys(sd), None, num_heads=1)
        else:
            sd = {k: v for k, v in sd.items() if torch.is_tensor(v)}
            shape = beit.shape_from_state_dict(sd, path)
    except UserError as e:
        raise ConfigError(f"config key '{key}': {e}") from None
    return shape.img_size, shape.dim, shape.depth


# ---------------------------------------------------------------------------------------------


class MultimodalTask(Task):
    """S-SMKE: see the module docstring."""

    name = "multimodal"
    config_class = MultimodalConfig
    data_kind = "image_text"

    @classmethod
    def check_config(cls, cfg) -> None:
        t = cfg.task_cfg
        for key, value in (("image_tower.checkpoint", t.image_tower.checkpoint), ("text_tower.path", t.text_tower.path),
                           ("teacher.checkpoint", t.teacher.checkpoint), ("data.tokenizer", cfg.data.tokenizer)):
            if not value:
                raise ConfigError(f"config key '{key}' is empty: the multimodal task needs it")
        size = cfg.data.augment.size
        img_size, img_dim, img_depth = image_geometry("data2vec2", t.image_tower.checkpoint, "image_tower.checkpoint")
        if t.image_tower.depth > img_depth:
            raise ConfigError(f"config key 'image_tower.depth': {t.image_tower.depth} is more than the "
                              f"{img_depth} blocks of the Data2Vec2 checkpoint")
        if size != img_size:
            raise ConfigError(f"config key 'data.augment.size': {size} px, but the image tower has positions "
                              f"for {img_size} px images")
        t_size, _, _ = image_geometry(t.teacher.kind, t.teacher.checkpoint, "teacher.checkpoint")
        t_key = "data.teacher_augment.size" if cfg.data.teacher_view else "data.augment.size"
        t_view = cfg.data.teacher_augment.size if cfg.data.teacher_view else size
        if t_view != t_size:
            raise ConfigError(f"config key '{t_key}': {t_view} px, but the {t.teacher.kind} teacher "
                              f"has positions for {t_size} px images")
        if not Path(t.text_tower.path).is_dir():
            raise ConfigError(f"config key 'text_tower.path': not a directory: {t.text_tower.path}")
        try:
            bert = read_bert_config(t.text_tower.path)
        except UserError as e:
            raise ConfigError(f"config key 'text_tower.path': {e}") from None
        if t.text_tower.depth > bert.get("num_hidden_layers", 0):
            raise ConfigError(f"config key 'text_tower.depth': {t.text_tower.depth} is more than the "
                              f"{bert.get('num_hidden_layers')} layers of {t.text_tower.path}")
        if cfg.data.text_max_len > bert.get("max_position_embeddings", 512):
            raise ConfigError(f"config key 'data.text_max_len': {cfg.data.text_max_len} tokens, but the text "
                              f"tower has {bert.get('max_position_embeddings')} positions")
        if bert.get("hidden_size") != img_dim:
            raise ConfigError(f"config key 'text_tower.path': the shared block needs both towers at the same "
                              f"width, text {bert.get('hidden_size')} vs image {img_dim}")
        if img_dim % t.model.num_heads:
            raise ConfigError(f"config key 'model.num_heads': {t.model.num_heads} does not divide the width {img_dim}")
        if cfg.data.tokenizer and Path(cfg.data.tokenizer).exists():
            from trainer.data.text import load_tokenizer

            try:
                vocab = load_tokenizer(cfg.data.tokenizer).get_vocab_size()
            except (ValueError, FileNotFoundError) as e:
                raise ConfigError(f"config key 'data.tokenizer': {e}") from None
            if vocab > bert.get("vocab_size", vocab):
                raise ConfigError(f"config key 'data.tokenizer': {vocab} tokens, more than the text tower's "
                                  f"vocabulary of {bert.get('vocab_size')}")

    def __init__(self, cfg, device: torch.device):
        super().__init__(cfg, device)
        t = cfg.task_cfg
        for key, value in (("image_tower.checkpoint", t.image_tower.checkpoint), ("text_tower.path", t.text_tower.path),
                           ("teacher.checkpoint", t.teacher.checkpoint)):
            if not value:
                raise UserError(f"config key '{key}' is empty: the multimodal task needs it")
        torch.manual_seed(cfg.seed)  # the new weights of the student
        image = image_tower_from_data2vec2(t.image_tower.checkpoint, t.image_tower.depth, t.image_tower.train_pos_embed,
                                           t.image_tower.num_heads, t.image_tower.norm_eps)
        text = load_bert_tower(t.text_tower.path, t.text_tower.depth)
        teacher = build_teacher(t.teacher)
        student = SMKEStudent(image, text, num_heads=t.model.num_heads, mlp_ratio=t.model.mlp_ratio,
                              layer_scale=t.model.layer_scale, tte_init=t.model.token_type_scale, out_dim=teacher.dim,
                              logit_scale_init=log_inv(t.loss.temperature),
                              kd_logit_scale_init=log_inv(t.loss.kd_temperature))
        student.kd_logit_scale.requires_grad_(t.loss.learn_kd_temperature)
        self.student = student.to(device)
        self.teacher = teacher.to(device).eval()
        self.teacher_dtype = usable_autocast_dtype(device, t.teacher.dtype, "teacher.dtype", "teacher")
        self.student_dtype = usable_autocast_dtype(device, cfg.precision, "precision", "student")
        self.bank = MemoryBank(t.loss.memory_bank_size, teacher.dim, device)
        # gathered teacher targets of the micro-batches since the last optimiser step
        self._pending: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    # -- training -----------------------------------------------------------------------------

    def no_weight_decay(self, name: str, param: torch.Tensor) -> bool:
        """The reference's rule: no decay on 1-D params, biases, positions, [CLS], embeddings."""
        return (default_no_weight_decay(name, param) or "pos_embed" in name or "cls_token" in name
                or "embeddings" in name)

    def teacher_targets(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        """L2-normalised [CLS] of the teacher's last block, fp32, a normal (not inference) tensor."""
        self.teacher.eval()  # built with drop path: never let a stray .train() switch it on
        with torch.inference_mode(), autocast(self.device, self.teacher_dtype):
            target = self.teacher.forward_cls(img_BCHW)
        return nn.functional.normalize(target.float(), dim=-1).clone()

    def loss(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        lcfg = self.cfg.task_cfg.loss
        img = batch["image"]
        if self.cfg.precision == "fp32":
            img = img.float()
        # the teacher's own view when the loader cuts one (data.teacher_view), else the same image
        timg = batch.get("image_teacher", img)
        target = self.teacher_targets(timg.float() if self.cfg.precision == "fp32" else timg)
        with autocast(self.device, self.student_dtype):
            out = model(img, batch["input_ids"], batch["padding_mask"])
        valid = ~batch["is_pad"].to(img.device) if "is_pad" in batch else None
        log_scales = out["logit_scales"]
        itc = itc_loss(out["x_image"], out["x_text"], log_scales[1], valid)
        itc_total = itc["loss"]
        if lcfg.itc_on_interm:
            itc_interm = itc_loss(out["x_interm_image"], out["x_interm_text"], log_scales[0], valid)
            itc_total = (itc_total + itc_interm["loss"]) / 2
        bank = self.bank.entries() if self.bank.count else None
        kd = contrastive_kd_loss(out["encoder_out_image"], out["encoder_out_text"], target, bank,
                                 out["kd_logit_scale"], valid)
        if not model.training:
            return self._validation_losses(out, target, valid, itc, itc_total, kd)
        self._pending.append((kd["targets_global"], kd.get("valid_global")))  # training batches only fill the bank
        losses = {
            "loss": lcfg.itc_weight * itc_total + lcfg.kd_weight * kd["loss"],
            "itc_loss": itc_total.detach(),
            "itc_acc": itc["acc"],
            "kd_loss": kd["loss"].detach(),
            "kd_image_loss": kd["image_loss"].detach(),
            "kd_text_loss": kd["text_loss"].detach(),
            "kd_acc": kd["acc"],
            "logit_scale": log_scales[1].detach().float().exp(),
            "kd_temperature": (-out["kd_logit_scale"].detach().float()).exp(),
        }
        return losses

    def _validation_losses(self, out: dict, target: torch.Tensor, valid, itc: dict, itc_total: torch.Tensor,
                           kd_bank: dict) -> dict[str, torch.Tensor]:
        """The thesis's validation loss (Sx3HRe `validation_step`): the contrastive distillation
        over the global batch's targets alone, no bank and no ITC. It is `loss` here, so it
        decides best.pt; the ITC loss and the distillation with the bank's negatives are logged
        beside it."""
        kd = contrastive_kd_loss(out["encoder_out_image"], out["encoder_out_text"], target, None,
                                 out["kd_logit_scale"], valid)
        return {
            "loss": kd["loss"],
            "kd_loss": kd["loss"],
            "kd_image_loss": kd["image_loss"],
            "kd_text_loss": kd["text_loss"],
            "kd_acc": kd["acc"],
            "kd_bank_loss": kd_bank["loss"],
            "kd_bank_acc": kd_bank["acc"],
            "itc_loss": itc_total,
            "itc_acc": itc["acc"],
        }

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Enqueue this step's global teacher targets (padded repeats left out) and clamp the
        learnable logit scales to [0, ln 100]."""
        if self._pending:
            rows = [t if v is None else t[v] for t, v in self._pending]
            self.bank.push(torch.cat(rows))
            self._pending.clear()
        self.student.logit_scales.clamp_(0.0, LOGIT_SCALE_MAX)
        self.student.kd_logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)

    def state_dict(self) -> dict[str, Any]:
        return {"memory_bank": self.bank.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "memory_bank" not in state:
            raise ValueError(f"multimodal task state has no memory bank (keys {sorted(state)})")
        self.bank.load_state_dict(state["memory_bank"])
        self._pending.clear()

    # -- export and evaluation ------------------------------------------------------------------

    def student_arch(self) -> dict[str, Any]:
        return self.student.arch()

    @classmethod
    def build_student(cls, arch: dict[str, Any]) -> nn.Module:
        return SMKEStudent.from_arch(arch)

    @classmethod
    def student_encoders(cls, student: nn.Module) -> dict[str, nn.Module]:
        return {"image": ImageEncoder(student), "text": TextEncoder(student)}

