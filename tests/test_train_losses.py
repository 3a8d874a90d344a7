"""Target maths against straightforward references written here, the student/teacher split,
parameter groups and the lr schedule."""

from __future__ import annotations

import math

import pytest
import torch

from tests.d2v2_fixtures import VIT_B16, perturb_norms, reference_forward
from tests.train_fixtures import DEMO_CONFIG, REPO, make_teacher, tiny_overrides
from trainer.config import load_config
from trainer.errors import UserError
from trainer.loop import cosine_with_warmup
from trainer.losses import instance_norm_tokens, layer_average_target, mse_over_tokens
from trainer.models.vit import ViTShape, write_fairseq_checkpoint
from trainer.tasks.image_kd import ImageKDTask, StudentConfig, build_student, no_weight_decay


def ref_target(layers, top_k=None, final_ln=True, eps=1e-5):
    """Loops and explicit means: for each layer, each sample and feature, (x - mean_T) / std_T."""
    layers = [layer.double() for layer in layers]
    if top_k:
        layers = layers[len(layers) - top_k:]
    B, T, D = layers[0].shape
    acc = torch.zeros(B, T, D, dtype=torch.float64)
    for layer in layers:
        for b in range(B):
            for d in range(D):
                col = layer[b, :, d]
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
    # the layer_avg prediction is the student's own recipe over its blocks' FFN outputs
    with torch.no_grad():
        s_ffn = task.student.vit(img, tensor="ffn")
    torch.testing.assert_close(task.student(img), layer_average_target(s_ffn))
    # teacher: frozen and in eval mode, no parameter shared with the student
    assert not task.teacher.training
    assert all(not p.requires_grad for p in task.teacher.parameters())
    t_ids = {id(p) for p in task.teacher.parameters()}
    assert not any(id(p) in t_ids for p in task.student.parameters())


@pytest.mark.parametrize("layer_tensor", ["ffn", "block"])
def test_targets_prediction_and_loss_against_loop_reference(tmp_path, layer_tensor):
    """Teacher targets, student prediction and loss against the loop reference over layers from
    fairseq's forward written out by hand on the checkpoint's keys (FFN outputs before the
    residual and norm2 by default; block outputs for the later variant). [CLS] kept."""
    teacher = make_teacher(tmp_path / "t.pt")
    sd = perturb_norms(teacher)["model"]
    cfg = load_config(DEMO_CONFIG, tiny_overrides(tmp_path, teacher, **{"loss.layer_tensor": layer_tensor}))
    task = ImageKDTask(cfg, torch.device("cpu"))
    img = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ref_layers = [t.double() for t in reference_forward(sd, img, heads=2, eps=1e-6, ffn=layer_tensor == "ffn")]
    want_target = ref_target(ref_layers)  # all 3 teacher layers
    want_pred = ref_target(ref_layers[:2])  # the student is the first 2 blocks, copied
    got = task.teacher_targets(img)
    assert got.shape == (2, 1 + 4, 32) and not got.is_inference()  # usable in the loss's graph
    torch.testing.assert_close(got.double(), want_target, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(task.student(img).double(), want_pred, rtol=1e-4, atol=1e-4)
    loss = task.loss(task.student, {"image": img})["loss"]
    torch.testing.assert_close(loss.double(), ((want_pred - want_target) ** 2).mean(), rtol=1e-4, atol=1e-6)
    loss.backward()
    assert task.student.vit.blocks[0].attn.qkv.weight.grad is not None
    assert task.student.vit.pos_embed.grad is None  # fixed by default


@pytest.mark.parametrize("layer_tensor", ["ffn", "block"])
def test_what_ffn_targets_give_no_gradient(tmp_path, layer_tensor):
    """A per-feature constant added to the last block's FFN output is removed by the instance
    norm over tokens, and nothing after that block uses its output: with FFN targets that bias
    has a zero gradient (up to rounding); with block outputs it has a real one."""
    task = _task(tmp_path, **{"loss.layer_tensor": layer_tensor})
    img = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    task.loss(task.student, {"image": img})["loss"].backward()
    last, first = task.student.vit.blocks[-1].mlp.fc2.bias.grad, task.student.vit.blocks[0].mlp.fc2.bias.grad
    if layer_tensor == "ffn":
        assert last.abs().max() < 1e-4 * first.abs().max()  # fp32 rounding of sums over tokens
    else:
        assert last.abs().max() > 1e-2 * first.abs().max()
    # the last block's norm2 output feeds nothing with FFN targets: no gradient at all. It stays
    # trainable (as in the thesis run) and is declared to DDP, which would stop on it otherwise
    no_grad = {n for n, p in task.student.named_parameters() if p.requires_grad and p.grad is None}
    assert no_grad == set(task.student.params_without_gradient())
    assert no_grad == ({"vit.blocks.1.norm2.weight", "vit.blocks.1.norm2.bias"} if layer_tensor == "ffn" else set())
    assert set(getattr(task.student, "_ddp_params_and_buffers_to_ignore", ())) == no_grad


def test_teacher_dtype_float16_and_fallback(tmp_path, monkeypatch, caplog):
    """float16 (the thesis's teacher precision) works on CPU here and stays close to fp32; where
    a device has no such autocast the teacher falls back to float32 and says so."""
    teacher = make_teacher(tmp_path / "t.pt")
    img = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    fp32 = ImageKDTask(load_config(DEMO_CONFIG, tiny_overrides(tmp_path, teacher)), torch.device("cpu"))
    fp16 = ImageKDTask(load_config(DEMO_CONFIG, tiny_overrides(tmp_path, teacher, **{"teacher.dtype": "float16"})),
                       torch.device("cpu"))
    assert fp16.teacher_dtype == "float16"
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.float16):
        assert fp16.teacher(img, tensor="ffn")[0].dtype == torch.float16  # the blocks really ran in fp16
    a, b = fp32.teacher_targets(img), fp16.teacher_targets(img)
    assert a.dtype == b.dtype == torch.float32 and not torch.equal(a, b)
    torch.testing.assert_close(b, a, rtol=0, atol=5e-2)
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    with caplog.at_level("WARNING"):
        fb = ImageKDTask(load_config(DEMO_CONFIG, tiny_overrides(tmp_path, teacher, **{"teacher.dtype": "float16"})),
                         torch.device("cpu"))
    assert fb.teacher_dtype == "float32" and "teacher runs in float32" in caplog.text
    torch.testing.assert_close(fb.teacher_targets(img), a)


