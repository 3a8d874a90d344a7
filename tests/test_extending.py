"""docs/extending.md followed in a test: a toy teacher family (tests/toy_teacher.py) added by one
registry line trains in the image task (`teacher.kind`) and is evaluated by `trainer eval probe
--teacher KIND`; unknown kinds and kinds without per-block targets are one-line refusals."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_eval_pipeline import write_class_shards
from tests.toy_teacher import load_toy_teacher, register, write_toy_teacher
from train_fixtures import tiny_overrides, train_in_process
from trainer.cli import main
from trainer.models import registry
from trainer.models.beitv2 import BEiTShape, write_beitv2_checkpoint
from trainer.models.vit import ViTShape

SHAPE = ViTShape(img_size=16, patch_size=8, dim=32, depth=3, num_heads=2)


@pytest.fixture
def toy(monkeypatch, tmp_path):
    monkeypatch.setattr(registry, "TEACHERS", dict(registry.TEACHERS))  # the test's line goes away after it
    register(registry.TEACHERS)
    return write_toy_teacher(tmp_path / "toy.pt", SHAPE, seed=1)


def test_a_toy_teacher_registered_by_one_line_trains_in_the_image_task(toy, tmp_path):
    over = tiny_overrides(tmp_path, toy, **{"teacher.kind": "toy", "schedule.max_steps": 2,
                                            "checkpoint.every_steps": 2})
    trainer = train_in_process("configs/demo.yaml", over)
    task = trainer.task
    assert type(task.teacher).__name__ == "Data2Vec2ViT" and task.teacher.shape == SHAPE
    # the teacher is the toy file's model; the student's first blocks started as its copy
    want = load_toy_teacher(toy).state_dict()
    for k, v in task.teacher.state_dict().items():
        torch.testing.assert_close(v, want[k], atol=0, rtol=0)
    ckpts = sorted((tmp_path / "run").rglob("step_*.pt"))
    assert ckpts and torch.load(ckpts[-1], weights_only=True)["config"]["teacher"]["kind"] == "toy"
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses and all(torch.isfinite(torch.tensor(x)) for x in losses)


def test_a_toy_teacher_is_evaluated_with_eval_teacher_kind(toy, tmp_path, capsys):
    shards = write_class_shards(tmp_path / "shards")
    out = tmp_path / "probe.json"
    main(["eval", "probe", str(toy), "--teacher", "toy", "--train-shards", str(shards), "--out", str(out),
          "--workers", "0", "--batch-size", "8", "--epochs", "2", "--knn-k", "3", "--cache-dir", ""])
    rec = json.loads(out.read_text())
    assert rec["model"]["kind"] == "toy" and rec["model"]["task"] == "toy"
    assert rec["metrics"]["train_images"] == 24
    assert "[teacher" in capsys.readouterr().out  # labelled as a teacher, as --data2vec2 was


def test_the_beitv2_family_is_evaluated_through_the_same_line(tmp_path):
    from trainer.eval.models import load_eval_model

    path = write_beitv2_checkpoint(tmp_path / "b.pth", BEiTShape(img_size=16, patch_size=8, dim=32, depth=2,
                                                                 num_heads=4))
    m = load_eval_model(str(path), teacher="beitv2")
    assert (m.kind, m.augment.size) == ("beitv2", 16)
    with torch.no_grad():
        assert m.encoder("image", "probe")(torch.randn(2, 3, 16, 16)).shape == (2, 5, 32)


def test_unknown_or_unfit_kinds_are_one_line_refusals(toy, tmp_path, capsys):
    beit = write_beitv2_checkpoint(tmp_path / "b.pth", BEiTShape(img_size=16, patch_size=8, dim=32, depth=2,
                                                                 num_heads=4))
    for over, msg in [({"teacher.kind": "nope"}, "config key 'teacher.kind': teacher kind 'nope' is not registered "
                                                 "(known: beitv2, data2vec2, toy)"),
                      ({"teacher.kind": "beitv2", "teacher.checkpoint": str(beit)}, "gives no per-block targets")]:
        with pytest.raises(SystemExit) as e:
            main(["train", "configs/demo.yaml", *tiny_overrides(tmp_path, toy, **over)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
    shards = write_class_shards(tmp_path / "shards")
    for args, msg in [(["--teacher", "nope"], "--teacher 'nope' is not registered"),
                      (["--teacher", "toy", "--data2vec2"], "--data2vec2 means --teacher data2vec2")]:
        with pytest.raises(SystemExit) as e:
            main(["eval", "probe", str(toy), *args, "--train-shards", str(shards)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, err


def test_the_docs_show_the_line_the_toy_adds():
    """docs/extending.md and tests/toy_teacher.py cannot drift apart: the registry line the page
    shows is the one the toy teacher adds (with the registry's own dict name)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    toy_line = next(line.strip() for line in (root / "tests" / "toy_teacher.py").read_text().splitlines()
                    if line.strip().startswith('teachers["toy"] = TeacherSpec('))
    page = (root / "docs" / "extending.md").read_text()
    assert toy_line.replace("teachers[", "TEACHERS[", 1) in page
    for path in ("trainer/models/registry.py", "tests/toy_teacher.py", "tests/test_extending.py",
                 "trainer/tasks/base.py", "shardify/sources/base.py", "trainer/eval/results.py"):
        assert path in page and (root / path).exists(), path


def test_a_data2vec2_run_does_not_import_the_other_families():
    """The registry imports a family's module when it is used: the image task with its default
    teacher runs where timm is not installed (the bare GPU machines of the GPU check)."""
    import subprocess
    import sys

    code = ("import sys, trainer.tasks.image_kd, trainer.models.registry as r; "
            "r.teacher_spec('data2vec2'); assert 'timm' not in sys.modules, 'timm imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_toy_evaluation_registered_by_one_line_is_written_and_reported(monkeypatch, tmp_path):
    """docs/extending.md's evaluation checklist followed: the toy metric agrees with sklearn's
    NearestCentroid, its record goes through write_result, and `trainer report` shows it with the
    thesis figure beside it only when the protocol is the registered one."""
    from sklearn.neighbors import NearestCentroid

    from tests import toy_evaluation
    from trainer.eval import results
    from trainer.report import write_report

    monkeypatch.setattr(results, "EVALUATIONS", dict(results.EVALUATIONS))
    toy_evaluation.register(results.EVALUATIONS)
    shards = write_class_shards(tmp_path / "shards")
    train_x, train_y = toy_evaluation.mean_colour_features(shards, "train")
    val_x, _ = toy_evaluation.mean_colour_features(shards, "validation")
    ours = toy_evaluation.nearest_centroid_predictions(train_x, train_y, val_x)
    assert (ours == NearestCentroid().fit(train_x, train_y).predict(val_x)).all()

    reports = {}
    for protocol in ("toy-protocol", "custom (toy-protocol with lr changed)"):
        run = tmp_path / protocol.split()[0]
        (run / "eval").mkdir(parents=True)
        (run / "log.jsonl").write_text(json.dumps({"step": 1, "total_steps": 1, "loss": 1.0}) + "\n")
        rec = toy_evaluation.run_toy(shards, run / "eval" / "toy.json", protocol=protocol)
        assert rec["benchmark"] == "toy_centroid" and rec["protocol"] == protocol
        reports[protocol] = write_report(run).read_text()
    shown, custom = reports.values()
    assert "toy: nearest class centroid" in shown and "| *thesis: Toy*" in shown
    assert "toy: nearest class centroid" in custom and "*thesis: Toy*" not in custom
    assert "not set beside these" in custom
