"""BERT teacher and student for text distillation, built with `transformers` from the HF format.

- `load_bert(source)`: a frozen-ready `BertModel` (pooler dropped) from a local directory
  (config.json + model.safetensors, or a pytorch_model.bin read with torch's weights-only
  unpickler: no code from a pickle ever runs) or a hub id such as `bert-base-uncased`
  (safetensors only; offline it must already be in the Hugging Face cache).
- `bert_student(teacher, depth, dropout, init)`: the teacher's embeddings and first `depth`
  layers, as a new `BertModel` with its own dropout.
- `bert_from_config(config_dict)`: an untrained `BertModel` of a given architecture (export,
  evaluation), no weight file needed.
- `BertTextEncoder`: the "text" encoder of the evaluation contract: (ids, padding mask) ->
  last hidden state.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.errors import UserError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLED = "pytorch_model.bin"


def _quiet_transformers():
    """Import transformers with its load reports and progress bars off (they would flood the
    training log with one table per model)."""
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return transformers


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def local_bert_config(source: str) -> dict | None:
    """The config.json of a local model directory as a dict, or None for a hub id (cheap: no
    model import; config checks use it)."""
    p = Path(source).expanduser()
    cfg = p / "config.json"
    if not p.is_dir() or not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{cfg}: not a readable JSON config ({exc})") from None


def _bin_state_dict(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """A pickled BERT checkpoint read with weights_only=True, its keys mapped onto BertModel's
    (a "bert." prefix from BertFor* heads; the old LayerNorm gamma/beta names)."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the weights-only unpickler refuses anything but tensors and containers
        raise UserError(f"{path}: cannot be read as plain weights (weights_only=True): "
                        f"{str(exc).splitlines()[0]}") from None
    if not isinstance(sd, dict):
        raise UserError(f"{path}: expected a state dict, got {type(sd).__name__}")
    wanted = set(model.state_dict())
    out = {}
    for k, v in sd.items():
        k2 = k[len("bert."):] if k.startswith("bert.") else k
        k2 = k2.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if k2 in wanted:
            out[k2] = v
    missing = sorted(wanted - set(out) - {"embeddings.position_ids"})
    if missing:
        raise UserError(f"{path}: not a BERT checkpoint; missing {len(missing)} weights, e.g. {missing[0]}")
    return out


def load_bert(source: str) -> nn.Module:
    """A `transformers.BertModel` without pooler, in eval mode, from a local dir or a hub id."""
    transformers = _quiet_transformers()
    p = Path(source).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"{p}: no config.json (expected a Hugging Face BERT directory)")
        config = transformers.BertConfig.from_pretrained(str(p), local_files_only=True)
        if getattr(config, "model_type", "bert") != "bert":
            raise UserError(f"{p}: config.json describes a {config.model_type!r} model, not BERT")
        if (p / SAFETENSORS).is_file() or (p / SAFETENSORS_INDEX).is_file():
            model = transformers.BertModel.from_pretrained(
                str(p), config=config, add_pooling_layer=False, local_files_only=True, use_safetensors=True)
        elif (p / PICKLED).is_file():
            model = transformers.BertModel(config, add_pooling_layer=False)
            model.load_state_dict(_bin_state_dict(p / PICKLED, model), strict=False)
        else:
            raise UserError(f"{p}: no {SAFETENSORS} or {PICKLED} weights")
        return model.eval()
    if p.exists() or source.startswith((".", "/", "~")):
        raise UserError(f"teacher {source!r}: not a directory holding a Hugging Face BERT")
    try:
        model = transformers.BertModel.from_pretrained(
            source, add_pooling_layer=False, local_files_only=_offline(), use_safetensors=True)
    except Exception as exc:  # hub errors come in many types; the user needs one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = "offline (HF_HUB_OFFLINE=1) and not in the Hugging Face cache" if _offline() else "not loadable"
        raise UserError(f"teacher {source!r}: {where}; give a local BERT directory instead ({first})") from None
    return model.eval()


def bert_from_config(config: dict[str, Any]) -> nn.Module:
    """An untrained BertModel (no pooler) of the architecture `config` describes."""
    transformers = _quiet_transformers()
    return transformers.BertModel(transformers.BertConfig.from_dict(dict(config)), add_pooling_layer=False)


def bert_student(teacher: nn.Module, depth: int, dropout: float, init: str = "teacher",
                 key: str = "student.depth") -> nn.Module:
    """The teacher's embeddings and first `depth` layers as a new BertModel with hidden and
    attention dropout `dropout`; `init="random"` keeps the architecture, re-initialised. `key`
    names the config key of `depth` in the error."""
    n = teacher.config.num_hidden_layers
    if depth > n:
        raise UserError(f"config key '{key}': {depth} is more than the teacher's {n} layers")
    cfg = teacher.config.to_dict()
    cfg.update(num_hidden_layers=depth, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    for k in ("torch_dtype", "dtype", "_name_or_path", "architectures"):
        cfg.pop(k, None)
    student = bert_from_config(cfg)
    if init == "teacher":
        sd = {k: v for k, v in teacher.state_dict().items()
              if not k.startswith("encoder.layer.") or int(k.split(".")[2]) < depth}
        student.load_state_dict(sd, strict=True)
    return student.float()


def attention_mask(padding_mask_BT: torch.Tensor) -> torch.Tensor:
    """HF's attention mask (1 = attend) from ours (True = padding)."""
    return (~padding_mask_BT.bool()).long()


class BertTextEncoder(nn.Module):
    """The "text" encoder: forward(input_ids_BT, padding_mask_BT) -> last hidden state, [CLS]
    at position 0. Shares its BertModel with the module it was taken from."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids_BT: torch.Tensor, padding_mask_BT: torch.Tensor | None = None,
                token_type_ids_BT: torch.Tensor | None = None) -> torch.Tensor:
        """`token_type_ids_BT` (BERT's segment ids, 0 for the first text and 1 for the second of a
        pair) is an extra the GLUE fine-tuning uses; the encoder contract leaves it at 0."""
        if padding_mask_BT is None:
            padding_mask_BT = torch.zeros_like(input_ids_BT, dtype=torch.bool)
        return self.bert(input_ids=input_ids_BT, attention_mask=attention_mask(padding_mask_BT),
                         token_type_ids=token_type_ids_BT).last_hidden_state
