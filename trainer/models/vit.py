"""Data2Vec2 image ViT: the module, the fairseq checkpoint loader, and a tiny random checkpoint.

Architecture (fairseq `data2vec_multi`, image modality): a biased patch conv; the fixed 2-D
sin-cos position embedding added to the patches; a [CLS] token prepended *after* that; a
LayerNorm on the embeddings (`context_encoder.norm`); post-LN blocks
(`x = norm1(x + attn(x)); x = norm2(x + mlp(x))`); no final norm.

Our parameter names follow timm (`patch_embed.proj`, `cls_token`, `pos_embed`, `norm_pre`,
`blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`), so the key mapping is the one the
reference code applies (REFERENCE.md section 2).
"""

from __future__ import annotations

import io
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trainer.errors import UserError

FAIRSEQ_PREFIX = "modality_encoders.IMAGE."
# fairseq name -> our name, applied after the prefix is dropped (the reference loader's mapping)
_RENAMES = (
    ("extra_tokens", "cls_token"),
    ("local_encoder", "patch_embed"),
    ("fixed_positional_encoder.positions", "pos_embed"),
    ("context_encoder.norm", "norm_pre"),
)


@dataclass
class ViTShape:
    """What a Data2Vec2 image ViT looks like; read from the checkpoint's tensors and cfg."""

    img_size: int = 224
    patch_size: int = 16
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos embedding, [grid*grid, dim]; half the channels encode each axis."""
    assert dim % 4 == 0, "sin-cos position embedding needs dim divisible by 4"

    def one_axis(pos: torch.Tensor, d: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1, 1).double() * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    coords = torch.arange(grid, dtype=torch.float64)
    gw, gh = torch.meshgrid(coords, coords, indexing="xy")  # MAE puts w first
    emb = torch.cat([one_axis(gw, dim // 2), one_axis(gh, dim // 2)], dim=1)
    return emb.float()


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        return self.proj(img_BCHW).flatten(2).transpose(1, 2)  # [B, N, D]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        qkv = self.qkv(x_BTD).reshape(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [B, H, T, Dh]
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PostLNBlock(nn.Module):
    """fairseq AltBlock with layer_norm_first=False. Returns (block output, FFN output)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.norm1(x + self.attn(x))
        ffn = self.mlp(x)
        # the FFN output (before residual and norm2) is what original data2vec 2.0 regresses
        return self.norm2(x + ffn), ffn


class Data2Vec2ViT(nn.Module):
    """Data2Vec2 image encoder; `forward` returns every block's output (and FFN outputs)."""

    def __init__(self, shape: ViTShape, train_pos_embed: bool = True):
        super().__init__()
        self.shape = shape
        self.patch_embed = PatchEmbed(shape.patch_size, shape.dim)
        grid = shape.img_size // shape.patch_size
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(shape.dim, grid)[None], requires_grad=train_pos_embed)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, shape.dim))
        self.norm_pre = nn.LayerNorm(shape.dim, eps=shape.norm_eps)
        self.blocks = nn.ModuleList(
            PostLNBlock(shape.dim, shape.num_heads, shape.mlp_ratio, shape.norm_eps) for _ in range(shape.depth)
        )
        self.init_weights()

    def init_weights(self) -> None:
        """Random init in the style of fairseq/MAE (trunc-normal 0.02 linears, unit norms)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, img_BCHW: torch.Tensor, with_ffn: bool = False):
        """Returns the list of block outputs [B, 1+N, D] (and of FFN outputs when with_ffn)."""
        x = self.patch_embed(img_BCHW)
        if x.shape[1] != self.pos_embed.shape[1]:
            raise UserError(
                f"images of {img_BCHW.shape[-1]} px give {x.shape[1]} patches, the model has positions "
                f"for {self.pos_embed.shape[1]} (img_size {self.shape.img_size}): set data.augment.size"
            )
        x = x + self.pos_embed.to(x.dtype)
        x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm_pre(x)
        outs, ffns = [], []
        for blk in self.blocks:
            x, ffn = blk(x)
            outs.append(x)
            ffns.append(ffn)
        return (outs, ffns) if with_ffn else outs


# ---------------------------------------------------------------------------------------------
# fairseq checkpoint format


class _Stub:
    """Stands in for classes we do not have (omegaconf, argparse.Namespace subclasses...)."""

    def __init__(self, *a, **k):
        pass

    def __setstate__(self, state):
        self.__dict__["_state"] = state


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return _Stub


class _LenientPickle:
    """A pickle module for torch.load that tolerates missing classes in a checkpoint's cfg."""

    Unpickler = _LenientUnpickler
    load = pickle.load
    __name__ = "pickle"


