"""Text distillation (F-DistilBERT): a frozen BERT teacher, a student made of its embeddings and
first layers, and an MSE between layer-averaged hidden states over the real tokens.

Targets: every hidden state BERT returns, the embedding output included (13 teacher tensors for
BERT-base, 7 for a 6-layer student), each instance-normalised over all positions of its block
(padding included, as the thesis code did), then averaged; no final LayerNorm. `loss.layers:
"1..L"` leaves the embedding output out (the thesis formula's layers 1..L). The student's
prediction is built the same way from its own hidden states, and the MSE is averaged over the
non-padding tokens of the global batch (and over the features).

The teacher stays outside the trainable module (never wrapped by DDP, never optimised, never
saved), in eval mode, under `torch.inference_mode()`; the student keeps BERT's dropout in
training and none in validation (the loop switches its mode).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.config import ConfigError
from trainer.errors import UserError
from trainer.fields import between, choice
from trainer.losses import layer_average_target
from trainer.models.text import (
    BertTextEncoder,
    attention_mask,
    bert_from_config,
    bert_student,
    load_bert,
    local_bert_config,
)
from trainer.precision import autocast, usable_autocast_dtype
from trainer.tasks.base import Task, default_no_weight_decay

LAYER_CHOICES = ("all", "1..L")


@dataclass
class TextTeacherConfig:
    """The frozen BERT teacher, in the Hugging Face format."""

    path: str = "bert-base-uncased"  # local BERT directory (config.json + model.safetensors) or a hub id
    # teacher forward precision
    dtype: str = field(default="bfloat16", metadata=choice("bfloat16", "float16", "float32"))


@dataclass
class TextStudentConfig:
    """The student: the teacher's embeddings plus its first `depth` layers."""

    depth: int = field(default=6, metadata=between(1))  # number of teacher layers copied into the student
    dropout: float = field(default=0.1, metadata=between(0.0, 1.0))  # hidden and attention dropout (BERT's 0.1)
    init: str = field(default="teacher", metadata=choice("teacher", "random"))  # copy teacher weights or re-initialise


@dataclass
class TextLossConfig:
    """Which hidden states build the targets."""

    # "all": the embedding output and every layer's output (13 teacher / 7 student tensors), as
    # the thesis code did; "1..L": the layer outputs only (12 / 6), as the thesis formula writes
    layers: str = field(default="all", metadata=choice(*LAYER_CHOICES))
    # the thesis's targets are built on line-packed blocks (`shardify openwebtext --packing lines`):
    # their padding enters every target through the instance norm. True also trains on
    # stream-packed (contiguous, unpadded) blocks, which give other targets.
    allow_stream_blocks: bool = False


@dataclass
class TextKDConfig:
    """The text task's top-level config sections."""

    teacher: TextTeacherConfig = field(default_factory=TextTeacherConfig)
    student: TextStudentConfig = field(default_factory=TextStudentConfig)
    loss: TextLossConfig = field(default_factory=TextLossConfig)


def select_layers(hidden_states: tuple[torch.Tensor, ...], layers: str) -> tuple[torch.Tensor, ...]:
    """The hidden states that build a target: all of them, or without the embedding output."""
    return tuple(hidden_states) if layers == "all" else tuple(hidden_states[1:])


def hidden_state_target(hidden_states: tuple[torch.Tensor, ...], layers: str) -> torch.Tensor:
    """Instance norm over all positions per layer, averaged over the layers; fp32 [B, T, D]."""
    return layer_average_target(select_layers(hidden_states, layers), final_layer_norm=False)


