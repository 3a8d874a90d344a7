"""Data2Vec2 image ViT: the module, the fairseq checkpoint loader, and a tiny random checkpoint.

Architecture (fairseq `data2vec_multi`, image modality, post-LN): a biased patch conv; the fixed
2-D sin-cos position embedding added to the patches; a [CLS] token prepended *after* that; a
LayerNorm on the embeddings (`context_encoder.norm`); then, in checkpoints trained with
`prenet_depth > 0`, the image modality's own blocks (`context_encoder.blocks`); then the shared
post-LN blocks (`x = norm1(x + attn(x)); x = norm2(x + mlp(x))`); no final norm.

Each shared block yields two tensors: its output, and the output of its feed-forward network
before the residual add and norm2 (fairseq's "layer result" with `end_of_block_targets: false`,
what data2vec 2.0 and the thesis's image run regress). Prenet blocks belong to the embedding
stage: fairseq collects no layer results from them.

Our parameter names follow timm (`patch_embed.proj`, `cls_token`, `pos_embed`, `norm_pre`,
`blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`), plus `prenet.i.*` for the
modality blocks. Checkpoints are read with the allow-list unpickler (trainer/safe_pickle.py).
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trainer.errors import UserError
from trainer.safe_pickle import UnsafeCheckpointError, cfg_get, load_checkpoint, stubs_in, to_plain

FAIRSEQ_PREFIX = "modality_encoders.IMAGE."
# fairseq name -> our name, applied in order after the prefix is dropped
_RENAMES = (
    ("context_encoder.blocks.", "prenet."),
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
    prenet_depth: int = 0  # image-modality blocks run between the embedding norm and `blocks`

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


LAYER_TENSORS = ("ffn", "block")


def _no_autocast(device_type: str):
    """A context that turns autocast off on this device (nothing where autocast is unknown)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class Data2Vec2ViT(nn.Module):
    """Data2Vec2 image encoder; `forward` returns one tensor per shared block."""

    def __init__(self, shape: ViTShape, train_pos_embed: bool = False):
        super().__init__()
        self.shape = shape
        self.patch_embed = PatchEmbed(shape.patch_size, shape.dim)
        grid = shape.img_size // shape.patch_size
        # fixed in fairseq (requires_grad=False) and in the thesis run; a parameter either way so
        # that checkpoints and exports carry it
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(shape.dim, grid)[None], requires_grad=train_pos_embed)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, shape.dim))
        self.norm_pre = nn.LayerNorm(shape.dim, eps=shape.norm_eps)
        self.prenet = nn.ModuleList(
            PostLNBlock(shape.dim, shape.num_heads, shape.mlp_ratio, shape.norm_eps) for _ in range(shape.prenet_depth)
        )
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

    def embed(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        """Patches + positions, [CLS] prepended, embedding LayerNorm, prenet blocks: [B, 1+N, D].

        The patch conv, the position add, the [CLS] concat and the LayerNorm run in the
        parameters' dtype (fp32) with autocast off: adding the sin-cos positions in bf16/fp16
        would round them (bf16 keeps 8 bits of mantissa) before anything else happens."""
        with _no_autocast(img_BCHW.device.type):
            w = self.patch_embed.proj.weight
            x = self.patch_embed(img_BCHW.to(w.dtype))
            if x.shape[1] != self.pos_embed.shape[1]:
                raise UserError(
                    f"images of {img_BCHW.shape[-1]} px give {x.shape[1]} patches, the model has positions "
                    f"for {self.pos_embed.shape[1]} (img_size {self.shape.img_size}): set data.augment.size"
                )
            x = x + self.pos_embed
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            x = self.norm_pre(x)
        for blk in self.prenet:  # part of the embedding stage: not among the layer results
            x, _ = blk(x)
        return x

    def forward(self, img_BCHW: torch.Tensor, tensor: str = "block", with_ffn: bool = False):
        """One [B, 1+N, D] tensor per shared block: the block outputs (`tensor="block"`) or the
        FFN outputs before residual and norm2 (`tensor="ffn"`). `with_ffn=True` returns both
        lists, (block outputs, FFN outputs)."""
        if tensor not in LAYER_TENSORS:
            raise ValueError(f"tensor must be one of {LAYER_TENSORS}, not {tensor!r}")
        x = self.embed(img_BCHW)
        outs, ffns = [], []
        for blk in self.blocks:
            x, ffn = blk(x)
            # keep only what is asked for: the teacher's 12 layers of [B, 197, 768] add up
            if with_ffn or tensor == "block":
                outs.append(x)
            if with_ffn or tensor == "ffn":
                ffns.append(ffn)
        if with_ffn:
            return outs, ffns
        return ffns if tensor == "ffn" else outs


class LastBlockTokens(nn.Module):
    """A Data2Vec2 ViT as an encoder (evaluation, the image student's export): images -> the
    last block's output [B, 1+N, D], [CLS] first."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        return self.vit(img_BCHW)[-1]


# ---------------------------------------------------------------------------------------------
# fairseq checkpoint format


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint file on CPU with the allow-list unpickler (trainer/safe_pickle.py):
    tensors and plain containers come back as such, objects of any other class as inert stubs
    (a real fairseq file pickles an omegaconf cfg). Nothing in the file is ever executed."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"teacher checkpoint not found: {p}")
    try:
        ckpt = load_checkpoint(p)
    except UnsafeCheckpointError as e:
        raise UserError(f"teacher checkpoint {p} refused: {e}") from None
    except Exception as e:  # noqa: BLE001  (a truncated or non-torch file)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"teacher checkpoint {p} could not be read: {type(e).__name__}: {first}") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"teacher checkpoint {p} holds {_describe(ckpt)}, not a dict with a 'model' state dict")
    return ckpt


def _describe(value) -> str:
    stubs = stubs_in(value)
    if stubs:
        return f"an object of class {stubs[0]} (not loaded: not a tensor or plain container)"
    return f"a {type(value).__name__}"


def _dropped(key: str) -> bool:
    """Training-only parts of a data2vec_multi checkpoint: the decoders, the EMA teacher
    (`_ema`, `ema.`) and the reconstruction projection."""
    return "decoder" in key or "_ema" in key or key.startswith(("ema.", "recon_proj."))


def _map_keys(model_sd: dict, keep_blocks: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(our key -> tensor, our key -> the checkpoint's key)."""
    out, origin = {}, {}
    for key, value in model_sd.items():
        if not isinstance(key, str):
            raise UserError(f"teacher checkpoint: model state dict has a non-string key {key!r}")
        if _dropped(key):
            continue
        if not torch.is_tensor(value):
            raise UserError(f"teacher checkpoint: model key '{key}' holds {_describe(value)}, not a tensor")
        new = key[len(FAIRSEQ_PREFIX):] if key.startswith(FAIRSEQ_PREFIX) else key
        for old, repl in _RENAMES:
            new = new.replace(old, repl)
        if keep_blocks is not None and new.startswith("blocks.") and int(new.split(".")[1]) >= keep_blocks:
            continue
        out[new] = value
        origin[new] = key
    return out, origin


def map_fairseq_keys(model_sd: dict, keep_blocks: int | None = None) -> dict[str, torch.Tensor]:
    """fairseq data2vec_multi image keys -> our keys; drops decoder / EMA weights and shared
    blocks beyond `keep_blocks`. A non-tensor value under a kept key is an error."""
    return _map_keys(model_sd, keep_blocks)[0]


def _block_count(sd: dict, prefix: str) -> int:
    idx = {int(k.split(".")[1]) for k in sd if k.startswith(prefix) and k.split(".")[1].isdigit()}
    return max(idx) + 1 if idx else 0


def shape_from_state_dict(sd: dict[str, torch.Tensor], cfg, num_heads: int = 0, norm_eps: float = 0.0) -> ViTShape:
    """Infer the ViT's shape from the mapped tensors; heads and eps come from the cfg (a
    `to_plain` dict, or None) unless given. The cfg's depths, where present, must agree."""
    try:
        w = sd["patch_embed.proj.weight"]
        dim, patch = w.shape[0], w.shape[-1]
        n = sd["pos_embed"].shape[-2]
        hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, IndexError):
        raise UserError("teacher checkpoint does not hold a Data2Vec2 image model (missing patch "
                        "embedding, positions or blocks)") from None
    depth, prenet = _block_count(sd, "blocks."), _block_count(sd, "prenet.")
    cfg_prenet = cfg_get(cfg, "model", "modalities", "image", "prenet_depth")
    if isinstance(cfg_prenet, int) and cfg_prenet != prenet:
        raise UserError(f"teacher checkpoint: its cfg says prenet_depth {cfg_prenet} (model.modalities.image), but "
                        f"it holds {prenet} blocks under {FAIRSEQ_PREFIX}context_encoder.blocks")
    cfg_depth = cfg_get(cfg, "model", "depth")
    if isinstance(cfg_depth, int) and cfg_depth != depth:
        raise UserError(f"teacher checkpoint: its cfg says depth {cfg_depth} (model.depth), but it holds "
                        f"{depth} shared blocks")
    if cfg_get(cfg, "model", "layer_norm_first") is True:
        raise UserError("teacher checkpoint: a pre-LN model (model.layer_norm_first: true); only data2vec 2.0's "
                        "post-LN image models are supported")
    grid = math.isqrt(n)
    heads = num_heads or cfg_get(cfg, "model", "num_heads") or 12
    eps = norm_eps or cfg_get(cfg, "model", "norm_eps") or 1e-6
    return ViTShape(img_size=grid * patch, patch_size=patch, dim=dim, depth=depth, num_heads=int(heads),
                    mlp_ratio=hidden / dim, norm_eps=float(eps), prenet_depth=prenet)