@pytest.mark.slow
def test_vit_b16_student_has_the_thesis_parameter_count(tmp_path):
    """The thesis reports 43.1M trainable parameters for the 6-block ViT-B/16 student: 43,120,128
    with the position embedding fixed (the default), 150,528 more when it is trained."""
    teacher = write_fairseq_checkpoint(tmp_path / "vitb16.pt", VIT_B16, dtype=torch.float16)
    cfg = load_config(REPO / "configs" / "image_kd.yaml",
                      [f"teacher.checkpoint={teacher}", "device=cpu", "precision=fp32", f"out_dir={tmp_path / 'run'}"])
    task = ImageKDTask(cfg, torch.device("cpu"))
    assert sum(p.numel() for p in task.teacher.parameters()) == 85_797_888
    assert sum(p.numel() for p in task.student.parameters() if p.requires_grad) == 43_120_128
    # what the optimiser gets is exactly that
    assert sum(p.numel() for g in task.param_groups(0.01) for p in g["params"]) == 43_120_128
    trained_pos = build_student(task.teacher, StudentConfig(depth=6, train_pos_embed=True))
    assert sum(p.numel() for p in trained_pos.parameters() if p.requires_grad) == 43_120_128 + 196 * 768


def test_prenet_teacher_student_copies_prenet_and_regresses_shared_blocks(tmp_path):
    """With fairseq's prenet layout the prenet blocks are part of the embedding stage: the
    student copies them, and the layer results of both are their shared blocks only."""
    teacher = write_fairseq_checkpoint(tmp_path / "t.pt", ViTShape(16, 8, 32, depth=3, num_heads=2, prenet_depth=2))
    sd = perturb_norms(teacher)["model"]
    task = ImageKDTask(load_config(DEMO_CONFIG, tiny_overrides(tmp_path, teacher)), torch.device("cpu"))
    vit = task.student.vit
    assert len(vit.prenet) == 2 and len(vit.blocks) == 2
    torch.testing.assert_close(vit.prenet[1].mlp.fc2.weight, task.teacher.prenet[1].mlp.fc2.weight)
    img = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ref_layers = [t.double() for t in reference_forward(sd, img, heads=2, eps=1e-6, ffn=True)]
    assert len(ref_layers) == 3
    torch.testing.assert_close(task.teacher_targets(img).double(), ref_target(ref_layers), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(task.student(img).double(), ref_target(ref_layers[:2]), rtol=1e-4, atol=1e-4)
    # the exported architecture rebuilds the same student without the teacher file
    rebuilt = ImageKDTask.build_student(task.student_arch())
    rebuilt.load_state_dict(task.student.state_dict())
    torch.testing.assert_close(rebuilt(img), task.student(img))
    assert task.student_arch()["layer_tensor"] == "ffn" and task.student_arch()["vit"]["prenet_depth"] == 2


def test_d2v2_topk_variant(tmp_path):
    task = _task(tmp_path, **{"loss.variant": "d2v2_topk", "loss.top_k": 2})
    img = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ffns = task.teacher(img, tensor="ffn")
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
