"""The Trainer on CPU: logs and checkpoints, gradient accumulation, exact resume after SIGKILL,
and the one-line stops (existing run, missing checkpoint, NaN loss).

Data: tiny shards from tests/train_fixtures.py through the real streaming loader.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.train_fixtures import DEMO_CONFIG, REPO, make_teacher, tiny_overrides, train_in_process
from trainer.cli import main
from trainer.config import load_config
from trainer.errors import UserError
from trainer.loop import Trainer


def run(tmp_path, teacher, **extra) -> Trainer:
    return train_in_process(DEMO_CONFIG, tiny_overrides(tmp_path, teacher, **extra))


def final_params(run_dir, step=8) -> dict:
    return torch.load(run_dir / "checkpoints" / f"step_{step:08d}.pt", weights_only=True)["model"]


# With FFN targets (the default) the last student block's fc2 bias has an exactly-zero gradient:
# a per-feature constant is removed by the instance norm over tokens, and nothing uses that
# block's output (tested in test_train_losses.py). Its Adam updates are rounding noise divided by
# sqrt(v) + eps, so they differ between summation orders (accumulation, compiled kernels);
# comparisons that are not bit-exact only bound it by what Adam can move it (lr 1e-3 per step, 8
# steps in these runs).
NOISE_ONLY = ("vit.blocks.1.mlp.fc2.bias",)


def assert_same_params(a: dict, b: dict, atol: float, skip: tuple[str, ...] = ()) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-2 if k in skip else atol, msg=k)


@pytest.fixture
def teacher(tmp_path):
    return make_teacher(tmp_path / "teacher.pt")


def test_train_writes_logs_config_and_checkpoints(tmp_path, teacher, capsys):
    t = run(tmp_path, teacher, **{"checkpoint.every_steps": 2, "checkpoint.keep_last": 2})
    out = tmp_path / "run"
    assert load_config(out / "config.yaml") == t.cfg  # the resolved config, loadable as is
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step_00000006.pt", "step_00000008.pt"]  # keep_last, no temporary files
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    for r in records:
        assert {"loss", "lr", "samples_per_s", "data_wait", "peak_mem_bytes"} <= r.keys()
        assert 0 <= r["data_wait"] <= 1 and r["loss"] > 0
    console = capsys.readouterr().out
    assert "step 8/8 | loss" in console and "samples/s" in console and "data-wait" in console
    # the student moved, the teacher did not
    ckpt = torch.load(out / "checkpoints" / "step_00000008.pt", weights_only=True)
    teacher_sd = torch.load(teacher, weights_only=True)["model"]
    w0 = teacher_sd["blocks.0.attn.qkv.weight"]
    assert not torch.equal(ckpt["model"]["vit.blocks.0.attn.qkv.weight"], w0)
    assert torch.equal(t.task.teacher.blocks[0].attn.qkv.weight, w0)
    assert not t.task.teacher.training
    assert {"model", "optimizer", "scheduler", "scaler", "step", "loader", "rng"} <= ckpt.keys()
    # 8 steps of 8 over 48 samples: the second epoch, 16 samples in
    assert ckpt["step"] == 8 and ckpt["loader"]["epoch"] == 1 and ckpt["loader"]["consumed"] == 16
    assert not any(k.startswith("teacher") for k in ckpt["model"])


def test_lr_scaling_and_warmup(tmp_path, teacher):
    t = run(tmp_path, teacher, **{"optim.scale_lr": True, "optim.lr": 5e-4, "schedule.max_steps": 2,
                                  "schedule.warmup_steps": 4, "data.batch_size": 4, "schedule.grad_accum": 2})
    assert t.global_batch == 8 and t.base_lr == pytest.approx(5e-4 * 8 / 256)
    assert t.scheduler.get_last_lr()[0] == pytest.approx(t.base_lr * 2 / 4)  # 2 of 4 warmup steps


def test_grad_accumulation_matches_a_bigger_batch(tmp_path, teacher):
    run(tmp_path / "a", teacher)
    run(tmp_path / "b", teacher, **{"data.batch_size": 4, "schedule.grad_accum": 2})
    # same maths, another summation order: Adam divides by sqrt(v) + 1e-6, which magnifies the
    # rounding of tiny gradients (2e-6 seen on real shards), hence not the 1e-6 of an exact resume
    assert_same_params(final_params(tmp_path / "a" / "run"), final_params(tmp_path / "b" / "run"), atol=1e-5,
                       skip=NOISE_ONLY)


def trainer_subprocess(args: list[str], env_extra: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env_extra}
    return subprocess.run([sys.executable, "-m", "tests.train_fixtures", str(DEMO_CONFIG), *args],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=240)


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_same_parameters(tmp_path, teacher):
    run(tmp_path / "ref", teacher)  # uninterrupted, in this process
    args = tiny_overrides(tmp_path / "killed", teacher)
    # batch index 5 is the 6th batch: checkpoint at step 4 exists, step 5 was done and is lost
    r = trainer_subprocess(args, {"FAKE_LOADER_KILL_AT": "5"})
    assert r.returncode == -9, r.stderr
    ckpts = sorted(p.name for p in (tmp_path / "killed" / "run" / "checkpoints").iterdir())
    assert ckpts == ["step_00000004.pt"]
    r = trainer_subprocess(args + ["resume=auto"], {})
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr and "at step 4" in r.stderr
    assert_same_params(final_params(tmp_path / "ref" / "run"), final_params(tmp_path / "killed" / "run"), atol=1e-6)


def test_resume_in_process_continues_the_schedule(tmp_path, teacher):
    run(tmp_path / "ref", teacher)
    run(tmp_path / "part", teacher, **{"schedule.max_steps": 8})
    # resume the finished run from its step-4 checkpoint explicitly, into a fresh directory
    ckpt4 = tmp_path / "part" / "run" / "checkpoints" / "step_00000004.pt"
    t = run(tmp_path / "again", teacher, resume=str(ckpt4))
    assert t.step == 8
    assert_same_params(final_params(tmp_path / "ref" / "run"), final_params(tmp_path / "again" / "run"), atol=1e-6)


def test_existing_run_missing_checkpoint_and_auto_without_checkpoints(tmp_path, teacher, capsys):
    run(tmp_path, teacher)
    with pytest.raises(UserError, match="already holds checkpoints: pass resume=auto"):
        Trainer(load_config(DEMO_CONFIG, tiny_overrides(tmp_path, teacher)))
    with pytest.raises(UserError, match="checkpoint not found: .*nope.pt"):
        Trainer(load_config(DEMO_CONFIG, tiny_overrides(tmp_path / "x", teacher, resume=str(tmp_path / "nope.pt"))))
    t = run(tmp_path / "fresh", teacher, resume="auto")
    assert t.step == 8 and "no checkpoint in" in capsys.readouterr().err


def test_nan_loss_stops_with_one_line(tmp_path, capsys):
    teacher = make_teacher(tmp_path / "nan.pt")
    ckpt = torch.load(teacher, weights_only=True)
    ckpt["model"]["blocks.1.mlp.fc2.weight"][0, 0] = float("nan")
    torch.save(ckpt, teacher)
    with pytest.raises(SystemExit) as e:
        main(["train", str(DEMO_CONFIG), *tiny_overrides(tmp_path, teacher)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: loss is nan at step 2")
    assert not list((tmp_path / "run" / "checkpoints").iterdir())  # nothing saved from NaN weights


def test_setup_errors(tmp_path, teacher):
    with pytest.raises(UserError, match="data.augment.size.*expects 16 px"):
        Trainer(load_config(DEMO_CONFIG, tiny_overrides(tmp_path, teacher, **{"data.augment.size": 32})))
    with pytest.raises(UserError, match="config key 'task': cannot import 'nosuch.mod:Task'"):
        load_config(DEMO_CONFIG, tiny_overrides(tmp_path, teacher, task="nosuch.mod:Task"))
    with pytest.raises(UserError, match="fewer than one optimiser step"):
        Trainer(load_config(DEMO_CONFIG, tiny_overrides(tmp_path, teacher, **{"data.batch_size": 64})))
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot create out_dir"):
        Trainer(load_config(DEMO_CONFIG, tiny_overrides(tmp_path, teacher, out_dir=str(tmp_path / "file" / "run"))))
    overrides = tiny_overrides(tmp_path, teacher, **{"checkpoint.dir": str(tmp_path / "file" / "c")})
    with pytest.raises(UserError, match="cannot create checkpoint.dir"):
        Trainer(load_config(DEMO_CONFIG, overrides))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(tmp_path, teacher, precision):
    t = run(tmp_path, teacher, precision=precision, **{"teacher.dtype": "bfloat16", "schedule.max_steps": 2,
                                                      "logging.every_steps": 1})
    records = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["loss"] > 0 for r in records)
    scaler = torch.load(tmp_path / "run" / "checkpoints" / "step_00000002.pt", weights_only=True)["scaler"]
    assert t.scaler.is_enabled() == (precision == "fp16") and bool(scaler) == (precision == "fp16")


def test_tensorboard_optional(tmp_path, teacher, capsys):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        run(tmp_path, teacher, **{"logging.tensorboard": "on", "schedule.max_steps": 2})
        assert "tensorboard package is not installed" in capsys.readouterr().err
        assert not (tmp_path / "run" / "tb").exists()
    else:
        run(tmp_path, teacher, **{"logging.tensorboard": "auto", "schedule.max_steps": 2})
        assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "run" / "tb").iterdir())


@pytest.mark.slow
def test_torch_compile_matches_eager(tmp_path, teacher):
    run(tmp_path / "eager", teacher, **{"schedule.max_steps": 4})
    run(tmp_path / "compiled", teacher, compile=True, **{"schedule.max_steps": 4})
    assert_same_params(final_params(tmp_path / "eager" / "run", 4), final_params(tmp_path / "compiled" / "run", 4),
                       atol=1e-5, skip=NOISE_ONLY)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from trainer import checkpoint as ckpt_mod

    ck = ckpt_mod.Checkpointer(tmp_path / "c", keep_last=2, is_main=True)
    ck.save({"step": 1}, 1)

    def torn_save(obj, f):  # the disk fills up half way through
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", torn_save)
    with pytest.raises(UserError, match="cannot write checkpoint .*step_00000002.pt: No space left on device "
                                        r"\(the previous checkpoint step_00000001.pt is kept"):
        ck.save({"step": 2}, 2)
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["step_00000001.pt"]
    assert ck.latest() == tmp_path / "c" / "step_00000001.pt"
    assert ckpt_mod.Checkpointer.load(ck.latest()) == {"step": 1}


def test_d2v2_topk_variant_trains(tmp_path, teacher):
    t = run(tmp_path, teacher, **{"loss.variant": "d2v2_topk", "loss.top_k": 2, "schedule.max_steps": 2})
    head = final_params(tmp_path / "run", 2)["head.weight"]
    assert torch.equal(head, t.task.student.head.weight.detach())  # the head is checkpointed
    from trainer.tasks.image_kd import ImageKDTask

    initial = ImageKDTask(t.cfg, torch.device("cpu")).student.head.weight  # same seed, untrained
    assert not torch.equal(head, initial.detach())  # the head was optimised
    assert any(p is t.task.student.head.weight for g in t.optimizer.param_groups for p in g["params"])
