"""The S-SMKE student: an image tower and a text tower from the original unimodal teachers, a
token-type embedding, and one shared transformer block applied to each modality on its own.

    image  -> Data2Vec2 embeddings + blocks 0..d-1  -+                          +-> x, x_interm,
                                                      +-> + LayerScale(tte[m]) -> shared block -+   encoder_out
    text   -> BERT embeddings + layers 0..d-1       -+   (text 0, image 1)       (pre-LN, LS 0.2)

Per modality, at the [CLS] token (position 0) of the shared block's output:
- `x` = L2-normalised block output (retrieval embedding, image-text contrastive loss),
- `x_interm` = L2-normalised output of the block's MLP fc1 (before the activation),
- `encoder_out` = head(fc_norm(block output)) (contrastive distillation against the teacher).
The learnable logit scales of the two contrastive losses and the distillation temperature live
in this module (so the optimiser, DDP, checkpoints and export all see them).

The text tower is `transformers.BertModel` (loaded from a local Hugging Face directory, never
the hub); its dropout stays as the checkpoint's config sets it. `arch()` describes the whole
student as plain data; `SMKEStudent.from_arch` rebuilds an untrained copy without any file.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.errors import UserError
from trainer.models.text import bert_from_config, bert_student, load_bert
from trainer.models.vit import Data2Vec2ViT, ViTShape, load_data2vec2

NORM_EPS = 1e-6


def bert_normal_(t: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """normal(0, 0.02), untruncated: fairseq's `init_bert_params`, which the thesis's S-SMKE
    run applied to its new modules (`self.apply(init_bert_params)` in Sx3HRe)."""
    return nn.init.normal_(t, mean=0.0, std=std)


class LayerScale(nn.Module):
    """x * gamma, gamma a learnable vector initialised to a constant."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def qkv_with_qv_bias(x_BTD: torch.Tensor, weight: torch.Tensor, q_bias: torch.Tensor, v_bias: torch.Tensor,
                     num_heads: int) -> torch.Tensor:
    """q, k, v as [3, B, H, T, Dh] from one projection with a bias on q and v only (BEiT's layout,
    which the shared block follows)."""
    B, T, _ = x_BTD.shape
    bias = torch.cat([q_bias, torch.zeros_like(v_bias), v_bias])
    return F.linear(x_BTD, weight, bias).reshape(B, T, 3, num_heads, -1).permute(2, 0, 3, 1, 4)


class SharedAttention(nn.Module):
    """Multi-head self-attention with a bias on q and v only, and a key padding mask."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BTD: torch.Tensor, padding_mask_BT: torch.Tensor | None = None) -> torch.Tensor:
        B, T, D = x_BTD.shape
        qkv = qkv_with_qv_bias(x_BTD, self.qkv.weight, self.q_bias, self.v_bias, self.num_heads)
        # SDPA's boolean mask is True where attention is allowed; padded keys are left out
        attn_mask = None if padding_mask_BT is None else ~padding_mask_BT[:, None, None, :]
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class SharedBlock(nn.Module):
    """Pre-LN block with LayerScale; returns (MLP fc1 output, block output)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, layer_scale: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn = SharedAttention(dim, num_heads)
        self.ls1 = LayerScale(dim, layer_scale)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.ls2 = LayerScale(dim, layer_scale)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.ls1(self.attn(self.norm1(x), padding_mask))
        interm = self.fc1(self.norm2(x))
        x = x + self.ls2(self.fc2(self.act(interm)))
        return interm, x


def read_bert_config(path: str | Path) -> dict:
    """The config.json of a local Hugging Face BERT directory, as a dict."""
    p = Path(path)
    f = p / "config.json" if p.is_dir() else p
    if not f.is_file():
        raise UserError(f"text tower: no config.json in {p} (give a local Hugging Face BERT directory)")
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"text tower: {f} is not a readable config.json: {e}") from None


def load_bert_tower(path: str | Path, depth: int) -> nn.Module:
    """BERT embeddings + its first `depth` layers from a local directory (the text task's loader:
    safetensors, or a pickled file read weights-only; no hub), with the checkpoint's dropout."""
    if not Path(path).is_dir():
        raise UserError(f"text tower: no config.json in {path} (give a local Hugging Face BERT directory)")
    bert = load_bert(str(path))
    return bert_student(bert, depth, bert.config.hidden_dropout_prob, key="text_tower.depth")


