"""Data2Vec2 checkpoint fixtures in the layouts fairseq writes, beyond the plain one of
`trainer.models.vit.write_fairseq_checkpoint`:

- a cfg pickled as omegaconf objects, written WITHOUT omegaconf: stand-in classes named
  `omegaconf.dictconfig.DictConfig`, `omegaconf.listconfig.ListConfig`,
  `omegaconf.nodes.AnyNode`, `omegaconf.base.ContainerMetadata` / `Metadata`, whose pickled
  state has the shape omegaconf 2.0 (fairseq's pin) gives it: containers hold `_metadata`,
  `_parent` and `_content` (a dict or list of value nodes), value nodes `_val`, `_metadata`,
  `_parent`. The fake modules exist in sys.modules only while torch.save runs.
- malicious checkpoints: pickles that would run a command if a full unpickler read them.

and `reference_forward`: fairseq's image forward written out by hand on a checkpoint's own keys,
the independent reference the loaded models and the targets are checked against.
"""

from __future__ import annotations

import contextlib
import math
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.models.vit import ViTShape, write_fairseq_checkpoint

VIT_B16 = ViTShape(img_size=224, patch_size=16, dim=768, depth=12, num_heads=12)
P = "modality_encoders.IMAGE."


def _ref_block(x: torch.Tensor, sd: dict, b: str, heads: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fairseq AltBlock, post-LN: returns (block output, FFN output before residual and norm2)."""
    B, T, D = x.shape
    qkv = x @ sd[b + "attn.qkv.weight"].T + sd[b + "attn.qkv.bias"]
    q, k, v = qkv.reshape(B, T, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-2, -1) / math.sqrt(D // heads)).softmax(-1)
    a = (attn @ v).transpose(1, 2).reshape(B, T, D) @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"]
    x = F.layer_norm(x + a, (D,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps)
    h = F.gelu(x @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"])
    h = h @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"]
    return F.layer_norm(x + h, (D,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps), h


def reference_forward(sd: dict, img: torch.Tensor, heads: int, eps: float, ffn: bool = False) -> list[torch.Tensor]:
    """fairseq data2vec_multi image path written out by hand on the checkpoint's own keys:
    patch conv, + positions, prepend extra token, context_encoder.norm, the modality's own
    context_encoder.blocks (no layer results), then the shared post-LN AltBlocks; returns their
    outputs, or with `ffn` their FFN outputs (fairseq's layer_results, end_of_block_targets off)."""
    x = F.conv2d(img, sd[P + "local_encoder.proj.weight"], sd[P + "local_encoder.proj.bias"],
                 stride=sd[P + "local_encoder.proj.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)
    x = x + sd[P + "fixed_positional_encoder.positions"]
    x = torch.cat([sd[P + "extra_tokens"].expand(x.shape[0], -1, -1), x], dim=1)
    D = x.shape[-1]
    x = F.layer_norm(x, (D,), sd[P + "context_encoder.norm.weight"], sd[P + "context_encoder.norm.bias"], eps)
    i = 0
    while f"{P}context_encoder.blocks.{i}.attn.qkv.weight" in sd:
        x, _ = _ref_block(x, sd, f"{P}context_encoder.blocks.{i}.", heads, eps)
        i += 1
    outs = []
    i = 0
    while f"blocks.{i}.attn.qkv.weight" in sd:
        x, h = _ref_block(x, sd, f"blocks.{i}.", heads, eps)
        outs.append(h if ffn else x)
        i += 1
    return outs


def perturb_norms(path):
    """Random LayerNorm affine params, so a missed norm mapping cannot hide behind ones/zeros."""
    ckpt = torch.load(path, weights_only=True)
    g = torch.Generator().manual_seed(1)
    for k, v in ckpt["model"].items():
        if torch.is_tensor(v) and ("norm" in k or "extra_tokens" in k):
            ckpt["model"][k] = v + 0.3 * torch.randn(v.shape, generator=g)
    torch.save(ckpt, path)
    return ckpt


# ---------------------------------------------------------------------------------------------
# omegaconf-style cfg


class _Meta:
    """omegaconf.base.Metadata / ContainerMetadata: a dataclass pickled by its __dict__."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


class _Node:
    """omegaconf.nodes.AnyNode: the value under `_val`."""

    def __init__(self, val, parent, key):
        self._val = val
        self._metadata = _make("omegaconf.base", "Metadata", ref_type=_ANY, object_type=None, optional=True,
                               key=key, flags={})
        self._parent = parent

    def __getstate__(self):
        return {"_val": self._val, "_metadata": self._metadata, "_parent": self._parent}


class _Container:
    """omegaconf.dictconfig.DictConfig / listconfig.ListConfig."""

    def __getstate__(self):
        return {"_metadata": self._metadata, "_parent": self._parent, "_content": self._content}


_ANY = object()  # replaced by typing.Any at write time (pickled as the global typing.Any)
_CLASSES: dict[tuple[str, str], type] = {}


def _cls(module: str, name: str, base: type) -> type:
    key = (module, name)
    if key not in _CLASSES:
        cls = type(name, (base,), {})
        cls.__module__, cls.__qualname__ = module, name
        _CLASSES[key] = cls
    return _CLASSES[key]


def _make(module: str, name: str, **fields):
    obj = _cls(module, name, _Meta).__new__(_cls(module, name, _Meta))
    obj.__dict__.update({k: (__import__("typing").Any if v is _ANY else v) for k, v in fields.items()})
    return obj


def _wrap(value, parent=None, key=None):
    """A plain dict/list/value as omegaconf 2.0 holds it."""
    if isinstance(value, dict):
        node = _cls("omegaconf.dictconfig", "DictConfig", _Container)()
        node._metadata = _make("omegaconf.base", "ContainerMetadata", ref_type=_ANY, object_type=dict,
                               optional=True, key=key, flags={}, key_type=_ANY, element_type=_ANY)
        node._parent = parent
        node._content = {k: _wrap(v, node, k) for k, v in value.items()}
        return node
    if isinstance(value, list):
        node = _cls("omegaconf.listconfig", "ListConfig", _Container)()
        node._metadata = _make("omegaconf.base", "ContainerMetadata", ref_type=_ANY, object_type=list,
                               optional=True, key=key, flags={}, key_type=int, element_type=_ANY)
        node._parent = parent
        node._content = [_wrap(v, node, i) for i, v in enumerate(value)]
        return node
    return _cls("omegaconf.nodes", "AnyNode", _Node)(value, parent, key)


@contextlib.contextmanager
def _fake_modules():
    """The omegaconf module names, present only while pickling (never while loading)."""
    names = ["omegaconf", "omegaconf.base", "omegaconf.dictconfig", "omegaconf.listconfig", "omegaconf.nodes"]
    saved = {n: sys.modules.get(n) for n in names}
    try:
        for n in names:
            mod = types.ModuleType(n)
            for (m, cname), cls in _CLASSES.items():
                if m == n:
                    setattr(mod, cname, cls)
            sys.modules[n] = mod
        yield
    finally:
        for n, old in saved.items():
            if old is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = old


def omegaconf_style(cfg: dict):
    """The object graph of `OmegaConf.create(cfg)` as omegaconf 2.0 pickles it."""
    return _wrap(cfg)


def save_with_omegaconf_cfg(path: Path, ckpt: dict, cfg: dict) -> Path:
    """torch.save `ckpt` with `cfg` stored as omegaconf-style objects."""
    ckpt = dict(ckpt, cfg=omegaconf_style(cfg))
    with _fake_modules():
        torch.save(ckpt, path)
    return path


def make_teacher_omegaconf(path: Path, shape: ViTShape, extra_cfg: dict | None = None) -> Path:
    """A tiny teacher whose cfg is pickled omegaconf-style (as real fairseq files are)."""
    write_fairseq_checkpoint(path, shape, seed=0)
    ckpt = torch.load(path, weights_only=True)
    cfg = ckpt["cfg"]
    for section, values in (extra_cfg or {}).items():
        cfg[section].update(values)
    return save_with_omegaconf_cfg(path, ckpt, cfg)


# ---------------------------------------------------------------------------------------------
# malicious pickles


class Payload:
    """An object whose unpickling calls `func(*args)`: what an attacker puts in a checkpoint."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args
