"""The multimodal models: BEiTv2 from its original checkpoint layout (checked against timm's
BEiT on the same file), and the S-SMKE student (towers copied from the teachers, the shared
block against a plain re-implementation, padding masks, rebuild from its plain description)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from tests.multimodal_fixtures import DIM, make_beitv2, make_bert_dir, make_d2v2
from trainer.errors import UserError
from trainer.models.beitv2 import BEiTShape, load_beitv2, relative_position_index, write_beitv2_checkpoint
from trainer.models.smke import (
    ImageEncoder,
    SMKEStudent,
    TextEncoder,
    image_tower_from_data2vec2,
    load_bert_tower,
    log_inv,
)
from trainer.models.vit import load_data2vec2


def _timm_beit(shape: BEiTShape, ckpt_path):
    beit = pytest.importorskip("timm.models.beit", reason="timm (test extra) compares BEiTv2 loading")
    model = beit.Beit(img_size=shape.img_size, patch_size=shape.patch_size, embed_dim=shape.dim, depth=shape.depth,
                      num_heads=shape.num_heads, num_classes=0, global_pool="token", use_abs_pos_emb=False,
                      use_shared_rel_pos_bias=shape.shared_rel_pos_bias,
                      use_rel_pos_bias=not shape.shared_rel_pos_bias, init_values=0.1,
                      norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
    sd = beit.checkpoint_filter_fn(torch.load(ckpt_path, weights_only=True), model)
    missing, _ = model.load_state_dict(sd, strict=False)
    assert not missing
    return model.eval()


@pytest.mark.parametrize("shared,wrap", [(True, "model"), (False, "module")])
def test_beitv2_loads_the_original_layout_like_timm(tmp_path, shared, wrap):
    shape = BEiTShape(img_size=32, patch_size=8, dim=32, depth=2, num_heads=4, shared_rel_pos_bias=shared)
    path = write_beitv2_checkpoint(tmp_path / "beitv2.pth", shape, seed=3, wrap=wrap)
    raw = torch.load(path, weights_only=True)[wrap]
    # the original key layout, pretraining extras included
    for key in ("cls_token", "patch_embed.proj.weight", "blocks.1.gamma_1", "blocks.0.attn.q_bias",
                "blocks.0.attn.v_bias", "norm.weight", "mask_token", "lm_head.weight"):
        assert key in raw
    table = "rel_pos_bias.relative_position_bias_table" if shared else "blocks.1.attn.relative_position_bias_table"
    assert table in raw and "blocks.0.attn.qkv.bias" not in raw
    ours = load_beitv2(path, final_norm=True).eval()
    assert ours.shape.img_size == 32 and ours.shape.num_heads == 4 and ours.shape.shared_rel_pos_bias == shared
    ref = _timm_beit(shape, path)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_cls(x), ref.forward_features(x)[:, 0], atol=1e-5, rtol=1e-5)
        # the multimodal teacher drops the final norm: the last block's raw [CLS]
        ref.norm = torch.nn.Identity()
        no_norm = load_beitv2(path, final_norm=False).eval()
        torch.testing.assert_close(no_norm.forward_cls(x), ref.forward_features(x)[:, 0], atol=1e-5, rtol=1e-5)


def test_beitv2_relative_bias_matters_and_drop_path_is_off_in_eval(tmp_path):
    path = make_beitv2(tmp_path / "b.pth")
    model = load_beitv2(path, drop_path_rate=0.5).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a, b = model.forward_cls(x), model.forward_cls(x)
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # eval: no stochastic depth
        # random weights barely attend: a strong bias must still move the output
        model.rel_pos_bias.relative_position_bias_table.normal_(0, 3.0)
        assert (model.forward_cls(x) - a).abs().max() > 1e-5  # (two eval runs agree bit for bit)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        assert (model.forward_cls(x) - model.forward_cls(x)).abs().max() > 0  # train: drop path active


def test_relative_position_index_layout():
    idx = relative_position_index(2)  # 2x2 patches: 9 offsets + 3 cls entries
    assert idx.shape == (5, 5)
    assert idx[0, 0] == 11 and idx[0, 1] == 9 and idx[1, 0] == 10
    assert idx[1, 1] == idx[2, 2] == idx[4, 4] == 4  # zero offset: (1, 1) in a 3x3 grid
    assert len(set(idx[1:, 1:].flatten().tolist())) == 9


def test_beitv2_loader_refuses_other_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_beitv2(tmp_path / "missing.pth")
    d2v = make_d2v2(tmp_path / "d2v.pt")
    with pytest.raises(UserError, match="BEiTv2"):
        load_beitv2(d2v)
    path = make_beitv2(tmp_path / "b.pth")
    sd = torch.load(path, weights_only=True)
    sd["model"]["blocks.0.attn.extra.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "extra.pth")
    with pytest.raises(UserError, match="unexpected"):
        load_beitv2(tmp_path / "extra.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="could not be read"):
        load_beitv2(tmp_path / "junk.pth")


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("towers")
    return make_d2v2(tmp / "d2v2.pt"), make_bert_dir(tmp / "bert")


def _student(towers, depth=2, **kw):
    d2v, bert = towers
    args = dict(num_heads=4, mlp_ratio=4.0, layer_scale=0.2, tte_init=1e-5, out_dim=24,
                logit_scale_init=log_inv(0.07), kd_logit_scale_init=log_inv(0.07))
    args.update(kw)
    return SMKEStudent(image_tower_from_data2vec2(d2v, depth), load_bert_tower(bert, depth), **args)


def test_towers_are_copied_from_the_teachers(towers):
    from transformers import BertModel

    d2v, bert = towers
    torch.manual_seed(0)
    student = _student(towers, depth=2)
    teacher = load_data2vec2(d2v)
    for k, v in student.image_tower.state_dict().items():
        torch.testing.assert_close(v, teacher.state_dict()[k], atol=0, rtol=0)
    assert len(student.image_tower.blocks) == 2
    full = BertModel.from_pretrained(str(bert), local_files_only=True)
    full_sd = full.state_dict()
    text_sd = student.text_tower.state_dict()
    assert len(student.text_tower.encoder.layer) == 2 and not any(k.startswith("pooler") for k in text_sd)
    for k, v in text_sd.items():
        torch.testing.assert_close(v, full_sd[k], atol=0, rtol=0)
    # new weights: normal(0, 0.02) untruncated (init_bert_params, as the thesis run), LayerScales
    # and logit scales as set
    for w in (student.shared.attn.qkv.weight, student.head.weight, student.token_type_embeddings.weight):
        assert 0.015 < w.std() < 0.025 and w.abs().max() > 0.02
    assert torch.all(student.tte_scale.gamma == 1e-5) and torch.all(student.shared.ls1.gamma == 0.2)
    assert torch.allclose(student.logit_scales, torch.full((2,), math.log(1 / 0.07)))


def _reference_shared(block, x, pad):
    """The shared block written out: pre-LN, explicit softmax attention with q/v bias only."""
    B, T, D = x.shape
    H = block.attn.num_heads
    h = F.layer_norm(x, (D,), block.norm1.weight, block.norm1.bias, 1e-6)
    w = block.attn.qkv.weight
    q = h @ w[:D].t() + block.attn.q_bias
    k = h @ w[D:2 * D].t()
    v = h @ w[2 * D:].t() + block.attn.v_bias
    q, k, v = (t.reshape(B, T, H, D // H).transpose(1, 2) for t in (q, k, v))
    s = q @ k.transpose(-1, -2) / math.sqrt(D // H)
    if pad is not None:
        s = s.masked_fill(pad[:, None, None, :], float("-inf"))
    a = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)
    x = x + block.ls1.gamma * block.attn.proj(a)
    interm = block.fc1(F.layer_norm(x, (D,), block.norm2.weight, block.norm2.bias, 1e-6))
    return interm, x + block.ls2.gamma * block.fc2(F.gelu(interm))


def test_shared_block_against_a_plain_reference(towers):
    torch.manual_seed(0)
    student = _student(towers)
    with torch.no_grad():
        for p in student.shared.parameters():  # move away from the init so every term counts
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(3, 7, DIM)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 4:] = True
    pad[2, 2:] = True
    for mask in (None, pad):
        got = student.shared(x, mask)
        ref = _reference_shared(student.shared, x, mask)
        torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)


def test_student_outputs_padding_and_encoders(towers):
    torch.manual_seed(0)
    student = _student(towers).eval()
    img = torch.randn(2, 3, 16, 16)
    ids = torch.tensor([[101, 2000, 2001, 102, 0, 0], [101, 2003, 102, 0, 0, 0]])
    pad = ids == 0
    out = student(img, ids, pad)
    for m in ("image", "text"):
        assert out[f"x_{m}"].shape == (2, DIM) and out[f"x_interm_{m}"].shape == (2, 4 * DIM)
        assert out[f"encoder_out_{m}"].shape == (2, 24)
        torch.testing.assert_close(out[f"x_{m}"].norm(dim=-1), torch.ones(2))
        torch.testing.assert_close(out[f"x_interm_{m}"].norm(dim=-1), torch.ones(2))
    # more padding changes nothing: the towers and the shared block mask padded keys
    ids2 = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], 1)
    out2 = student(img, ids2, ids2 == 0)
    torch.testing.assert_close(out2["x_text"], out["x_text"], atol=1e-5, rtol=1e-5)
    # the encoders follow the contract: tokens with [CLS] at 0, whose normalised form is `x`
    tok_i = ImageEncoder(student)(img)
    tok_t = TextEncoder(student)(ids, pad)
    assert tok_i.shape == (2, 1 + 4, DIM) and tok_t.shape == (2, 6, DIM)
    torch.testing.assert_close(F.normalize(tok_i[:, 0], dim=-1), out["x_image"])
    torch.testing.assert_close(F.normalize(tok_t[:, 0], dim=-1), out["x_text"])
    # the token type separates the modalities: same tokens, other type, other output
    x = torch.randn(1, 3, DIM)
    with torch.no_grad():
        student.tte_scale.gamma.fill_(1.0)
        assert (student._shared(x, 0, None)[1] - student._shared(x, 1, None)[1]).abs().max() > 1e-3


def test_rebuild_from_arch_without_files(towers):
    torch.manual_seed(0)
    student = _student(towers)
    arch = student.arch()
    import json

    arch = json.loads(json.dumps(arch))  # JSON-able
    copy = SMKEStudent.from_arch(arch)
    sd = student.state_dict()
    assert copy.state_dict().keys() == sd.keys()
    copy.load_state_dict(sd)
    img, ids = torch.randn(2, 3, 16, 16), torch.tensor([[101, 7, 102, 0], [101, 8, 9, 102]])
    student.eval(), copy.eval()
    a, b = student(img, ids, ids == 0), copy(img, ids, ids == 0)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_tower_errors(towers, tmp_path):
    d2v, bert = towers
    with pytest.raises(UserError, match="image_tower.depth"):
        image_tower_from_data2vec2(d2v, 9)
    with pytest.raises(UserError, match="text_tower.depth"):
        load_bert_tower(bert, 9)
    with pytest.raises(UserError, match="no config.json"):
        load_bert_tower(tmp_path, 2)
    wide = make_bert_dir(tmp_path / "wide", hidden=48, heads=2, layers=2)
    with pytest.raises(UserError, match="same width"):
        SMKEStudent(image_tower_from_data2vec2(d2v, 2), load_bert_tower(wide, 2), num_heads=4, mlp_ratio=4.0,
                    layer_scale=0.2, tte_init=1e-5, out_dim=8, logit_scale_init=1.0, kd_logit_scale_init=1.0)


def test_make_demo_teacher_writes_a_loadable_beitv2(tmp_path):
    from trainer.cli import main

    out = tmp_path / "beit.pth"
    main(["make-demo-teacher", str(out), "--kind", "beitv2", "--dim", "32", "--heads", "4", "--depth", "2",
          "--patch", "8", "--img-size", "16"])
    model = load_beitv2(out).eval()
    assert (model.shape.dim, model.shape.depth, model.shape.num_heads, model.shape.img_size) == (32, 2, 4, 16)
    # initialised wide: the targets of different images differ clearly
    with torch.no_grad():
        t = F.normalize(model.forward_cls(torch.randn(4, 3, 16, 16)), dim=-1)
    assert (t @ t.t())[~torch.eye(4, dtype=torch.bool)].max() < 0.95
