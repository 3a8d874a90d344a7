"""BEiTv2 image ViT: the module, a loader for the original checkpoint layout, and a writer of
small random checkpoints in that layout (tests, `make demo`).

Architecture (microsoft/unilm `beitv2/modeling_pretrain.py`, the pretrained ViT-B/16 of
`beitv2_base_patch16_224_pt1k.pth`): a biased patch conv; a [CLS] token; no absolute position
embedding but a relative position bias shared by all blocks (`rel_pos_bias.*`; fine-tuning
layouts keep one per block, `blocks.N.attn.relative_position_bias_table`); pre-LN blocks with
LayerScale (`gamma_1`, `gamma_2`), an attention whose qkv projection has a bias on q and v only
(`attn.q_bias`, `attn.v_bias`), stochastic depth; a final LayerNorm `norm`.

Our parameter names are the original ones, so a checkpoint loads with no renaming. What the
pretraining checkpoint holds beyond the encoder is dropped: `mask_token`, the tokenizer head
`lm_head.*` and the patch-aggregation layers `cls_pt_layers.*`. Checkpoints keep their weights
under "model" (or "module").
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trainer.errors import UserError
from trainer.models.vit import Mlp, read_checkpoint

# pretraining-only parts of the original checkpoint (not part of the encoder)
_DROPPED_PREFIXES = ("mask_token", "lm_head.", "cls_pt_layers.")


@dataclass
class BEiTShape:
    """What a BEiTv2 ViT looks like; read from the checkpoint's tensors."""

    img_size: int = 224
    patch_size: int = 16
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    shared_rel_pos_bias: bool = True  # the pretraining layout; False: one table per block
    abs_pos_embed: bool = False  # BEiTv2 pretraining uses none
    layer_scale: float = 0.1  # LayerScale init (only matters for random init)

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


def relative_position_index(grid: int) -> torch.Tensor:
    """BEiT's [1+N, 1+N] index into the bias table: (2g-1)^2 relative offsets between patches,
    then three extra entries for cls->token, token->cls and cls->cls."""
    coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # [N, N, 2]
    rel[:, :, 0] += grid - 1
    rel[:, :, 1] += grid - 1
    rel[:, :, 0] *= 2 * grid - 1
    n_dist = (2 * grid - 1) ** 2 + 3
    index = torch.zeros((grid * grid + 1,) * 2, dtype=torch.long)
    index[1:, 1:] = rel.sum(-1)
    index[0, 0:] = n_dist - 3
    index[0:, 0] = n_dist - 2
    index[0, 0] = n_dist - 1
    return index


def num_relative_distance(grid: int) -> int:
    return (2 * grid - 1) ** 2 + 3


class RelativePositionBias(nn.Module):
    """A learned bias per head and relative offset, [H, 1+N, 1+N] when called."""

    def __init__(self, grid: int, num_heads: int):
        super().__init__()
        self.grid = grid
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_relative_distance(grid), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(grid))

    def forward(self) -> torch.Tensor:
        n = self.grid * self.grid + 1
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous()


class DropPath(nn.Module):
    """Stochastic depth per sample (active in train mode only)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


def qkv_with_qv_bias(x_BTD: torch.Tensor, weight: torch.Tensor, q_bias: torch.Tensor, v_bias: torch.Tensor,
                     num_heads: int) -> torch.Tensor:
    """q, k, v as [3, B, H, T, Dh] from one projection with a bias on q and v only (BEiT's
    layout, also the S-SMKE shared block's)."""
    B, T, _ = x_BTD.shape
    bias = torch.cat([q_bias, torch.zeros_like(v_bias), v_bias])
    return F.linear(x_BTD, weight, bias).reshape(B, T, 3, num_heads, -1).permute(2, 0, 3, 1, 4)


class Attention(nn.Module):
    """Multi-head attention; qkv without bias plus separate q and v biases (k has none)."""

    def __init__(self, dim: int, num_heads: int, grid: int | None):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        if grid is not None:  # per-block bias (fine-tuning layout)
            self.relative_position_bias_table = nn.Parameter(torch.zeros(num_relative_distance(grid), num_heads))
            self.register_buffer("relative_position_index", relative_position_index(grid))
            self.grid = grid
        else:
            self.relative_position_bias_table = None

    def forward(self, x_BTD: torch.Tensor, rel_pos_bias: torch.Tensor | None) -> torch.Tensor:
        B, T, D = x_BTD.shape
        qkv = qkv_with_qv_bias(x_BTD, self.qkv.weight, self.q_bias, self.v_bias, self.num_heads)
        attn_bias = rel_pos_bias
        if self.relative_position_bias_table is not None:
            n = self.grid * self.grid + 1
            own = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
            own = own.permute(2, 0, 1)
            attn_bias = own if attn_bias is None else attn_bias + own
        if attn_bias is not None:
            attn_bias = attn_bias.to(qkv.dtype).unsqueeze(0)  # [1, H, T, T]
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_bias)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """Pre-LN block with LayerScale: x += gamma_1 * attn(norm1(x)); x += gamma_2 * mlp(norm2(x))."""

    def __init__(self, shape: BEiTShape, drop_path: float):
        super().__init__()
        D = shape.dim
        self.norm1 = nn.LayerNorm(D, eps=shape.norm_eps)
        self.attn = Attention(D, shape.num_heads, None if shape.shared_rel_pos_bias else shape.grid)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(D, eps=shape.norm_eps)
        self.mlp = Mlp(D, int(D * shape.mlp_ratio))
        self.gamma_1 = nn.Parameter(shape.layer_scale * torch.ones(D))
        self.gamma_2 = nn.Parameter(shape.layer_scale * torch.ones(D))

    def forward(self, x: torch.Tensor, rel_pos_bias: torch.Tensor | None) -> torch.Tensor:
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x), rel_pos_bias))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