def read_checkpoint(path: str | Path) -> dict:
    """torch.load a fairseq checkpoint on CPU. Real ones pickle an omegaconf cfg, which needs
    the full unpickler; classes that are not installed become stubs (we only need tensors)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"teacher checkpoint not found: {p}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # not plain tensors and dicts: a real fairseq checkpoint
    except Exception as e:  # noqa: BLE001  (a truncated or non-torch file)
        raise UserError(f"teacher checkpoint {p} could not be read: {type(e).__name__}: {e}") from None
    try:
        return torch.load(p, map_location="cpu", weights_only=False, pickle_module=_LenientPickle)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"teacher checkpoint {p} could not be read: {type(e).__name__}: {e}") from None


def _cfg_get(cfg, *keys):
    """Walk dicts / stubs / objects for keys; None when absent."""
    node = cfg
    for k in keys:
        if node is None:
            return None
        if isinstance(node, _Stub):
            node = node.__dict__.get("_state", {})
            if isinstance(node, dict) and "_content" in node:  # omegaconf DictConfig
                node = node["_content"]
        if isinstance(node, dict):
            node = node.get(k)
        else:
            node = getattr(node, k, None)
        if isinstance(node, _Stub) and "_val" in node.__dict__.get("_state", {}):  # omegaconf ValueNode
            node = node.__dict__["_state"]["_val"]
    return node


def map_fairseq_keys(model_sd: dict, keep_blocks: int | None = None) -> dict[str, torch.Tensor]:
    """fairseq data2vec_multi image keys -> our keys; drops decoder / EMA weights and blocks
    beyond `keep_blocks`."""
    out = {}
    for key, value in model_sd.items():
        # decoder/_ema as the reference; ema./recon_proj: other data2vec_multi training-only parts
        if ("decoder" in key or "_ema" in key or key.startswith(("ema.", "recon_proj."))
                or not torch.is_tensor(value)):
            continue
        new = key[len(FAIRSEQ_PREFIX):] if key.startswith(FAIRSEQ_PREFIX) else key
        if new.startswith("blocks."):
            if keep_blocks is not None and int(new.split(".")[1]) >= keep_blocks:
                continue
        for old, repl in _RENAMES:
            new = new.replace(old, repl)
        out[new] = value
    return out


def shape_from_state_dict(sd: dict[str, torch.Tensor], cfg, num_heads: int = 0, norm_eps: float = 0.0) -> ViTShape:
    """Infer the ViT's shape from the mapped tensors; heads and eps come from cfg (or config)."""
    try:
        w = sd["patch_embed.proj.weight"]
        dim, patch = w.shape[0], w.shape[-1]
        n = sd["pos_embed"].shape[1]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError):
        raise UserError("teacher checkpoint does not hold a Data2Vec2 image model (missing patch "
                        "embedding, positions or blocks)") from None
    grid = math.isqrt(n)
    heads = num_heads or _cfg_get(cfg, "model", "num_heads") or 12
    eps = norm_eps or _cfg_get(cfg, "model", "norm_eps") or 1e-6
    return ViTShape(img_size=grid * patch, patch_size=patch, dim=dim, depth=depth, num_heads=int(heads),
                    mlp_ratio=hidden / dim, norm_eps=float(eps))


def load_data2vec2(path: str | Path, num_heads: int = 0, norm_eps: float = 0.0) -> Data2Vec2ViT:
    """Build the teacher from a fairseq checkpoint; every tensor must land somewhere."""
    ckpt = read_checkpoint(path)
    model_sd = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(model_sd, dict):
        raise UserError(f"teacher checkpoint {path} holds no 'model' state dict")
    sd = map_fairseq_keys(model_sd)
    shape = shape_from_state_dict(sd, ckpt.get("cfg"), num_heads, norm_eps)
    if shape.dim % shape.num_heads:
        raise UserError(f"teacher dim {shape.dim} is not divisible by num_heads {shape.num_heads}")
    model = Data2Vec2ViT(shape)
    sd = {k: v.float() for k, v in sd.items()}
    if "pos_embed" in sd and sd["pos_embed"].dim() == 2:
        sd["pos_embed"] = sd["pos_embed"][None]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise UserError(f"teacher checkpoint {path} does not match a Data2Vec2 ViT: "
                        f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return model


def to_fairseq_state_dict(model: Data2Vec2ViT) -> dict[str, torch.Tensor]:
    """Our keys -> fairseq keys (the inverse of `map_fairseq_keys`)."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("blocks."):
            out[key] = value.clone()
            continue
        new = key
        for old, repl in _RENAMES:
            new = new.replace(repl, old)
        out[FAIRSEQ_PREFIX + new] = value.clone()
    return out


def write_fairseq_checkpoint(path: str | Path, shape: ViTShape, seed: int = 0) -> Path:
    """Write a random-initialised Data2Vec2 image model in the real fairseq layout: the model's
    keys plus decoder and EMA weights the loader must drop, and a plain-dict cfg."""
    torch.manual_seed(seed)
    model = Data2Vec2ViT(shape)
    sd = to_fairseq_state_dict(model)
    D = shape.dim
    # a miniature of the real extras: the image decoder's conv blocks and projection, the EMA copy
    sd[FAIRSEQ_PREFIX + "decoder.blocks.0.0.weight"] = torch.randn(D, D // 16 or 1, 3, 3) * 0.02
    sd[FAIRSEQ_PREFIX + "decoder.blocks.0.0.bias"] = torch.zeros(D)
    sd[FAIRSEQ_PREFIX + "decoder.proj.weight"] = torch.randn(D, D) * 0.02
    sd[FAIRSEQ_PREFIX + "decoder.proj.bias"] = torch.zeros(D)
    sd["_ema"] = {k: v.clone() for k, v in sd.items() if k.startswith("blocks.0.")}
    cfg = {
        "model": {
            "_name": "data2vec_multi", "embed_dim": D, "depth": shape.depth, "num_heads": shape.num_heads,
            "mlp_ratio": shape.mlp_ratio, "norm_eps": shape.norm_eps, "layer_norm_first": False,
            "modalities": {"image": {"patch_size": shape.patch_size, "input_size": shape.img_size,
                                     "num_extra_tokens": 1, "prenet_depth": 0}},
        },
        "task": {"_name": "mae_image_pretraining"},
    }
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"model": sd, "cfg": cfg}, buf)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(p)
    return p
