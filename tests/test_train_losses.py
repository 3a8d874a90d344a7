"""Target maths against straightforward references written here, the student/teacher split,
parameter groups and the lr schedule."""

from __future__ import annotations

import math

import pytest
import torch

from tests.train_fixtures import DEMO_CONFIG, make_teacher, tiny_overrides
from trainer.config import load_config
from trainer.errors import UserError
from trainer.loop import cosine_with_warmup
from trainer.losses import instance_norm_tokens, layer_average_target, mse_over_tokens
from trainer.tasks.image_kd import ImageKDTask, no_weight_decay


def ref_target(layers, top_k=None, final_ln=True, eps=1e-5):
    """Loops and explicit means: for each layer, each sample and feature, (x - mean_T) / std_T."""
    layers = [l.double() for l in layers]
    if top_k:
        layers = layers[len(layers) - top_k:]
    B, T, D = layers[0].shape
    acc = torch.zeros(B, T, D, dtype=torch.float64)
    for l in layers:
        for b in range(B):
            for d in range(D):
                col = l[b, :, d]
                mu = col.sum() / T
                var = ((col - mu) ** 2).sum() / T
                acc[b, :, d] += (col - mu) / torch.sqrt(var + eps)
    y = acc / len(layers)
    if final_ln:
        mu = y.mean(-1, keepdim=True)
        var = ((y - mu) ** 2).mean(-1, keepdim=True)
        y = (y - mu) / torch.sqrt(var + eps)
    return y


@pytest.mark.parametrize("top_k,final_ln", [(None, True), (None, False), (2, True)])
def test_layer_average_target_matches_reference(top_k, final_ln):
    g = torch.Generator().manual_seed(0)
    # layers on different scales and offsets: instance norm must remove both per feature
    layers = [torch.randn(2, 5, 6, generator=g) * (i + 1) * 3 + i for i in range(4)]
    got = layer_average_target(layers, top_k=top_k, final_layer_norm=final_ln)
    assert got.dtype == torch.float32 and got.shape == (2, 5, 6)
    torch.testing.assert_close(got.double(), ref_target(layers, top_k, final_ln), rtol=1e-4, atol=1e-5)


def test_instance_norm_is_over_tokens_not_features():
    x = torch.randn(3, 7, 4)
    y = instance_norm_tokens(x)
    torch.testing.assert_close(y.mean(1), torch.zeros(3, 4), atol=1e-5, rtol=0)
    assert not torch.allclose(y.mean(2), torch.zeros(3, 7), atol=1e-3)


def test_mse_and_padding_weights():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, 2, generator=g), torch.randn(4, 3, 2, generator=g)
    torch.testing.assert_close(mse_over_tokens(a, b), ((a - b) ** 2).mean())
    torch.testing.assert_close(mse_over_tokens(a, b, torch.ones(4)), ((a - b) ** 2).mean())
    keep = torch.tensor([1.0, 1.0, 0.0, 0.0])
    # pads contribute nothing, and the sum is over the full batch size (DDP-consistent scale)
    want = ((a[:2] - b[:2]) ** 2).mean() * 2 / 4
    torch.testing.assert_close(mse_over_tokens(a, b, keep), want)


def _task(tmp_path, **extra):
    teacher = make_teacher(tmp_path / "t.pt")
    cfg = load_config(DEMO_CONFIG, tiny_overrides(tmp_path, teacher, **extra))
    return ImageKDTask(cfg, torch.device("cpu"))


def test_student_is_a_copy_of_the_first_blocks(tmp_path):
    task = _task(tmp_path)
    img = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        t_layers = task.teacher(img)
        s_layers = task.student.vit(img)
    assert len(t_layers) == 3 and len(s_layers) == 2
    for s, t in zip(s_layers, t_layers):
        torch.testing.assert_close(s, t)
    # the layer_avg prediction is the student's own recipe over its blocks
    torch.testing.assert_close(task.student(img), layer_average_target(s_layers))
    # teacher: frozen and in eval mode, no parameter shared with the student
    assert not task.teacher.training
    assert all(not p.requires_grad for p in task.teacher.parameters())
    t_ids = {id(p) for p in task.teacher.parameters()}
    assert not any(id(p) in t_ids for p in task.student.parameters())


def test_teacher_targets_match_the_recipe(tmp_path):
    task = _task(tmp_path)
    img = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = ref_target(task.teacher(img))
    got = task.teacher_targets(img)
    assert not got.is_inference()  # usable in the autograd graph of the loss
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    loss = task.loss(task.student, {"image": img})["loss"]
    loss.backward()
    assert task.student.vit.blocks[0].attn.qkv.weight.grad is not None


def test_d2v2_topk_variant(tmp_path):
    task = _task(tmp_path, **{"loss.variant": "d2v2_topk", "loss.top_k": 2})
    img = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        _, ffns = task.teacher(img, with_ffn=True)
    want = ref_target([f[:, 1:] for f in ffns], top_k=2)  # FFN outputs, [CLS] left out
    torch.testing.assert_close(task.teacher_targets(img).double(), want, rtol=1e-4, atol=1e-5)
    assert task.student(img).shape == (2, 4, 32)  # through the regression head, patches only
    with pytest.raises(UserError, match="loss.top_k"):
        _task(tmp_path, **{"loss.variant": "d2v2_topk", "loss.top_k": 9})


def test_student_deeper_than_teacher_is_refused(tmp_path):
    with pytest.raises(UserError, match="student.depth"):
        _task(tmp_path, **{"student.depth": 5})


def test_no_weight_decay_groups(tmp_path):
    task = _task(tmp_path)
    names = {n for n, p in task.student.named_parameters() if no_weight_decay(n, p)}
    assert {"vit.pos_embed", "vit.cls_token", "vit.patch_embed.proj.bias", "vit.norm_pre.weight",
            "vit.blocks.0.norm1.weight", "vit.blocks.1.mlp.fc2.bias"} <= names
    decayed = {n for n, p in task.student.named_parameters()} - names
    assert decayed == {f"vit.blocks.{i}.{m}.weight" for i in range(2)
                       for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")} | {"vit.patch_embed.proj.weight"}


def test_cosine_with_warmup():
    f = cosine_with_warmup(warmup=10, total=110, min_ratio=0.0)
    assert f(0) == 0.0 and f(5) == 0.5 and f(10) == 1.0
    assert math.isclose(f(60), 0.5) and math.isclose(f(110), 0.0, abs_tol=1e-12)
    g = cosine_with_warmup(warmup=0, total=100, min_ratio=0.1)
    assert g(0) == 1.0 and math.isclose(g(100), 0.1)