class BEiTv2ViT(nn.Module):
    """BEiTv2 encoder. `forward` returns the tokens after the last block and the final norm
    (an identity when built with final_norm=False, as the multimodal teacher is)."""

    def __init__(self, shape: BEiTShape, drop_path_rate: float = 0.0, final_norm: bool = True):
        super().__init__()
        self.shape = shape
        D = shape.dim
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, D, kernel_size=shape.patch_size, stride=shape.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, shape.grid ** 2 + 1, D)) if shape.abs_pos_embed else None
        self.rel_pos_bias = RelativePositionBias(shape.grid, shape.num_heads) if shape.shared_rel_pos_bias else None
        # the stochastic depth decay rule of the original: linear from 0 to drop_path_rate
        rates = torch.linspace(0, drop_path_rate, shape.depth).tolist()
        self.blocks = nn.ModuleList(Block(shape, r) for r in rates)
        self.norm = nn.LayerNorm(D, eps=shape.norm_eps) if final_norm else nn.Identity()

    def init_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Random init in the style of the original (trunc-normal, std 0.02; bias tables too,
        so that the relative position bias matters in tests). A larger `std` gives a random
        teacher whose [CLS] depends visibly on the image (demos, tests that must learn)."""
        g = torch.Generator().manual_seed(seed)

        def tn(t: torch.Tensor) -> None:
            with torch.no_grad():
                t.copy_((torch.randn(t.shape, generator=g) * std).clamp_(-2 * std, 2 * std))

        for name, p in self.named_parameters():
            if name.endswith(("gamma_1", "gamma_2")):
                continue
            if ".norm" in name or name.startswith("norm."):
                with torch.no_grad():
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith(".bias") and "proj" not in name and "fc" not in name:
                with torch.no_grad():
                    p.zero_()
            else:
                tn(p)

    def forward(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(img_BCHW).flatten(2).transpose(1, 2)
        n = self.shape.grid ** 2
        if x.shape[1] != n:
            raise UserError(
                f"images of {img_BCHW.shape[-1]} px give {x.shape[1]} patches, the BEiTv2 teacher has "
                f"relative positions for {n} (img_size {self.shape.img_size}): set data.augment.size"
            )
        x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed.to(x.dtype)
        rel = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for blk in self.blocks:
            x = blk(x, rel)
        return self.norm(x)

    def forward_cls(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        """The [CLS] token of the last block (after `norm`), [B, D]."""
        return self.forward(img_BCHW)[:, 0]


# ---------------------------------------------------------------------------------------------
# the original checkpoint layout


def _state_dict_of(ckpt, path) -> dict[str, torch.Tensor]:
    if isinstance(ckpt, dict):
        for key in ("model", "module", "state_dict"):
            if isinstance(ckpt.get(key), dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not any(torch.is_tensor(v) for v in ckpt.values()):
        raise UserError(f"BEiTv2 checkpoint {path} holds no state dict (looked under 'model' and 'module')")
    return {k: v for k, v in ckpt.items() if torch.is_tensor(v)}


def shape_from_state_dict(sd: dict[str, torch.Tensor], path="checkpoint", norm_eps: float = 1e-6) -> BEiTShape:
    """Infer the shape from the tensors: widths from the patch conv and fc1, depth from the
    block indices, heads and the patch grid from the relative position bias table."""
    try:
        w = sd["patch_embed.proj.weight"]
        dim, patch = w.shape[0], w.shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError):
        raise UserError(f"{path} does not hold a BEiTv2 model (missing patch embedding or blocks)") from None
    shared = "rel_pos_bias.relative_position_bias_table" in sd
    table = sd.get("rel_pos_bias.relative_position_bias_table", sd.get("blocks.0.attn.relative_position_bias_table"))
    if table is None:
        raise UserError(f"{path}: no relative position bias table (rel_pos_bias.* or blocks.0.attn.*); "
                        "only the BEiTv2 layout with relative positions is supported")
    n_dist, heads = table.shape
    grid = round(((n_dist - 3) ** 0.5 + 1) / 2)
    if num_relative_distance(grid) != n_dist:
        raise UserError(f"{path}: relative position bias table of {n_dist} rows fits no square patch grid")
    gamma = sd.get("blocks.0.gamma_1")
    return BEiTShape(img_size=grid * patch, patch_size=patch, dim=dim, depth=depth, num_heads=heads,
                     mlp_ratio=hidden / dim, norm_eps=norm_eps, shared_rel_pos_bias=shared,
                     abs_pos_embed="pos_embed" in sd,
                     layer_scale=float(gamma.float().mean()) if gamma is not None else 0.1)


def load_beitv2(path: str | Path, drop_path_rate: float = 0.1, final_norm: bool = False,
                norm_eps: float = 1e-6) -> BEiTv2ViT:
    """Build a BEiTv2 encoder from an original checkpoint; every encoder tensor must land.
    `final_norm=False` replaces the last LayerNorm by an identity (its weights are dropped)."""
    sd = _state_dict_of(read_checkpoint(path), path)
    sd = {k: v for k, v in sd.items() if not k.startswith(_DROPPED_PREFIXES)}
    shape = shape_from_state_dict(sd, path, norm_eps)
    if shape.dim % shape.num_heads:
        raise UserError(f"BEiTv2 checkpoint {path}: dim {shape.dim} is not divisible by {shape.num_heads} heads")
    model = BEiTv2ViT(shape, drop_path_rate=drop_path_rate, final_norm=final_norm)
    expected_index = relative_position_index(shape.grid)
    for key in [k for k in sd if k.endswith("relative_position_index")]:
        # a buffer we rebuild; a different one would mean a different position scheme
        if not torch.equal(sd[key].long(), expected_index):
            raise UserError(f"BEiTv2 checkpoint {path}: {key} differs from BEiT's relative position index")
    if not final_norm:
        sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("relative_position_index")]
    if missing or unexpected:
        raise UserError(f"BEiTv2 checkpoint {path} does not match a BEiTv2 ViT: "
                        f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return model


def load_teacher(path: str | Path, num_heads: int = 0, norm_eps: float = 0.0) -> BEiTv2ViT:
    """The registry's loader (trainer/models/registry.py): the encoder without stochastic depth,
    its last block's tokens as they are (no final norm, as the multimodal teacher reads them).
    The file says the heads; `num_heads` is not needed."""
    return load_beitv2(path, drop_path_rate=0.0, final_norm=False, norm_eps=norm_eps or 1e-6)


def write_beitv2_checkpoint(path: str | Path, shape: BEiTShape, seed: int = 0, wrap: str = "model",
                            vocab_size: int = 64, init_std: float = 0.02) -> Path:
    """Write a random BEiTv2 in the original pretraining layout: the encoder's keys (with the
    relative position index buffers and the final norm) plus `mask_token`, `lm_head` and a
    `cls_pt_layers` block the loader must drop, under `wrap` ("model" or "module")."""
    model = BEiTv2ViT(shape, final_norm=True)
    model.init_weights(seed, init_std)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    D = shape.dim
    g = torch.Generator().manual_seed(seed + 1)
    sd["mask_token"] = torch.randn(1, 1, D, generator=g) * 0.02
    sd["lm_head.weight"] = torch.randn(vocab_size, D, generator=g) * 0.02
    sd["lm_head.bias"] = torch.zeros(vocab_size)
    sd["cls_pt_layers.0.norm1.weight"] = torch.ones(D)
    sd["cls_pt_layers.0.gamma_1"] = torch.ones(D) * shape.layer_scale
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    # the original files also carry training metadata next to the weights
    torch.save({wrap: sd, "epoch": 299, "shape": asdict(shape)}, buf)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(p)
    return p


def write_demo_beitv2(path: str | Path, img_size: int, patch: int, dim: int, depth: int, heads: int,
                      seed: int = 0) -> Path:
    """A random demo teacher in the original layout, initialised wide (std 0.2, LayerScale 1) so
    that its [CLS] differs from image to image and a demo has something to distil."""
    shape = BEiTShape(img_size=img_size, patch_size=patch, dim=dim, depth=depth, num_heads=heads, layer_scale=1.0)
    return write_beitv2_checkpoint(path, shape, seed=seed, init_std=0.2)
