"""The task seam: a toy task from the tests trains through the unchanged loop (own config
section, named losses, after_step, task state in checkpoints), validation with a best
checkpoint, --dry-run, export and rebuild without the teacher, and refusals that change nothing."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from tests.train_fixtures import DEMO_CONFIG, make_teacher, tiny_overrides, train_in_process, write_image_shards
from trainer.cli import main
from trainer.config import ConfigError, load_config
from trainer.errors import UserError
from trainer.export import load_student
from trainer.logs import drop_rows_after
from trainer.loop import Trainer

TOY = "tests.toy_task:ToyTask"


def toy_config(tmp_path, **over) -> list:
    """(config path, overrides) for the toy task on tiny shards with a validation split."""
    shards = tmp_path / "shards"
    if not (shards / "manifest.json").is_file():
        write_image_shards(shards, n=32, val=12)
    cfg = {
        "task": TOY, "out_dir": str(tmp_path / "run"), "device": "cpu", "precision": "fp32",
        "data": {"manifests": [str(shards)], "batch_size": 8, "num_workers": 0, "decode_device": "cpu",
                 "augment": {"size": 16}},
        "optim": {"lr": 1e-2, "scale_lr": False},
        "schedule": {"max_steps": 2, "warmup_steps": 0},
        "checkpoint": {"every_steps": 1, "keep_last": 1},
        "logging": {"every_steps": 1, "tensorboard": "off"},
        "toy": {"width": 4},
    }
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return [str(path), *[f"{k}={v}" for k, v in over.items()]]


def train(args: list) -> Trainer:
    return train_in_process(args[0], args[1:])


def rows(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]


def test_a_task_from_a_test_module_trains_logs_every_loss_and_keeps_its_state(tmp_path, capsys):
    t = train(toy_config(tmp_path))
    assert t.task.steps_seen == [1, 2]  # after_step once per optimiser step
    records = rows(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert {"loss", "l1", "l2", "lr", "elapsed_s", "eta_s", "time"} <= r.keys()
        assert r["loss"] == pytest.approx(r["l2"] + 0.5 * r["l1"], rel=1e-5)
    out = capsys.readouterr().out
    assert "| loss " in out and "| l1 " in out and "| l2 " in out and "eta" in out
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "step_00000002.pt", weights_only=True)
    assert ckpt["task"] == TOY and ckpt["student_arch"] == {"width": 4, "pool": "mean"}
    assert ckpt["task_state"]["steps_seen"].tolist() == [1, 2] and ckpt["config"]["toy"]["width"] == 4
    # resume: the task state comes back from the checkpoint and carries on
    t = train(toy_config(tmp_path, **{"schedule.max_steps": 4, "resume": "auto"}))
    assert t.task.steps_seen == [1, 2, 3, 4]
    assert [r["step"] for r in rows(tmp_path / "run")] == [1, 2, 3, 4]


@pytest.mark.parametrize("override,message", [
    ("toy.pool=median", "config key 'toy.pool': 'median' is not one of mean, max"),
    ("toy.width=0", "config key 'toy.width': 0 is outside [1, 64]"),
    ("toy.l1_weight=2", "config key 'toy.l1_weight': 2.0 is outside [0.0, 1.0]"),
    ("toy.nope=1", "unknown config key 'toy.nope'"),
    ("teacher.checkpoint=x.pt", "unknown config key 'teacher' for task 'tests.toy_task:ToyTask'"),
    ("data.augment.size=18", "config key 'data.augment.size': 18 is not a multiple"),
    ("data.remainder=sometimes", "config key 'data.remainder': 'sometimes' is not one of drop, pad"),
    ("data.augment.hflip=1.5", "config key 'data.augment.hflip': 1.5 is outside"),
    ("precision=fp8", "config key 'precision': 'fp8' is not one of"),
    ("schedule.warmup_frac=2.0", "config key 'schedule.warmup_frac': 2.0 is outside"),
    ("validation.every_steps=-1", "config key 'validation.every_steps': -1 is outside"),
    ("task=nosuch", "config key 'task': 'nosuch' is not one of image_kd"),
    ("task=tests.toy_task:Nope", "config key 'task': cannot import"),
])
def test_task_and_core_config_errors_name_the_key(tmp_path, override, message):
    args = toy_config(tmp_path, **dict([override.split("=", 1)]))
    with pytest.raises(ConfigError) as e:
        load_config(args[0], args[1:])
    assert message in str(e.value)


def test_dry_run_prints_the_resolved_config_and_builds_nothing(tmp_path, capsys):
    args = toy_config(tmp_path, **{"toy.pool": "max"})
    main(["train", *args, "--dry-run"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["toy"] == {"width": 4, "pool": "max", "l1_weight": 0.5} and printed["task"] == TOY
    assert printed["validation"] == {"every_steps": 0, "max_batches": 0}
    assert not (tmp_path / "run").exists()
    # image_kd: the dry run is the pre-flight: a missing teacher file is one line (test_train_preflight.py)
    with pytest.raises(SystemExit):
        main(["train", str(DEMO_CONFIG), "teacher.checkpoint=/nonexistent/t.pt", "--dry-run"])
    assert "error: config key 'teacher.checkpoint': file not found: /nonexistent/t.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", str(DEMO_CONFIG), "teacher.checkpoint=", "--dry-run"])
    assert "error: config key 'teacher.checkpoint' is empty" in capsys.readouterr().err


def test_validation_logs_val_losses_and_keeps_the_best_checkpoint(tmp_path, capsys):
    t = train(toy_config(tmp_path, **{"data.val_split": "validation", "validation.every_steps": 2,
                                      "schedule.max_steps": 6, "checkpoint.every_steps": 3}))
    val = [r for r in rows(tmp_path / "run") if "val_loss" in r]
    assert [r["step"] for r in val] == [2, 4, 6]
    assert all({"val_l1", "val_l2", "val_batches"} <= r.keys() for r in val)
    assert all(r["val_batches"] == 2 for r in val)  # 12 images, batches of 8, the last padded
    assert "validation at step 2/6 | val_loss" in capsys.readouterr().out
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["best.pt", "step_00000006.pt"]  # keep_last 1, and the best beside it
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    lowest = min(val, key=lambda r: r["val_loss"])
    assert best["step"] == lowest["step"] and best["best_val"] == pytest.approx(lowest["val_loss"])
    assert t.best_val == pytest.approx(lowest["val_loss"])
    # the same samples each time: a validation of unchanged weights gives the same figure
    again = t.validate()
    assert again["val_loss"] == pytest.approx(val[-1]["val_loss"], rel=1e-6)


def test_export_rebuilds_the_student_without_the_teacher(tmp_path, capsys):
    teacher = make_teacher(tmp_path / "teacher.pt")
    t = Trainer(load_config(DEMO_CONFIG, tiny_overrides(tmp_path, teacher, **{"schedule.max_steps": 2})))
    try:
        t.train()
    finally:
        t.close()
    teacher.unlink()  # the export and the rebuild must not need it
    out = tmp_path / "student.pt"
    main(["export", str(tmp_path / "run"), "--out", str(out)])
    assert "task image_kd, step 2" in capsys.readouterr().out
    record = torch.load(out, weights_only=True)
    assert record["kind"] == "shardify-kd-student" and record["task"] == "image_kd"
    assert not any(k.startswith("teacher") for k in record["state_dict"])
    img = torch.randn(3, 3, 16, 16)
    want = t.task.student.vit.eval()(img)[-1]
    for source in (out, tmp_path / "run"):
        loaded = load_student(source)
        assert loaded.task == "image_kd" and loaded.step == 2 and not loaded.student.training
        torch.testing.assert_close(loaded.encoders["image"](img), want)
    with pytest.raises(UserError, match="holds no checkpoint"):
        load_student(tmp_path)


def test_refused_resume_changes_nothing_on_disk(tmp_path):
    args = toy_config(tmp_path)
    train(args)
    run = tmp_path / "run"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="already holds checkpoints"):
        Trainer(load_config(args[0], args[1:] + ["optim.lr=0.5"]))
    with pytest.raises(UserError, match="written by task"):
        Trainer(load_config(DEMO_CONFIG, tiny_overrides(tmp_path / "img", make_teacher(tmp_path / "t.pt"),
                                                        out_dir=str(run), resume="auto")))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_log_rows_after_the_resumed_step_are_dropped(tmp_path):
    args = toy_config(tmp_path, **{"schedule.max_steps": 4, "checkpoint.every_steps": 2, "checkpoint.keep_last": 3})
    train(args)
    # resume from step 2 in the same run directory, as after a crash at step 4
    train(args + [f"resume={tmp_path / 'run' / 'checkpoints' / 'step_00000002.pt'}"])
    assert [r["step"] for r in rows(tmp_path / "run")] == [1, 2, 3, 4]
    log = tmp_path / "l.jsonl"
    log.write_text('{"step": 1}\n{"step": 5}\n{"step": 2, "val_loss": 1.0}\n{"step": 7')  # torn last line
    assert drop_rows_after(log, 2) == 2
    assert log.read_text() == '{"step": 1}\n{"step": 2, "val_loss": 1.0}\n'