def checkpoint_cfg(ckpt: dict):
    """The checkpoint's config as plain dicts: `cfg` (an omegaconf object or a dict), else the
    older fairseq `args` (an argparse Namespace, flat: wrapped as {"model": ...})."""
    cfg = to_plain(ckpt.get("cfg"))
    if isinstance(cfg, dict):
        return cfg
    args = to_plain(ckpt.get("args"))
    return {"model": args} if isinstance(args, dict) else None


# fairseq's data2vec_multi defaults for the target flags (data2vec2.py's Data2VecMultiConfig)
TARGET_FLAG_DEFAULTS = {"end_of_block_targets": False, "layer_norm_target_layer": False,
                        "instance_norm_target_layer": False}


def target_flags(cfg) -> dict[str, bool] | None:
    """What the checkpoint's cfg says about its layer targets (`model.end_of_block_targets`,
    `model.layer_norm_target_layer`, `model.instance_norm_target_layer`), fairseq's defaults for
    flags it leaves out; None when the file has no cfg at all."""
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        return None
    return {k: bool(v if (v := cfg_get(cfg, "model", k)) is not None else d) for k, d in TARGET_FLAG_DEFAULTS.items()}


def load_data2vec2(path: str | Path, num_heads: int = 0, norm_eps: float = 0.0) -> Data2Vec2ViT:
    """Build the teacher from a fairseq checkpoint; every tensor must land somewhere. The
    model's `target_flags` hold what the checkpoint's cfg says about its targets (`target_flags`)."""
    ckpt = read_checkpoint(path)
    model_sd = ckpt.get("model", ckpt)
    if not isinstance(model_sd, dict):
        raise UserError(f"teacher checkpoint {path}: 'model' holds {_describe(model_sd)}, not a state dict")
    sd, origin = _map_keys(model_sd)
    shape = shape_from_state_dict(sd, checkpoint_cfg(ckpt), num_heads, norm_eps)
    if shape.dim % shape.num_heads:
        raise UserError(f"teacher dim {shape.dim} is not divisible by num_heads {shape.num_heads}")
    model = Data2Vec2ViT(shape)
    sd = {k: v.float() for k, v in sd.items()}
    if "pos_embed" in sd and sd["pos_embed"].dim() == 2:
        sd["pos_embed"] = sd["pos_embed"][None]
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # a shape mismatch
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        raise UserError(f"teacher checkpoint {path} does not match a Data2Vec2 ViT: "
                        f"{'; '.join(lines[:3]) or str(e).splitlines()[0]}") from None
    if missing or unexpected:
        def names(keys):
            keys = sorted(keys)
            return f"{keys[:8]}{f' and {len(keys) - 8} more' if len(keys) > 8 else ''}"
        parts = []
        if unexpected:
            parts.append(f"keys it cannot place: {names(origin.get(k, k) for k in unexpected)}")
        if missing:
            parts.append(f"missing: {names(missing)}")
        raise UserError(f"teacher checkpoint {path} does not match a Data2Vec2 ViT: {'; '.join(parts)}")
    model.target_flags = target_flags(checkpoint_cfg(ckpt))
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


