"""Data2Vec2 teacher loading from the fairseq format, checked against an independent forward
written here from the raw fairseq keys; the student copy; loader errors."""

from __future__ import annotations

import math

import pytest
import torch

from tests.d2v2_fixtures import P, perturb_norms, reference_forward
from tests.train_fixtures import make_teacher
from trainer.errors import UserError
from trainer.models.vit import (
    Data2Vec2ViT,
    ViTShape,
    load_data2vec2,
    map_fairseq_keys,
    sincos_pos_embed_2d,
    write_fairseq_checkpoint,
)


def test_loaded_teacher_matches_reference_forward(tmp_path):
    path = make_teacher(tmp_path / "t.pt", dim=32, depth=3, heads=4, patch=8, img=32)
    ckpt = perturb_norms(path)
    model = load_data2vec2(path).eval()
    assert model.shape == ViTShape(img_size=32, patch_size=8, dim=32, depth=3, num_heads=4, norm_eps=1e-6)
    img = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for tensor in ("block", "ffn"):
        with torch.no_grad():
            ours = model(img, tensor=tensor)
            ref = reference_forward(ckpt["model"], img, heads=4, eps=1e-6, ffn=tensor == "ffn")
        assert len(ours) == len(ref) == 3
        for a, b in zip(ours, ref):
            assert a.shape == (2, 1 + 16, 32)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the FFN outputs are not the block outputs (a mix-up could not hide here)
    assert not torch.allclose(model(img, tensor="ffn")[0], model(img)[0], atol=1e-2)


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
    with pytest.raises(UserError, match="cannot place.*blocks.0.attn.extra.weight"):
        load_data2vec2(path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="could not be read"):
        load_data2vec2(junk)


def test_prenet_layout_loads_and_matches_reference(tmp_path):
    """fairseq's layout with modality prenet blocks (`context_encoder.blocks.*`, cfg
    `prenet_depth`): they run after the embedding norm, before the shared blocks, and are not
    among the layer results."""
    shape = ViTShape(16, 8, 32, depth=2, num_heads=4, prenet_depth=2)
    path = write_fairseq_checkpoint(tmp_path / "t.pt", shape)
    ckpt = perturb_norms(path)
    keys = set(ckpt["model"])
    assert {P + "context_encoder.blocks.1.mlp.fc2.weight", "blocks.1.mlp.fc2.weight"} <= keys
    assert not any(k.startswith("blocks.2.") for k in keys)
    assert ckpt["cfg"]["model"]["modalities"]["image"]["prenet_depth"] == 2
    model = load_data2vec2(path).eval()
    assert model.shape == shape and len(model.prenet) == 2 and len(model.blocks) == 2
    img = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for tensor in ("block", "ffn"):
        with torch.no_grad():
            ours = model(img, tensor=tensor)
        ref = reference_forward(ckpt["model"], img, heads=4, eps=1e-6, ffn=tensor == "ffn")
        assert len(ours) == len(ref) == 2
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_prenet_cfg_must_agree_with_the_tensors(tmp_path):
    path = write_fairseq_checkpoint(tmp_path / "t.pt", ViTShape(16, 8, 32, 2, 4, prenet_depth=1))
    ckpt = torch.load(path, weights_only=True)
    ckpt["cfg"]["model"]["modalities"]["image"]["prenet_depth"] = 0  # as the other released config says
    torch.save(ckpt, path)
    with pytest.raises(UserError, match="prenet_depth 0.*holds 1 blocks"):
        load_data2vec2(path)
    del ckpt["cfg"]["model"]["modalities"]
    torch.save(ckpt, path)
    assert load_data2vec2(path).shape.prenet_depth == 1  # no cfg entry: the tensors decide


def test_every_tensor_must_land(tmp_path):
    path = write_fairseq_checkpoint(tmp_path / "t.pt", ViTShape(16, 8, 32, 2, 4, prenet_depth=1))
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"][P + "context_encoder.blocks.0.attn.bogus"] = torch.zeros(3)
    ckpt["model"][P + "alibi_scale"] = torch.zeros(1)
    torch.save(ckpt, path)
    with pytest.raises(UserError, match=r"cannot place: \[.*alibi_scale.*context_encoder\.blocks\.0\.attn\.bogus") as e:
        load_data2vec2(path)
    assert "\n" not in str(e.value)
    # a missing tensor is named too
    ckpt = torch.load(write_fairseq_checkpoint(tmp_path / "u.pt", ViTShape(16, 8, 32, 2, 4)), weights_only=True)
    del ckpt["model"]["blocks.1.norm2.bias"]
    torch.save(ckpt, tmp_path / "u.pt")
    with pytest.raises(UserError, match=r"missing: \['blocks.1.norm2.bias'\]"):
        load_data2vec2(tmp_path / "u.pt")


def test_pre_ln_and_depth_mismatch_are_refused(tmp_path):
    path = write_fairseq_checkpoint(tmp_path / "t.pt", ViTShape(16, 8, 32, 2, 4))
    ckpt = torch.load(path, weights_only=True)
    ckpt["cfg"]["model"]["layer_norm_first"] = True
    torch.save(ckpt, path)
    with pytest.raises(UserError, match="layer_norm_first"):
        load_data2vec2(path)
    ckpt["cfg"]["model"].update(layer_norm_first=False, depth=12)
    torch.save(ckpt, path)
    with pytest.raises(UserError, match="depth 12.*holds 2 shared blocks"):
        load_data2vec2(path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_embedding_stage_is_fp32_under_autocast(dtype):
    """Positions and [CLS] are added in fp32 before any cast: under autocast the embedding
    stage gives exactly the fp32 result."""
    model = Data2Vec2ViT(ViTShape(16, 8, 32, 2, 4)).eval()
    with torch.no_grad():
        model.pos_embed.add_(torch.randn_like(model.pos_embed) * 1e-3)  # low bits a cast would lose
        img = torch.randn(2, 3, 16, 16)
        want = model.embed(img)
        with torch.autocast("cpu", dtype=dtype):
            got = model.embed(img)
            layers = model(img, tensor="ffn")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert layers[0].dtype == dtype  # the blocks do run in the autocast dtype


def test_pos_embed_is_fixed_by_default():
    model = Data2Vec2ViT(ViTShape(16, 8, 32, 2, 4))
    assert not model.pos_embed.requires_grad
    assert Data2Vec2ViT(ViTShape(16, 8, 32, 2, 4), train_pos_embed=True).pos_embed.requires_grad