def masked_token_mse(pred_BTD: torch.Tensor, target_BTD: torch.Tensor, keep_BT: torch.Tensor,
                     n_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error averaged over the features and over the kept tokens (fp32); 0 when no token
    is kept. `n_tokens` replaces the local count of kept tokens as the divisor (see
    `tokens_per_rank`)."""
    err_BT = (pred_BTD.float() - target_BTD.float()).pow(2).mean(-1)
    w = keep_BT.to(err_BT.dtype)
    n = w.sum() if n_tokens is None else n_tokens.to(err_BT.dtype)
    return (err_BT * w).sum() / n.clamp(min=1.0)


def tokens_per_rank(keep_BT: torch.Tensor) -> torch.Tensor:
    """The kept tokens of all ranks divided by the number of ranks. Dividing each rank's sum by
    it makes DDP's gradient average the mean over every real token of the global batch, however
    the padding is spread over the ranks (a per-rank mean would weight a rank's tokens by how
    few it has). One scalar all-reduce per micro-batch; the count alone without DDP."""
    n = keep_BT.sum().float()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if world > 1:
            torch.distributed.all_reduce(n)
            n = n / world
    return n


class TextKDStudent(nn.Module):
    """The trainable part: a BertModel (no pooler). forward(ids, padding mask) returns the
    student's layer-averaged prediction, built like the teacher's target."""

    def __init__(self, bert: nn.Module, layers: str = "all"):
        super().__init__()
        self.bert = bert
        self.layers = layers

    def forward(self, input_ids_BT: torch.Tensor, padding_mask_BT: torch.Tensor) -> torch.Tensor:
        out = self.bert(input_ids=input_ids_BT, attention_mask=attention_mask(padding_mask_BT),
                        output_hidden_states=True)
        return hidden_state_target(out.hidden_states, self.layers)


def _manifest_tokenizer(path: str) -> tuple[Path, dict | None] | None:
    """(manifest path, its tokenizer record or None) of a local manifest; None when the path is
    remote or absent (the loader reports those)."""
    p = Path(path).expanduser()
    if "://" in path:
        return None
    if p.is_dir():
        p = p / "manifest.json"
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # the loader gives the precise error
    tok = m.get("tokenizer") if isinstance(m, dict) else None
    return p, tok if isinstance(tok, dict) else None


def _tokenizer_vocab_size(path: str) -> int:
    try:
        from trainer.data.text import load_tokenizer

        return load_tokenizer(path).get_vocab_size()
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"config key 'data.tokenizer': {exc}") from None


class TextKDTask(Task):
    """F-DistilBERT: builds teacher and student; `loss(model, batch)` returns {"loss": mse}."""

    name = "text_kd"
    config_class = TextKDConfig
    data_kind = "text"

    def __init__(self, cfg, device: torch.device):
        super().__init__(cfg, device)
        tcfg = cfg.task_cfg
        self.layers = tcfg.loss.layers
        teacher = load_bert(tcfg.teacher.path).float()
        # a hub teacher's config is only known now (check_config reads local ones)
        if cfg.data.block_size > teacher.config.max_position_embeddings:
            raise UserError(f"config key 'data.block_size': {cfg.data.block_size} is more than the "
                            f"teacher's {teacher.config.max_position_embeddings} positions")
        # the student copies the teacher's fp32 weights before the teacher moves to its device
        torch.manual_seed(cfg.seed)
        bert = bert_student(teacher, tcfg.student.depth, tcfg.student.dropout, tcfg.student.init)
        self.student = TextKDStudent(bert, self.layers).to(device)
        teacher.requires_grad_(False)
        self.teacher = teacher.to(device).eval()
        self.teacher_dtype = usable_autocast_dtype(device, tcfg.teacher.dtype, "teacher.dtype", "teacher")
        self.student_dtype = usable_autocast_dtype(device, cfg.precision, "precision", "student")

    # -- config -------------------------------------------------------------------------------

    @classmethod
    def check_config(cls, cfg) -> None:
        tcfg = cfg.task_cfg
        if not tcfg.teacher.path:
            raise ConfigError("config key 'teacher.path' is empty: give a BERT directory or hub id "
                              "(e.g. bert-base-uncased)")
        bert = local_bert_config(tcfg.teacher.path)  # None for a hub id: checked when loaded
        if bert is not None:
            n_pos = bert.get("max_position_embeddings", 512)
            if cfg.data.block_size > n_pos:
                raise ConfigError(f"config key 'data.block_size': {cfg.data.block_size} is more than the "
                                  f"teacher's {n_pos} positions ({tcfg.teacher.path})")
            n_layers = bert.get("num_hidden_layers", 12)
            if tcfg.student.depth > n_layers:
                raise ConfigError(f"config key 'student.depth': {tcfg.student.depth} is more than the "
                                  f"teacher's {n_layers} layers")
        vocab = bert.get("vocab_size") if bert else None
        records = [r for r in (_manifest_tokenizer(m) for m in cfg.data.manifests) if r is not None]
        for mpath, tok in records:
            if tok is None:
                if not cfg.data.tokenizer:
                    raise ConfigError(f"config key 'data.tokenizer': {mpath} holds raw text; give the "
                                      "teacher's tokenizer (or shard with --tokenizer)")
                continue
            if vocab is not None and tok.get("vocab_size") not in (None, vocab):
                raise ConfigError(f"config key 'data.manifests': {mpath} was tokenised with a vocabulary of "
                                  f"{tok['vocab_size']} ({tok.get('name', '?')}), the teacher has {vocab}")
            if tok.get("packing") != "lines" and not tcfg.loss.allow_stream_blocks:
                raise ConfigError(f"config key 'data.manifests': {mpath} holds stream-packed blocks, the thesis "
                                  "recipe trains on line-packed ones (shardify openwebtext --packing lines); "
                                  "loss.allow_stream_blocks=true uses them anyway")
            bs = tok.get("block_size")
            if isinstance(bs, int) and bs > cfg.data.block_size:
                raise ConfigError(f"config key 'data.block_size': {cfg.data.block_size} would cut the "
                                  f"{bs}-token blocks of {mpath}")
        if cfg.data.tokenizer and vocab is not None:
            n = _tokenizer_vocab_size(cfg.data.tokenizer)
            if n != vocab:
                raise ConfigError(f"config key 'data.tokenizer': its vocabulary has {n} entries, the "
                                  f"teacher's {vocab}")

    # -- training -----------------------------------------------------------------------------

    def no_weight_decay(self, name: str, param: torch.Tensor) -> bool:
        """1-D parameters and biases, and every embedding parameter (word, position, type)."""
        return default_no_weight_decay(name, param) or ".embeddings." in f".{name}"

    def teacher_targets(self, ids_BT: torch.Tensor, pad_BT: torch.Tensor) -> torch.Tensor:
        self.teacher.eval()  # guards against a stray .train() on a parent module
        with torch.inference_mode(), autocast(self.device, self.teacher_dtype):
            out = self.teacher(input_ids=ids_BT, attention_mask=attention_mask(pad_BT), output_hidden_states=True)
            target = hidden_state_target(out.hidden_states, self.layers)
        # inference tensors cannot be saved for backward; a clone outside the mode is a normal one
        return target.clone()

    def loss(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        ids = batch["input_ids"].to(self.device, non_blocking=True)
        pad = batch["padding_mask"].to(self.device, non_blocking=True)
        target = self.teacher_targets(ids, pad)
        with autocast(self.device, self.student_dtype):
            pred = model(ids, pad)
        keep = ~pad
        if "is_pad" in batch:  # repeats the loader added to even out ranks count for nothing
            keep = keep & ~batch["is_pad"].to(self.device, non_blocking=True)[:, None]
        return {"loss": masked_token_mse(pred, target, keep, tokens_per_rank(keep))}

    # -- export and evaluation ------------------------------------------------------------------

    def student_arch(self) -> dict[str, Any]:
        return {"bert_config": json.loads(self.student.bert.config.to_json_string()), "layers": self.layers}

    @classmethod
    def build_student(cls, arch: dict[str, Any]) -> nn.Module:
        return TextKDStudent(bert_from_config(arch["bert_config"]), arch.get("layers", "all"))

    @classmethod
    def student_encoders(cls, student: nn.Module) -> dict[str, nn.Module]:
        return {"text": BertTextEncoder(student.bert)}
