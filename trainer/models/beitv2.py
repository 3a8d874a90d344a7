"""BEiTv2 image ViT: timm's `Beit` built to the shape of a checkpoint in the original layout, the
loader of that layout, and a writer of small random checkpoints in it (tests, `make demo`).

The model is timm's (microsoft/unilm `beitv2/modeling_pretrain.py`, the pretrained ViT-B/16 of
`beitv2_base_patch16_224_pt1k.pth`): a biased patch conv; a [CLS] token; no absolute position
embedding but a relative position bias shared by all blocks (`rel_pos_bias.*`; fine-tuning
layouts keep one per block, `blocks.N.attn.relative_position_bias_table`); pre-LN blocks with
LayerScale (`gamma_1`, `gamma_2`), q and v biases only, stochastic depth; a final LayerNorm `norm`.
timm keeps the original parameter names, so what this module adds is the mapping of the file:
the shape read from its tensors, the pretraining-only parts dropped (`mask_token`, the
tokenizer head `lm_head.*`, the patch-aggregation layers `cls_pt_layers.*`), the stored
position index checked, and every encoder tensor required to land. Checkpoints keep their
weights under "model" (or "module") and are read with the allow-list reader of trainer/models/vit.py.
"""

from __future__ import annotations

import functools
import io
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from timm.models.beit import Beit, gen_relative_position_index
from torch import nn

from trainer.errors import UserError
from trainer.models.vit import read_checkpoint

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
    """BEiT's [1+N, 1+N] index into the bias table (timm's): (2g-1)^2 relative offsets between
    patches, then three extra entries for cls->token, token->cls and cls->cls."""
    return gen_relative_position_index((grid, grid))


class BEiTv2ViT(Beit):
    """timm's BEiT with its `shape`. `forward` returns the tokens after the last block and the
    final norm (an identity when built with final_norm=False, as the multimodal teacher is)."""

    def __init__(self, shape: BEiTShape, drop_path_rate: float = 0.0, final_norm: bool = True):
        super().__init__(img_size=shape.img_size, patch_size=shape.patch_size, embed_dim=shape.dim, depth=shape.depth,
                         num_heads=shape.num_heads, mlp_ratio=shape.mlp_ratio, num_classes=0, global_pool="token",
                         use_abs_pos_emb=shape.abs_pos_embed, use_shared_rel_pos_bias=shape.shared_rel_pos_bias,
                         use_rel_pos_bias=not shape.shared_rel_pos_bias, init_values=shape.layer_scale,
                         drop_path_rate=drop_path_rate, norm_layer=functools.partial(nn.LayerNorm, eps=shape.norm_eps))
        self.shape = shape
        if not final_norm:
            self.norm = nn.Identity()

    def forward(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        if img_BCHW.shape[-2:] != (self.shape.img_size,) * 2:  # timm would stop on an assert
            raise UserError(f"images of {img_BCHW.shape[-1]} px, but the BEiTv2 teacher has relative positions "
                            f"for {self.shape.img_size} px: set data.augment.size")
        return self.forward_features(img_BCHW)

    def forward_cls(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        """The [CLS] token of the last block (after `norm`), [B, D]."""
        return self.forward(img_BCHW)[:, 0]


def _random_init(model: BEiTv2ViT, seed: int, std: float) -> None:
    """Random init in the style of the original (trunc-normal, std 0.02; bias tables too, so that
    the relative position bias matters in tests). A larger `std` gives a random teacher whose
    [CLS] depends visibly on the image (demos, tests that must learn). Seeded: the same file
    from the same seed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma_1", "gamma_2")):
                continue
            if ".norm" in name or name.startswith("norm."):
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith(".bias") and "proj" not in name and "fc" not in name:
                p.zero_()
            else:
                p.copy_((torch.randn(p.shape, generator=g) * std).clamp_(-2 * std, 2 * std))


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
    if (2 * grid - 1) ** 2 + 3 != n_dist:  # (2g-1)^2 offsets + 3 [CLS] entries
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
        # a buffer timm rebuilds (and does not save); a different one would mean another position scheme
        if not torch.equal(sd.pop(key).long(), expected_index):
            raise UserError(f"BEiTv2 checkpoint {path}: {key} differs from BEiT's relative position index")
    if not final_norm:
        sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
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
    _random_init(model, seed, init_std)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    # the original files hold the position index buffers (timm rebuilds them, unsaved)
    for name, buf in model.named_buffers():
        if name.endswith("relative_position_index"):
            sd[name] = buf.clone()
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
