"""Image KD obeys the teacher checkpoint: `loss.layer_tensor: auto` takes the tensor its cfg's
`end_of_block_targets` names, an explicit setting that disagrees warns once, and the original
data2vec 2.0 variant normalises layers as the cfg's target-norm flags say (fairseq's
`make_targets`, written out below)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from tests.d2v2_fixtures import make_teacher_omegaconf, reference_forward
from tests.train_fixtures import DEMO_CONFIG, tiny_overrides
from trainer.config import load_config
from trainer.models.vit import ViTShape, write_fairseq_checkpoint
from trainer.tasks.image_kd import ImageKDTask

SHAPE = ViTShape(16, 8, 32, 3, 2)


def fairseq_make_targets(layers, top_k, instance_norm, layer_norm, layer_norm_targets=True):
    """data2vec2.py `make_targets` (fairseq, the thesis repo's copy) on [B, T, C] layers."""
    y = layers[-top_k:]
    if instance_norm:
        y = [F.instance_norm(t.transpose(1, 2).double()).transpose(1, 2) for t in y]
    if layer_norm:
        y = [F.layer_norm(t.double(), t.shape[-1:]) for t in y]
    out = y[0].double()
    for t in y[1:]:
        out = out + t.double()
    out = out / len(y)
    return F.layer_norm(out, out.shape[-1:]) if layer_norm_targets else out


def thesis_prepare_output(layers):
    """The thesis's `prepare_output` (src/utils.py): instance norm always, average, final LN."""
    y = [F.instance_norm(t.transpose(1, 2).double()).transpose(1, 2) for t in layers]
    out = sum(y) / len(y)
    return F.layer_norm(out, out.shape[-1:])


def teacher_with(tmp_path, **flags):
    return make_teacher_omegaconf(tmp_path / "t.pt", SHAPE, {"model": flags})


def task_for(tmp_path, teacher, **extra):
    return ImageKDTask(load_config(DEMO_CONFIG, tiny_overrides(tmp_path, teacher, **extra)), torch.device("cpu"))


def _warnings(caplog):
    return [r for r in caplog.records if r.levelno >= logging.WARNING and "layer_tensor" in r.getMessage()]


@pytest.mark.parametrize("end_of_block", [False, True])
def test_auto_takes_the_tensor_the_checkpoint_names(tmp_path, caplog, end_of_block):
    teacher = teacher_with(tmp_path, end_of_block_targets=end_of_block)
    with caplog.at_level(logging.WARNING):
        task = task_for(tmp_path, teacher)  # demo.yaml leaves layer_tensor at its default, auto
    assert task.cfg.task_cfg.loss.layer_tensor == "auto"
    want = "block" if end_of_block else "ffn"
    assert task.layer_tensor == want and task.student_arch()["layer_tensor"] == want
    assert not _warnings(caplog)
    sd = torch.load(write_fairseq_checkpoint(tmp_path / "plain.pt", SHAPE, seed=0), weights_only=True)["model"]
    img = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ref = [t.double() for t in reference_forward(sd, img, heads=2, eps=1e-6, ffn=not end_of_block)]
    torch.testing.assert_close(task.teacher_targets(img).double(), thesis_prepare_output(ref), rtol=1e-4, atol=1e-4)


def test_an_explicit_setting_that_disagrees_warns_once_and_is_used(tmp_path, caplog):
    teacher = teacher_with(tmp_path, end_of_block_targets=True)
    with caplog.at_level(logging.WARNING):
        task = task_for(tmp_path, teacher, **{"loss.layer_tensor": "ffn"})
    assert task.layer_tensor == "ffn"
    lines = _warnings(caplog)
    assert len(lines) == 1 and "end_of_block_targets=True" in lines[0].getMessage()
    assert "\n" not in lines[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert task_for(tmp_path, teacher, **{"loss.layer_tensor": "block"}).layer_tensor == "block"
    assert not _warnings(caplog)  # agreeing: silent


def test_a_checkpoint_without_cfg_falls_back_to_ffn_with_a_note(tmp_path, caplog):
    path = write_fairseq_checkpoint(tmp_path / "t.pt", SHAPE, seed=0)
    ckpt = torch.load(path, weights_only=True)
    del ckpt["cfg"]
    torch.save(ckpt, path)
    with caplog.at_level(logging.WARNING):
        task = task_for(tmp_path, path, **{"teacher.num_heads": 2})
    assert task.layer_tensor == "ffn" and len(_warnings(caplog)) == 1


@pytest.mark.parametrize("inorm,lnorm", [(True, False), (False, True), (True, True), (False, False)])
def test_d2v2_topk_normalises_layers_as_the_checkpoint_says(tmp_path, inorm, lnorm):
    teacher = teacher_with(tmp_path, instance_norm_target_layer=inorm, layer_norm_target_layer=lnorm)
    task = task_for(tmp_path, teacher, **{"loss.variant": "d2v2_topk", "loss.top_k": 2})
    img = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ffns = task.teacher(img, tensor="ffn")
    want = fairseq_make_targets([f[:, 1:] for f in ffns], 2, inorm, lnorm)
    torch.testing.assert_close(task.teacher_targets(img).double(), want, rtol=1e-4, atol=1e-5)


def test_layer_avg_ignores_the_norm_flags_as_the_thesis_did(tmp_path):
    a = task_for(tmp_path, teacher_with(tmp_path, instance_norm_target_layer=False, layer_norm_target_layer=True))
    img = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ffns = a.teacher(img, tensor="ffn")
    torch.testing.assert_close(a.teacher_targets(img).double(), thesis_prepare_output(ffns), rtol=1e-4, atol=1e-4)