class SMKEStudent(nn.Module):
    """Both towers, the token-type embedding, the shared block, the distillation head and the
    learnable logit scales. `forward(image, input_ids, padding_mask)` returns a dict with
    `x_image, x_interm_image, encoder_out_image`, the same for `_text`, and the log logit
    scales `logit_scales` ([x_interm, x]) and `kd_logit_scale`."""

    def __init__(self, image_tower: Data2Vec2ViT, text_tower: nn.Module, *, num_heads: int, mlp_ratio: float,
                 layer_scale: float, tte_init: float, out_dim: int, logit_scale_init: float,
                 kd_logit_scale_init: float):
        super().__init__()
        dim = image_tower.shape.dim
        if text_tower.config.hidden_size != dim:
            raise UserError(f"the shared block needs both towers at the same width: image {dim}, "
                            f"text {text_tower.config.hidden_size}")
        if dim % num_heads:
            raise UserError(f"config key 'model.num_heads': {num_heads} does not divide the width {dim}")
        self.dim = dim
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.token_type_embeddings = nn.Embedding(2, dim)
        self.tte_scale = LayerScale(dim, tte_init)
        self.shared = SharedBlock(dim, num_heads, mlp_ratio, layer_scale)
        self.fc_norm = nn.LayerNorm(dim, eps=NORM_EPS)
        self.head = nn.Linear(dim, out_dim)
        self._init_new_weights()
        # log logit scales: [0] for x_interm, [1] for x (image-text contrastive), and the
        # contrastive distillation's own one; clamped to [0, ln 100] after every step
        self.logit_scales = nn.Parameter(torch.full((2,), float(logit_scale_init)))
        self.kd_logit_scale = nn.Parameter(torch.tensor(float(kd_logit_scale_init)))
        self.hparams = {"num_heads": num_heads, "mlp_ratio": mlp_ratio, "layer_scale": layer_scale,
                        "tte_init": tte_init, "out_dim": out_dim, "logit_scale_init": logit_scale_init,
                        "kd_logit_scale_init": kd_logit_scale_init}

    def _init_new_weights(self) -> None:
        for m in (self.token_type_embeddings, self.shared, self.fc_norm, self.head):
            for sub in m.modules():
                if isinstance(sub, (nn.Linear, nn.Embedding)):
                    bert_normal_(sub.weight)
                    if getattr(sub, "bias", None) is not None:
                        nn.init.zeros_(sub.bias)
                elif isinstance(sub, nn.LayerNorm):
                    nn.init.ones_(sub.weight)
                    nn.init.zeros_(sub.bias)

    # -- towers -------------------------------------------------------------------------------

    def _shared(self, x_BTD: torch.Tensor, type_id: int, padding_mask: torch.Tensor | None):
        tte = self.tte_scale(self.token_type_embeddings.weight[type_id]).to(x_BTD.dtype)
        return self.shared(x_BTD + tte, padding_mask)

    def image_tokens(self, img_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(fc1 output, shared block output) of the image tokens, [CLS] at 0."""
        return self._shared(self.image_tower(img_BCHW)[-1], 1, None)

    def text_tokens(self, input_ids_BT: torch.Tensor,
                    padding_mask_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        padding_mask_BT = padding_mask_BT.bool()
        h = self.text_tower(input_ids=input_ids_BT, attention_mask=(~padding_mask_BT).long()).last_hidden_state
        return self._shared(h, 0, padding_mask_BT)

    def outputs(self, interm_BTH: torch.Tensor, x_BTD: torch.Tensor) -> dict[str, torch.Tensor]:
        cls = x_BTD[:, 0]
        return {"x": F.normalize(cls.float(), dim=-1),
                "x_interm": F.normalize(interm_BTH[:, 0].float(), dim=-1),
                "encoder_out": self.head(self.fc_norm(cls))}

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor,
                padding_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        # the logit scales travel in the output so the loss reaches them through the (possibly
        # DDP-wrapped) forward, as open_clip does
        out = {"logit_scales": self.logit_scales, "kd_logit_scale": self.kd_logit_scale}
        for k, v in self.outputs(*self.image_tokens(image)).items():
            out[k + "_image"] = v
        for k, v in self.outputs(*self.text_tokens(input_ids, padding_mask)).items():
            out[k + "_text"] = v
        return out

    # -- plain description --------------------------------------------------------------------

    def arch(self) -> dict[str, Any]:
        return {"image_tower": asdict(self.image_tower.shape),
                "image_train_pos_embed": bool(self.image_tower.pos_embed.requires_grad),
                "text_tower": self.text_tower.config.to_dict(), **self.hparams}

    @classmethod
    def from_arch(cls, arch: dict[str, Any]) -> SMKEStudent:
        image = Data2Vec2ViT(ViTShape(**arch["image_tower"]), train_pos_embed=arch.get("image_train_pos_embed", False))
        text = bert_from_config(arch["text_tower"])
        keys = ("num_heads", "mlp_ratio", "layer_scale", "tte_init", "out_dim", "logit_scale_init",
                "kd_logit_scale_init")
        return cls(image, text, **{k: arch[k] for k in keys})


class ImageEncoder(nn.Module):
    """Encoder contract "image": images -> shared-block tokens [B, 1+N, D], [CLS] at 0."""

    def __init__(self, student: SMKEStudent):
        super().__init__()
        self.student = student

    def forward(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        return self.student.image_tokens(img_BCHW)[1]


class TextEncoder(nn.Module):
    """Encoder contract "text": (ids, padding mask) -> shared-block tokens [B, T, D], [CLS] at 0."""

    def __init__(self, student: SMKEStudent):
        super().__init__()
        self.student = student

    def forward(self, input_ids_BT: torch.Tensor, padding_mask_BT: torch.Tensor) -> torch.Tensor:
        return self.student.text_tokens(input_ids_BT, padding_mask_BT)[1]


def image_tower_from_data2vec2(path: str | Path, depth: int, train_pos_embed: bool = False,
                               num_heads: int = 0, norm_eps: float = 0.0) -> Data2Vec2ViT:
    """Data2Vec2 embeddings + blocks 0..depth-1, copied from the fairseq teacher checkpoint."""
    full = load_data2vec2(path, num_heads, norm_eps)
    if depth > full.shape.depth:
        raise UserError(f"config key 'image_tower.depth': {depth} is more than the {full.shape.depth} "
                        f"blocks of {path}")
    tower = Data2Vec2ViT(replace(full.shape, depth=depth), train_pos_embed=train_pos_embed)
    sd = {k: v for k, v in full.state_dict().items()
          if not k.startswith("blocks.") or int(k.split(".")[1]) < depth}
    tower.load_state_dict(sd, strict=True)
    return tower


def log_inv(t: float) -> float:
    """ln(1 / t): the log logit scale of a temperature t."""
    return math.log(1.0 / t)
