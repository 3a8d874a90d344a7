"""What a resume may change and what it refuses (trainer/resume_check.py), and which checkpoint
resume=auto takes (issue 18, items 2, 5, 11, 12, and a resume of a finished run).

Runs are the toy task (tests/toy_task.py) on tiny shards through the real loader, except the
model-shape case, which needs image_kd's teacher-derived student."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
import yaml

from tests.train_fixtures import DEMO_CONFIG, make_teacher, tiny_overrides, train_in_process, write_image_shards
from trainer.cli import main
from trainer.config import load_config
from trainer.errors import UserError
from trainer.loop import Trainer

TOY = "tests.toy_task:ToyTask"


def toy_args(tmp_path, manifests=None, **over) -> list[str]:
    """(config path, overrides) of a toy run: 4 steps, a checkpoint every 2, all kept."""
    if manifests is None:
        shards = tmp_path / "shards"
        if not (shards / "manifest.json").is_file():
            write_image_shards(shards, n=32, val=8)
        manifests = [str(shards)]
    cfg = {
        "task": TOY, "out_dir": str(tmp_path / "run"), "device": "cpu", "precision": "fp32",
        "data": {"manifests": manifests, "batch_size": 8, "num_workers": 0, "decode_device": "cpu",
                 "augment": {"size": 16}},
        "optim": {"lr": 1e-2, "scale_lr": False},
        "schedule": {"max_steps": 4, "warmup_steps": 2},
        "checkpoint": {"every_steps": 2, "keep_last": 5},
        "logging": {"every_steps": 1, "tensorboard": "off"},
    }
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return [str(path), *[f"{k}={v}" for k, v in over.items()]]


def train(args: list[str]) -> Trainer:
    return train_in_process(args[0], args[1:])


def build(args: list[str]) -> Trainer:
    """A Trainer built (and resumed) but not trained; closed at once."""
    t = Trainer(load_config(args[0], args[1:]))
    t.close()
    return t


def rows(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]


def snapshot(run_dir) -> dict:
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def ckpt(tmp_path, step: int):
    return tmp_path / "run" / "checkpoints" / f"step_{step:08d}.pt"


# -- item 2: the optimiser's hyper-parameters follow the new config ------------------------------


def test_resume_takes_lr_weight_decay_betas_eps_from_the_new_config(tmp_path):
    train(toy_args(tmp_path))
    new = {"optim.lr": 0.04, "optim.weight_decay": 0.3, "optim.betas": "[0.8,0.9]", "optim.eps": 1e-5,
           "schedule.max_steps": 6}
    t = train(toy_args(tmp_path, resume=str(ckpt(tmp_path, 2)), **new))
    assert t.step == 6
    for g in t.optimizer.param_groups:
        assert g["initial_lr"] == pytest.approx(0.04)
        assert g["betas"] == (0.8, 0.9) and g["eps"] == pytest.approx(1e-5)
        assert g["weight_decay"] == pytest.approx(0.3 if g["name"] == "decay" else 0.0)
    # the logged lr of every resumed step follows the new base lr through the new schedule
    from trainer.loop import cosine_with_warmup

    factor = cosine_with_warmup(2, 6, 0.0)
    logged = {r["step"]: r["lr"] for r in rows(tmp_path / "run") if "lr" in r}
    for s in (3, 4, 5, 6):
        assert logged[s] == pytest.approx(0.04 * factor(s), rel=1e-6), s
    # the moments came from the checkpoint (a fresh optimiser would have step 4 here, not 6)
    state = t.optimizer.state_dict()["state"]
    assert int(next(iter(state.values()))["step"]) == 6


def test_resume_on_another_global_batch_rescales_the_lr(tmp_path):
    train(toy_args(tmp_path, **{"optim.scale_lr": True}))
    # half the batch per process (as on twice the GPUs with the same per-GPU batch: the lr
    # follows the total batch); the schedule continues from step 2
    t = build(toy_args(tmp_path, resume=str(ckpt(tmp_path, 2)), **{"optim.scale_lr": True, "data.batch_size": 4}))
    assert t.global_batch == 4 and t.base_lr == pytest.approx(1e-2 * 4 / 256)
    assert [g["initial_lr"] for g in t.optimizer.param_groups] == pytest.approx([t.base_lr] * 2)
    assert t.scheduler.get_last_lr()[0] == pytest.approx(t.base_lr * 2 / 2)  # warmup done at step 2
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(t.base_lr)


# -- items 11 and 12: a resume that changes the run's meaning is refused -------------------------


def test_a_changed_model_shape_is_one_line_naming_the_key(tmp_path, capsys):
    teacher = make_teacher(tmp_path / "teacher.pt")
    args = tiny_overrides(tmp_path, teacher, **{"schedule.max_steps": 2, "checkpoint.every_steps": 2})
    main(["train", str(DEMO_CONFIG), *args])
    before = snapshot(tmp_path / "run")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["train", str(DEMO_CONFIG), *args, "student.depth=3", "resume=auto"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert "config key 'student.depth' was 2, now 3" in err[0] and "resume=force" in err[0]
    # forced, the weights cannot fit: still one line, never a state_dict traceback
    with pytest.raises(SystemExit):
        main(["train", str(DEMO_CONFIG), *args, "student.depth=3", "resume=force"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot resume from") and "do not fit this student" in err[-1]
    assert snapshot(tmp_path / "run") == before


def _two_sources(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_image_shards(a, n=16, per_shard=8)
    write_image_shards(b, n=24, per_shard=8)
    for root in (a, b):  # what shardify writes: every shard's sha256
        set_sha256(root)
    return a, b


def set_sha256(root) -> None:
    m = json.loads((root / "manifest.json").read_text())
    for sh in m["splits"]["train"]["shards"]:
        sh["sha256"] = hashlib.sha256((root / sh["name"]).read_bytes()).hexdigest()
    (root / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("change,message", [
    ("reorder", "config key 'data.manifests' was"),
    ("weights", "config key 'data.weights' was [1.0, 1.0], now [2.0, 1.0]"),
    ("content", "config key 'data.manifests[0]'"),
])
def test_changed_data_is_refused_before_anything_is_written(tmp_path, change, message):
    a, b = _two_sources(tmp_path)
    train(toy_args(tmp_path, manifests=[str(a), str(b)], **{"data.weights": "[1,1]"}))
    before = snapshot(tmp_path / "run")
    manifests, weights = [str(a), str(b)], "[1,1]"
    if change == "reorder":
        manifests = [str(b), str(a)]
    elif change == "weights":
        weights = "[2,1]"
    else:  # shard 0 of a re-written with other images, same count: the manifest's sha256 says so
        from tests.train_fixtures import _write_split

        m = json.loads((a / "manifest.json").read_text())
        _write_split(a, "train", 8, 8, 1000)
        sh = m["splits"]["train"]["shards"][0]
        sh["sha256"] = hashlib.sha256((a / sh["name"]).read_bytes()).hexdigest()
        sh["bytes"] = (a / sh["name"]).stat().st_size
        (a / "manifest.json").write_text(json.dumps(m))
        message += " (" + str(a / "manifest.json") + "): shard train-000000.tar changed"
    args = toy_args(tmp_path, manifests=manifests, resume="auto", **{"data.weights": weights,
                                                                      "schedule.max_steps": 6})
    with pytest.raises(UserError) as e:
        build(args)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert snapshot(tmp_path / "run") == before
    # resume=force continues, saying what differs
    t = train(args[:1] + [x for x in args[1:] if not x.startswith("resume=")] + ["resume=force"])
    assert t.step == 6


def test_moved_data_with_the_same_shards_resumes(tmp_path, capsys):
    a, b = _two_sources(tmp_path)
    train(toy_args(tmp_path, manifests=[str(a), str(b)]))
    moved = tmp_path / "moved"
    shutil.copytree(a, moved / "a")
    shutil.copytree(b, moved / "b")
    t = train(toy_args(tmp_path, manifests=[str(moved / "a"), str(moved / "b")], resume="auto",
                       **{"schedule.max_steps": 6, "logging.every_steps": 2}))
    assert t.step == 6
    assert "changed since the checkpoint: logging.every_steps, schedule.max_steps" in capsys.readouterr().err


# -- item 5: resume=auto takes the newest checkpoint that loads --------------------------------------


def test_auto_skips_a_damaged_latest_checkpoint_and_says_why(tmp_path, capsys):
    train(toy_args(tmp_path))
    latest = ckpt(tmp_path, 4)
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # cut off, as by a full disk
    capsys.readouterr()
    t = build(toy_args(tmp_path, resume="auto", **{"schedule.max_steps": 6}))
    assert t.step == 2
    err = capsys.readouterr().err
    assert f"resume=auto: skipping {latest}: checkpoint {latest} is damaged" in err
    assert "format" not in err  # not the misleading "checkpoints from before format 2" hint
    assert f"resumed from {ckpt(tmp_path, 2)} at step 2" in err
    # nothing readable at all: one line, the reasons above it
    ckpt(tmp_path, 2).write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="none of the 2 checkpoint"):
        build(toy_args(tmp_path, resume="auto"))


# -- a resume of a finished run ---------------------------------------------------------------------


def test_resuming_a_finished_run_does_not_validate_or_save_again(tmp_path, capsys):
    args = toy_args(tmp_path, **{"data.val_split": "validation"})
    train(args)
    before = snapshot(tmp_path / "run")
    n_rows = len(rows(tmp_path / "run"))
    capsys.readouterr()
    t = train(args + ["resume=auto"])
    assert t.step == 4 and "the run is finished: step 4 of 4" in capsys.readouterr().err
    assert len(rows(tmp_path / "run")) == n_rows  # no second validation row
    after = snapshot(tmp_path / "run")
    assert {p for p in after if "checkpoints" in str(p)} == {p for p in before if "checkpoints" in str(p)}
    assert all(after[p] == before[p] for p in before if "checkpoints" in str(p))


def test_checkpoints_record_what_the_manifests_held(tmp_path):
    train(toy_args(tmp_path))
    state = torch.load(ckpt(tmp_path, 4), weights_only=True)
    (fp,) = state["data"]
    assert fp["dataset"] == "fixture" and fp["split"] == "train"
    assert [s[0] for s in fp["shards"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar",
                                            "train-000003.tar"]
    assert sum(s[1] for s in fp["shards"]) == 32


def test_the_rule_key_by_key():
    from trainer.resume_check import config_differences, data_differences

    old = {"task": "image_kd", "optim": {"lr": 1e-3}, "student": {"depth": 6}, "data": {"seed": 0, "manifests": ["a"]},
           "schedule": {"max_steps": 10, "grad_accum": 1}, "teacher": {"dtype": "float16", "checkpoint": "t.pt"}}
    new = {"task": "image_kd", "optim": {"lr": 2e-3}, "student": {"depth": 6}, "data": {"seed": 0, "manifests": ["b"]},
           "schedule": {"max_steps": 20, "grad_accum": 2}, "teacher": {"dtype": "float32", "checkpoint": "t.pt"},
           "loss": {"new_option": 1}}  # an option a newer version added: not compared
    assert config_differences(old, new) == []
    new["data"]["seed"], new["teacher"]["checkpoint"] = 1, "other.pt"
    assert config_differences(old, new) == ["config key 'data.seed' was 0, now 1",
                                            "config key 'teacher.checkpoint' was 't.pt', now 'other.pt'"]
    fp = [{"manifest": "/x/a.json", "dataset": "d", "split": "train", "shards": [["s0.tar", 5, "aa"]]},
          {"manifest": "/x/b.json", "dataset": "e", "split": "train", "shards": [["s0.tar", 5, "bb"]]}]
    moved = [dict(f, manifest="/y" + f["manifest"][2:]) for f in fp]
    assert data_differences(fp, moved, ["/x/a", "/x/b"], ["/y/a", "/y/b"]) == []
    assert "(reordered)" in data_differences(fp, fp[::-1], ["/x/a", "/x/b"], ["/x/b", "/x/a"])[0]
    assert "(another list)" in data_differences(fp, fp[:1], ["/x/a", "/x/b"], ["/x/a"])[0]
    grown = [fp[0], dict(fp[1], shards=fp[1]["shards"] + [["s1.tar", 5, "cc"]])]
    assert data_differences(fp, grown, [], [])[0].endswith("shard s1.tar is new (1 shards before, 2 now)")
    # checkpoints from before fingerprints: the configured paths
    assert data_differences(None, fp, ["/x/a", "/x/b"], ["/x/a", "/x/b"]) == []
    assert data_differences(None, fp, ["/x/a"], ["/x/a", "/x/b"]) != []


@pytest.mark.slow
def test_resumed_on_two_processes_the_lr_follows_the_new_total_batch(tmp_path):
    """The issue's case: a 1-process run continued by 2 gloo processes with the same per-process
    batch; the total batch doubles, and so does the lr from the resumed step on."""
    from tests.test_train_ddp import torchrun
    from trainer.loop import cosine_with_warmup

    teacher = make_teacher(tmp_path / "teacher.pt")
    lr = {"optim.scale_lr": True, "optim.lr": 1e-3}
    train_in_process(DEMO_CONFIG, tiny_overrides(tmp_path / "one", teacher, **lr))
    step4 = tmp_path / "one" / "run" / "checkpoints" / "step_00000004.pt"
    same_data = {"data.manifests": f"[{tmp_path / 'one' / 'shards'}]"}
    r = torchrun(2, tiny_overrides(tmp_path / "two", teacher, resume=str(step4), **lr, **same_data))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 4 (saved by 1 process(es), now 2)" in r.stderr and "global batch 16, lr 6.250e-05" in r.stderr
    factor = cosine_with_warmup(2, 8, 0.0)
    logged = [json.loads(x) for x in (tmp_path / "two" / "run" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logged] == [6, 8]
    for x in logged:
        assert x["lr"] == pytest.approx(1e-3 * 16 / 256 * factor(x["step"]), rel=1e-6)


def test_dry_run_says_whether_and_from_where_the_run_would_resume(tmp_path, capsys):
    train(toy_args(tmp_path))
    before = snapshot(tmp_path / "run")
    capsys.readouterr()

    def dry(*extra):
        try:
            main(["train", *toy_args(tmp_path), *extra, "--dry-run"])
        except SystemExit as e:
            return e.code, capsys.readouterr().err.strip().splitlines()
        return 0, capsys.readouterr().err.strip().splitlines()

    code, err = dry("resume=auto", "optim.lr=0.05", "schedule.max_steps=8")
    assert code == 0 and err[-2:] == ["resume: changed since the checkpoint: optim.lr, schedule.max_steps",
                                      f"resume: from {ckpt(tmp_path, 4)} at step 4"]
    code, err = dry("resume=auto", "toy.width=8")
    assert code == 2 and err[-1].startswith(f"error: cannot resume from {ckpt(tmp_path, 4)}: config key "
                                            f"'toy.width' was 4, now 8")
    code, err = dry()
    assert code == 2 and err[-1].endswith("already holds checkpoints: pass resume=auto to continue that run, "
                                          "or choose another out_dir")
    assert snapshot(tmp_path / "run") == before
