"""The S-SMKE run's recipe details against the thesis code (Sx3HRe at 4e4aeee): new weights from
fairseq's init_bert_params, the validation loss (KDClipLoss: no bank, no ITC) deciding best.pt,
the teacher fed its own view, and fp16 with a loss scaler."""

from __future__ import annotations

import json
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tests.multimodal_fixtures import fixed_batch
from tests.test_loader_augment import ks_critical, ks_stat
from tests.test_multimodal_task import _run, cfg_of, world  # noqa: F401  (the module fixture)
from trainer.tasks.multimodal import MultimodalTask

CPU = torch.device("cpu")


def test_new_weights_are_init_bert_params(world, tmp_path):  # noqa: F811
    """fairseq's init_bert_params: Linear and Embedding weights normal(0, 0.02) (untruncated),
    Linear biases zero; LayerNorms and LayerScales keep their own init."""
    task = MultimodalTask(cfg_of(world, tmp_path), CPU)
    s = task.student
    weights, biases = [], []
    for m in (s.token_type_embeddings, s.shared, s.head):
        for sub in m.modules():
            if isinstance(sub, (nn.Linear, nn.Embedding)):
                weights.append(sub.weight.detach().flatten())
                if getattr(sub, "bias", None) is not None:
                    biases.append(sub.bias.detach())
    w = torch.cat(weights).double().numpy()
    assert len(w) > 5000
    ref = torch.randn(len(w), generator=torch.Generator().manual_seed(0), dtype=torch.float64).numpy() * 0.02
    assert ks_stat(w, ref) < ks_critical(len(w), len(w))
    assert abs(w.std() / 0.02 - 1) < 0.05 and abs(w.mean()) < 0.002
    # truncation at one sigma (the earlier init) would leave nothing beyond 0.02
    assert abs((np.abs(w) > 0.02).mean() - 0.3173) < 0.03 and np.abs(w).max() > 0.05
    assert all((b == 0).all() for b in biases)
    for ln in [sub for sub in s.shared.modules() if isinstance(sub, nn.LayerNorm)] + [s.fc_norm]:
        assert (ln.weight == 1).all() and (ln.bias == 0).all()
    tte = task.cfg.task_cfg.model.token_type_scale
    assert torch.allclose(s.tte_scale.gamma, torch.full_like(s.tte_scale.gamma, tte))


def thesis_kd_clip_loss(img, txt, target, logit_scale):
    """KDClipLoss (src/modules/losses.py) on one process, inputs normalised as in Sx3HRe._step."""
    img, txt, target = (x / x.norm(dim=-1, keepdim=True) for x in (img.double(), txt.double(), target.double()))
    labels = torch.arange(img.shape[0])
    li = F.cross_entropy(logit_scale * img @ target.T, labels)
    lt = F.cross_entropy(logit_scale * txt @ target.T, labels)
    return (li + lt) / 2


def test_validation_loss_is_the_kd_loss_without_the_bank(world, tmp_path):  # noqa: F811
    task = MultimodalTask(cfg_of(world, tmp_path), CPU)
    train_batch, val_batch = fixed_batch(seed=0), fixed_batch(seed=3)
    task.student.train()
    task.loss(task.student, train_batch)["loss"].backward()
    task.after_step(1)
    assert task.bank.count == 8  # the bank holds negatives now
    task.student.eval()
    with torch.no_grad():
        got = task.loss(task.student, val_batch)
        out = task.student(val_batch["image"], val_batch["input_ids"], val_batch["padding_mask"])
        target = task.teacher_targets(val_batch["image"])
    want = thesis_kd_clip_loss(out["encoder_out_image"], out["encoder_out_text"], target, 1 / 0.07)
    assert math.isclose(got["loss"].item(), want.item(), rel_tol=1e-5)
    assert got["kd_loss"].item() == got["loss"].item()
    assert got["kd_bank_loss"].item() > got["loss"].item() + 1e-3  # the bank's negatives make it harder
    assert "itc_loss" in got and "itc_acc" in got
    assert task.bank.count == 8  # validation never enters the bank


def test_the_teacher_is_fed_its_own_view(world, tmp_path):  # noqa: F811
    task = MultimodalTask(cfg_of(world, tmp_path), CPU)
    batch = fixed_batch()
    other = torch.randn_like(batch["image"])
    task.student.train()
    a = task.loss(task.student, batch)
    task._pending.clear()
    b = task.loss(task.student, {**batch, "image_teacher": other})
    assert not math.isclose(a["kd_loss"].item(), b["kd_loss"].item())
    task._pending.clear()
    # the targets are the teacher's on image_teacher, not on image
    task.loss(task.student, {**batch, "image_teacher": other})
    torch.testing.assert_close(task._pending[0][0], task.teacher_targets(other))


def test_best_checkpoint_follows_the_thesis_validation_loss(world, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    trainer = _run(world, out, **{"data.val_split": "train", "validation.every_steps": 2,
                                  "validation.max_batches": 1})
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_loss" in r]
    assert len(val) >= 3
    best, best_step = math.inf, None
    for r in val:
        assert r["val_loss"] == r["val_kd_loss"] and "val_kd_bank_loss" in r and "val_itc_loss" in r
        assert r["best"] == (r["val_loss"] < best)
        if r["best"]:
            best, best_step = r["val_loss"], r["step"]
    saved = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    assert saved["step"] == best_step and trainer.best_val == best


def test_fp16_runs_with_a_loss_scaler(world, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    trainer = _run(world, out, **{"precision": "fp16", "schedule.max_steps": 3, "checkpoint.every_steps": 3})
    assert trainer.scaler.is_enabled()
    state = torch.load(out / "checkpoints" / "step_00000003.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0 and state["scaler"]["_growth_tracker"] >= 0
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if '"loss"' in x]
    assert records and all(math.isfinite(r["loss"]) for r in records)
