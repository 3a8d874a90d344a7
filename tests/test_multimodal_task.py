"""The multimodal task (S-SMKE) on CPU with tiny real-format teachers: config checks naming the
key, the loss falling on a fixed batch, the learnable (or frozen) distillation temperature,
what enters the memory bank, the bank in checkpoints, export without the teacher files, and a
SIGKILLed run resumed to the same parameters and bank as an uninterrupted one."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.loader_fixtures import image_shards, tokenizer_path
from tests.multimodal_fixtures import fixed_batch, make_bert_dir, task_files
from tests.train_fixtures import REPO, train_in_process
from trainer.config import ConfigError, load_config
from trainer.export import export_student, load_student
from trainer.loop import Trainer
from trainer.tasks.multimodal import MultimodalTask

CONFIG = REPO / "configs" / "demo_multimodal.yaml"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("mm")
    files = task_files(root)
    files["shards"] = Path(image_shards(str(root / "shards"), [10, 14]))
    return files


def overrides(world, out: Path, **extra) -> list[str]:
    over = {
        "out_dir": str(out),
        "data.manifests": f"[{world['shards']}]",
        "data.tokenizer": tokenizer_path(),
        "data.val_split": "",  # the fixture shards hold a train split only
        "data.text_max_len": 12,
        "data.batch_size": 8,
        "data.augment.size": 16,
        "data.teacher_augment.size": 16,
        "image_tower.checkpoint": str(world["d2v2"]),
        "text_tower.path": str(world["bert"]),
        "teacher.checkpoint": str(world["beitv2"]),
        "model.num_heads": 4,
        "loss.memory_bank_size": 20,  # no multiple of the batch
        "schedule.max_steps": 6,
        "schedule.warmup_steps": 1,
        "checkpoint.every_steps": 3,
        "checkpoint.keep_last": 3,
        "logging.every_steps": 2,
        "logging.tensorboard": "off",
        "optim.lr": 5e-3,
    }
    over.update(extra)
    return [f"{k}={v}" for k, v in over.items()]


def cfg_of(world, tmp_path, **extra):
    return load_config(CONFIG, overrides(world, tmp_path / "run", **extra))


@pytest.mark.parametrize("override,key", [
    ({"data.augment.size": 24}, "data.augment.size"),
    ({"data.teacher_augment.size": 24}, "data.teacher_augment.size"),
    ({"data.text_max_len": 100}, "data.text_max_len"),  # the tiny BERT has 64 positions
    ({"image_tower.depth": 9}, "image_tower.depth"),
    ({"text_tower.depth": 9}, "text_tower.depth"),
    ({"text_tower.path": "/nonexistent/bert"}, "text_tower.path"),
    ({"teacher.checkpoint": "/nonexistent/beitv2.pth"}, "teacher.checkpoint"),
    ({"teacher.kind": "data2vec2"}, "teacher.checkpoint"),  # the BEiTv2 file is no Data2Vec2 checkpoint
    ({"model.num_heads": 5}, "model.num_heads"),
    ({"loss.kd_temperature": 0}, "loss.kd_temperature"),
    ({"teacher.kind": "clip"}, "teacher.kind"),
    ({"data.tokenizer": ""}, "data.tokenizer"),
])
def test_config_errors_name_the_key(world, tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg_of(world, tmp_path, **override)


def test_a_data2vec2_teacher_fits_the_same_place(world, tmp_path):
    task = MultimodalTask(cfg_of(world, tmp_path, **{"teacher.kind": "data2vec2",
                                                     "teacher.checkpoint": str(world["d2v2"])}),
                          torch.device("cpu"))
    assert task.student.head.out_features == 32 and task.teacher.training is False
    losses = task.loss(task.student, fixed_batch())
    assert torch.isfinite(losses["loss"]) and losses["kd_loss"] > 0


def test_towers_of_different_widths_are_refused(world, tmp_path):
    wide = make_bert_dir(tmp_path / "wide", hidden=48, layers=2)
    with pytest.raises(ConfigError, match="text_tower.path.*same width"):
        cfg_of(world, tmp_path, **{"text_tower.path": str(wide)})


def _train_fixed(task, steps: int, lr: float = 5e-3) -> list[float]:
    opt = torch.optim.AdamW(task.param_groups(0.01), lr=lr)
    batch = fixed_batch()
    task.student.train()
    losses = []
    for step in range(1, steps + 1):
        out = task.loss(task.student, batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        task.after_step(step)
        losses.append(out["loss"].item())
    return losses


def test_loss_falls_on_a_fixed_batch_and_the_kd_temperature_learns(world, tmp_path):
    torch.set_num_threads(1)
    task = MultimodalTask(cfg_of(world, tmp_path, **{"loss.learn_kd_temperature": True}), torch.device("cpu"))
    assert task.teacher.training is False and not any(p.requires_grad for p in task.teacher.parameters())
    t0 = task.student.kd_logit_scale.item()
    losses = _train_fixed(task, 25)
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses
    assert task.student.kd_logit_scale.item() != t0  # optimised (the reference never trained it)
    assert task.bank.count == 20  # filled, no more
    # the logit scales stay in [0, ln 100]
    with torch.no_grad():
        task.student.logit_scales.fill_(9.0)
        task.student.kd_logit_scale.fill_(-1.0)
    task.after_step(26)
    assert task.student.logit_scales.max().item() == pytest.approx(4.6051702)
    assert task.student.kd_logit_scale.item() == 0.0

    # the default, as the thesis ran it: fixed at 0.07, outside the optimiser
    frozen = MultimodalTask(cfg_of(world, tmp_path), torch.device("cpu"))
    t0 = frozen.student.kd_logit_scale.item()
    assert t0 == pytest.approx(math.log(1 / 0.07)) and not frozen.student.kd_logit_scale.requires_grad
    assert frozen.student.logit_scales.requires_grad  # the ITC logit scales still learn
    _train_fixed(frozen, 3)
    assert frozen.student.kd_logit_scale.item() == t0


def test_what_enters_the_bank(world, tmp_path):
    task = MultimodalTask(cfg_of(world, tmp_path, **{"loss.learn_kd_temperature": True}), torch.device("cpu"))
    b = fixed_batch()
    task.student.eval()
    with torch.no_grad():
        task.loss(task.student, b)  # validation: nothing queued
    task.after_step(1)
    assert task.bank.count == 0
    task.student.train()
    # two micro-batches of one step (gradient accumulation), with two padded repeats
    b2 = fixed_batch(seed=1)
    b2["is_pad"] = torch.tensor([False] * 6 + [True] * 2)
    task.loss(task.student, b)
    task.loss(task.student, b2)
    task.after_step(1)
    assert task.bank.count == 8 + 6
    expect = torch.cat([task.teacher_targets(b["image"]), task.teacher_targets(b2["image"])[:6]])
    torch.testing.assert_close(task.bank.ordered(), expect)
    # new weights decay, embeddings, positions, [CLS], norms, biases and logit scales do not
    groups = {g["name"]: {id(p) for p in g["params"]} for g in task.param_groups(0.01)}
    named = dict(task.student.named_parameters())
    all_params = groups["decay"] | groups["no_decay"]
    assert id(named["image_tower.pos_embed"]) not in all_params  # fixed sin-cos positions (the default)
    for name in ("text_tower.embeddings.word_embeddings.weight", "image_tower.cls_token",
                 "token_type_embeddings.weight", "logit_scales", "kd_logit_scale", "shared.attn.q_bias"):
        assert id(named[name]) in groups["no_decay"], name
    for name in ("shared.attn.qkv.weight", "head.weight", "image_tower.blocks.0.attn.qkv.weight"):
        assert id(named[name]) in groups["decay"], name


def _run(world, out: Path, **extra) -> Trainer:
    return train_in_process(CONFIG, overrides(world, out, **extra))


def _ckpt(out: Path, step: int) -> dict:
    return torch.load(out / "checkpoints" / f"step_{step:08d}.pt", weights_only=True)


def test_train_checkpoint_bank_and_export_without_teachers(world, tmp_path):
    out = tmp_path / "run"
    own = {**world, **task_files(tmp_path / "teachers")}  # deleted after training
    trainer = _run(own, out)
    state = _ckpt(out, 6)
    bank = state["task_state"]["memory_bank"]
    assert bank["rows"].shape == (20, 24) and bank["size"] == 20  # 6 steps x 8 > 20: full
    torch.testing.assert_close(bank["rows"], trainer.task.bank.bank)
    assert bank["ptr"] == (6 * 8) % 20
    early = _ckpt(out, 3)["task_state"]["memory_bank"]
    assert early["rows"].shape == (20, 24) and early["ptr"] == 4  # 24 rows through a 20-row ring
    log = (out / "log.jsonl").read_text()
    assert '"kd_loss"' in log and '"itc_loss"' in log and '"kd_temperature"' in log
    # the exported student needs none of the teacher files
    shutil.rmtree(tmp_path / "teachers")
    exported, _ = export_student(out, tmp_path / "student.pt", which="last")
    assert load_student(exported).arch == trainer.task.student_arch()
    loaded = load_student(out, which="last")
    assert loaded.task == "multimodal" and set(loaded.encoders) == {"image", "text"}
    img, ids = torch.randn(2, 3, 16, 16), torch.tensor([[101, 2000, 102, 0], [101, 2001, 2002, 102]])
    student = trainer.task.student.eval()
    with torch.no_grad():
        tok_i = loaded.encoders["image"](img)
        tok_t = loaded.encoders["text"](ids, ids == 0)
        ref = student(img, ids, ids == 0)
    assert tok_i.shape == (2, 5, 32) and tok_t.shape == (2, 4, 32)
    torch.testing.assert_close(torch.nn.functional.normalize(tok_i[:, 0], dim=-1), ref["x_image"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.nn.functional.normalize(tok_t[:, 0], dim=-1), ref["x_text"], atol=1e-5, rtol=1e-5)


def _subprocess(args: list[str], env_extra: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env_extra}
    return subprocess.run([sys.executable, "-m", "tests.train_fixtures", str(CONFIG), *args],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=280)


@pytest.mark.slow
def test_sigkill_and_resume_equal_an_uninterrupted_run(world, tmp_path):
    _run(world, tmp_path / "ref")
    args = overrides(world, tmp_path / "killed")
    # batch index 4 is the 5th batch: the step-3 checkpoint exists, step 4 is lost
    r = _subprocess(args, {"FAKE_LOADER_KILL_AT": "4"})
    assert r.returncode == -9, r.stderr[-3000:]
    r = _subprocess(args + ["resume=auto"], {})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 3" in r.stderr
    ref, got = _ckpt(tmp_path / "ref", 6), _ckpt(tmp_path / "killed", 6)
    assert ref["model"].keys() == got["model"].keys()
    for k in ref["model"]:
        torch.testing.assert_close(got["model"][k], ref["model"][k], rtol=0, atol=1e-6, msg=k)
    rb, gb = ref["task_state"]["memory_bank"], got["task_state"]["memory_bank"]
    assert rb["ptr"] == gb["ptr"]
    torch.testing.assert_close(gb["rows"], rb["rows"], rtol=0, atol=1e-6)


def test_thesis_config_holds_the_recipe(monkeypatch):
    path = REPO / "configs" / "multimodal.yaml"
    with pytest.raises(ConfigError, match="image_tower.checkpoint.*not found"):
        load_config(path)  # the teacher files are the user's: checked before anything is built
    monkeypatch.setattr(MultimodalTask, "check_config", classmethod(lambda cls, cfg: None))
    cfg = load_config(path)
    t = cfg.task_cfg
    assert (cfg.task, cfg.data.batch_size, cfg.optim.lr, cfg.schedule.epochs) == ("multimodal", 256, 1e-4, 7)
    aug, taug = cfg.data.augment, cfg.data.teacher_augment
    assert cfg.data.teacher_view and aug.scale == taug.scale == (0.9, 1.0) and aug.hflip == taug.hflip == 0.5
    assert aug.color_jitter == 0.0 and taug.color_jitter == 0.4 and taug.mean == (0.485, 0.456, 0.406)
    assert not t.loss.learn_kd_temperature and t.loss.kd_temperature == 0.07 and cfg.precision == "fp16"
    assert cfg.data.text_max_len == 64 and len(cfg.data.manifests) == 3
    assert (t.image_tower.depth, t.text_tower.depth, t.teacher.kind, t.teacher.final_norm) == (6, 6, "beitv2", False)
    assert (t.model.layer_scale, t.model.token_type_scale, t.loss.memory_bank_size) == (0.2, 1e-5, 65536)


def test_dry_run_of_the_demo_config(world, tmp_path, capsys):
    from trainer.cli import main

    try:
        main(["train", str(CONFIG), *overrides(world, tmp_path / "run"), "--dry-run"])
    except SystemExit as e:  # main exits only on errors
        pytest.fail(f"dry run exited with {e.code}")
    assert "multimodal" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_gpu_benchmark_script_smoke_on_cpu(tmp_path):
    import re

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "bench/gpu_multimodal.py", "--tiny", "--device", "cpu", "--batch", "4",
                        "--steps", "2", "--repeats", "1", "--bank", "64", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"^gpu-multimodal: \d+ samples/s, data-wait \d+\.\d%, peak mem \d+\.\d GiB",
                     r.stdout, re.M), r.stdout


@pytest.mark.slow
def test_two_processes_fill_the_bank_with_the_global_batch(world, tmp_path):
    """The bank works with N processes (the reference crashed with one, we test both): every
    rank holds the same bank, made of the targets of the whole global batch."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    extra = {"loss.memory_bank_size": 48, "checkpoint.every_steps": 0}  # 6 steps x 8 samples: all kept
    _run(world, tmp_path / "one", **extra)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = overrides(world, tmp_path / "two", **extra, **{"data.batch_size": 4})
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "trainer.cli", "train", str(CONFIG),
                        *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=280)
    assert r.returncode == 0, r.stderr[-3000:]
    one = _ckpt(tmp_path / "one", 6)["task_state"]["memory_bank"]
    two = _ckpt(tmp_path / "two", 6)["task_state"]["memory_bank"]
    assert one["rows"].shape == two["rows"].shape == (48, 24) and one["ptr"] == two["ptr"] == 0

    def by_row(t):  # the same samples, whatever order the ranks' slices came in
        return t[torch.argsort(t[:, 0])]

    torch.testing.assert_close(by_row(two["rows"]), by_row(one["rows"]), atol=1e-5, rtol=1e-5)
