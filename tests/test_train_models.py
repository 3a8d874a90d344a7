"""Data2Vec2 teacher loading from the fairseq format, checked against an independent forward
written here from the raw fairseq keys; the student copy; loader errors."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from tests.train_fixtures import make_teacher
from trainer.errors import UserError
from trainer.models.vit import (
    ViTShape,
    load_data2vec2,
    map_fairseq_keys,
    read_checkpoint,
    sincos_pos_embed_2d,
    write_fairseq_checkpoint,
)

P = "modality_encoders.IMAGE."


def reference_forward(sd: dict, img: torch.Tensor, heads: int, eps: float) -> list[torch.Tensor]:
    """fairseq data2vec_multi image path written out by hand on the checkpoint's own keys:
    patch conv, + positions, prepend extra token, context_encoder.norm, post-LN AltBlocks."""
    x = F.conv2d(img, sd[P + "local_encoder.proj.weight"], sd[P + "local_encoder.proj.bias"],
                 stride=sd[P + "local_encoder.proj.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)
    x = x + sd[P + "fixed_positional_encoder.positions"]
    x = torch.cat([sd[P + "extra_tokens"].expand(x.shape[0], -1, -1), x], dim=1)
    D = x.shape[-1]
    x = F.layer_norm(x, (D,), sd[P + "context_encoder.norm.weight"], sd[P + "context_encoder.norm.bias"], eps)
    outs = []
    i = 0
    while f"blocks.{i}.attn.qkv.weight" in sd:
        b = f"blocks.{i}."
        B, T, _ = x.shape
        qkv = x @ sd[b + "attn.qkv.weight"].T + sd[b + "attn.qkv.bias"]
        q, k, v = qkv.reshape(B, T, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) / math.sqrt(D // heads)).softmax(-1)
        a = (attn @ v).transpose(1, 2).reshape(B, T, D) @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"]
        x = F.layer_norm(x + a, (D,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps)
        h = F.gelu(x @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"])
        h = h @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"]
        x = F.layer_norm(x + h, (D,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps)
        outs.append(x)
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


def test_loaded_teacher_matches_reference_forward(tmp_path):
    path = make_teacher(tmp_path / "t.pt", dim=32, depth=3, heads=4, patch=8, img=32)
    ckpt = perturb_norms(path)
    model = load_data2vec2(path).eval()
    assert model.shape == ViTShape(img_size=32, patch_size=8, dim=32, depth=3, num_heads=4, norm_eps=1e-6)
    img = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(img)
        ref = reference_forward(ckpt["model"], img, heads=4, eps=1e-6)
    assert len(ours) == len(ref) == 3
    for a, b in zip(ours, ref):
        assert a.shape == (2, 1 + 16, 32)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_checkpoint_layout_and_key_mapping(tmp_path):
    path = make_teacher(tmp_path / "t.pt")
    ckpt = torch.load(path, weights_only=True)
    keys = set(ckpt["model"])
    assert P + "local_encoder.proj.weight" in keys and P + "extra_tokens" in keys
    assert any("decoder" in k for k in keys) and "_ema" in keys and "cfg" in ckpt
    mapped = map_fairseq_keys(ckpt["model"], keep_blocks=2)
    assert not any("decoder" in k or "_ema" in k for k in mapped)
    assert {"patch_embed.proj.weight", "cls_token", "pos_embed", "norm_pre.weight"} <= set(mapped)
    assert {k.split(".")[1] for k in mapped if k.startswith("blocks.")} == {"0", "1"}


def test_positions_are_mae_sincos():
    emb = sincos_pos_embed_2d(8, 2)  # 4 positions, (w, h) halves of sin/cos pairs
    # position (row 0, col 1): w=1, h=0 -> first half encodes w
    w = torch.tensor([math.sin(1.0), math.sin(1 / 100), math.cos(1.0), math.cos(1 / 100)])
    torch.testing.assert_close(emb[1, :4], w)
    torch.testing.assert_close(emb[1, 4:], torch.tensor([0.0, 0.0, 1.0, 1.0]))


def test_heads_from_cfg_and_override(tmp_path):
    path = write_fairseq_checkpoint(tmp_path / "t.pt", ViTShape(16, 8, 32, 2, 8))
    assert load_data2vec2(path).shape.num_heads == 8
    assert load_data2vec2(path, num_heads=2).shape.num_heads == 2


def test_missing_and_foreign_checkpoints(tmp_path):
    with pytest.raises(UserError, match="teacher checkpoint not found"):
        load_data2vec2(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"model": {"foo.weight": torch.zeros(2)}}, bad)
    with pytest.raises(UserError, match="does not hold a Data2Vec2 image model"):
        load_data2vec2(bad)
    path = make_teacher(tmp_path / "t.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["blocks.0.attn.extra.weight"] = torch.zeros(1)
    torch.save(ckpt, path)
    with pytest.raises(UserError, match="unexpected.*blocks.0.attn.extra.weight"):
        load_data2vec2(path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="could not be read"):
        load_data2vec2(junk)


def test_real_style_cfg_object_is_tolerated(tmp_path, monkeypatch):
    """Real checkpoints pickle an omegaconf cfg; loading must not need that package."""
    mod = types.ModuleType("fake_omegaconf")

    class DictConfig:
        def __init__(self, content):
            self._content = content

    DictConfig.__module__, DictConfig.__qualname__ = "fake_omegaconf", "DictConfig"
    mod.DictConfig = DictConfig
    monkeypatch.setitem(sys.modules, "fake_omegaconf", mod)
    path = make_teacher(tmp_path / "t.pt", heads=4)
    ckpt = torch.load(path, weights_only=True)
    ckpt["cfg"] = DictConfig({"model": {"num_heads": 4}})
    torch.save(ckpt, path)
    monkeypatch.delitem(sys.modules, "fake_omegaconf")
    with pytest.raises(Exception):
        torch.load(path, weights_only=False)  # the plain unpickler fails without the class
    assert "model" in read_checkpoint(path)
    assert load_data2vec2(path).shape.num_heads == 4