def fairseq_cfg(shape: ViTShape) -> dict:
    """The part of a data2vec_multi checkpoint's cfg the loader reads, as a plain dict."""
    return {
        "model": {
            "_name": "data2vec_multi", "embed_dim": shape.dim, "depth": shape.depth, "num_heads": shape.num_heads,
            "mlp_ratio": shape.mlp_ratio, "norm_eps": shape.norm_eps, "layer_norm_first": False,
            # the target flags of the released base_imagenet.pt (fairseq's base_images_only_task.yaml)
            "end_of_block_targets": False, "instance_norm_target_layer": True, "layer_norm_target_layer": False,
            "modalities": {"image": {"patch_size": shape.patch_size, "input_size": shape.img_size,
                                     "num_extra_tokens": 1, "prenet_depth": shape.prenet_depth}},
        },
        "task": {"_name": "mae_image_pretraining"},
    }


def write_fairseq_checkpoint(path: str | Path, shape: ViTShape, seed: int = 0,
                             dtype: torch.dtype = torch.float32) -> Path:
    """Write a random-initialised Data2Vec2 image model in the real fairseq layout: the model's
    keys (prenet blocks under `context_encoder.blocks` when `shape.prenet_depth`), decoder and
    EMA weights the loader must drop, and a plain-dict cfg. `dtype` is the stored float dtype."""
    torch.manual_seed(seed)
    model = Data2Vec2ViT(shape)
    sd = to_fairseq_state_dict(model)
    D = shape.dim
    # a miniature of the real extras: the image decoder's conv blocks and projection, the EMA copy
    sd[FAIRSEQ_PREFIX + "decoder.blocks.0.0.weight"] = torch.randn(D, D // 16 or 1, 3, 3) * 0.02
    sd[FAIRSEQ_PREFIX + "decoder.blocks.0.0.bias"] = torch.zeros(D)
    sd[FAIRSEQ_PREFIX + "decoder.proj.weight"] = torch.randn(D, D) * 0.02
    sd[FAIRSEQ_PREFIX + "decoder.proj.bias"] = torch.zeros(D)
    sd = {k: v.to(dtype) for k, v in sd.items()}
    sd["_ema"] = {k: v.clone() for k, v in sd.items() if k.startswith("blocks.0.")}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"model": sd, "cfg": fairseq_cfg(shape)}, buf)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(p)
    return p
