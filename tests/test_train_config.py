"""Config layering, checking and the one-line errors of the `trainer` command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.train_fixtures import DEMO_CONFIG, REPO
from trainer.cli import main
from trainer.config import Config, ConfigError, load_config, parse_override, save_config


def test_layering_defaults_file_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 1.0e-3\n  betas: [0.8, 0.9]\nschedule:\n  epochs: 3\n")
    cfg = load_config(f, ["optim.lr=2e-3", "data.manifests=[a, b]", "resume=auto", "data.augment.size=64",
                          "teacher.checkpoint=t.pt"])
    assert cfg.optim.lr == 2e-3  # override beats file
    assert cfg.optim.betas == (0.8, 0.9) and isinstance(cfg.optim.betas, tuple)  # file beats default
    assert cfg.schedule.epochs == 3.0 and isinstance(cfg.schedule.epochs, float)
    assert cfg.optim.eps == Config().optim.eps  # default kept
    assert cfg.data.manifests == ["a", "b"] and cfg.resume == "auto" and cfg.data.augment.size == 64


def test_resolved_config_round_trip(tmp_path):
    cfg = load_config(DEMO_CONFIG, ["optim.weight_decay=0.5"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("nosuch=1", "unknown config key 'nosuch'"),
    ("data.augment.sise=3", "unknown config key 'data.augment.sise'"),
    ("optim.lr=fast", "config key 'optim.lr': expected a number"),
    ("schedule.max_steps=1.5", "config key 'schedule.max_steps': expected an integer"),
    ("compile=yes please", "config key 'compile': expected true/false"),
    ("precision=fp8", "config key 'precision': 'fp8' is not one of bf16, fp16, fp32"),
    ("optim.weight_decay=-1", "config key 'optim.weight_decay': -1.0 is outside"),
    ("optim.betas=[0.9]", "config key 'optim.betas': expected 2 values"),
    ("optim=3", "config key 'optim': expected a section"),
    ("schedule.warmup_frac=2", "config key 'schedule.warmup_frac': 2.0 is outside"),
    ("nokeyvalue", "is not key=value"),
])
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO_CONFIG, [override])
    assert message in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(tmp_path / "list.yaml")


def test_override_parsing():
    assert parse_override("a.b=[1, 2]") == {"a": {"b": [1, 2]}}
    assert parse_override("x=") == {"x": ""}
    assert parse_override("p=runs/a=b") == {"p": "runs/a=b"}


def test_shipped_configs_load_and_carry_the_thesis_hyperparameters():
    cfg = load_config(REPO / "configs" / "image_kd.yaml")
    assert (cfg.task_cfg.student.depth, cfg.schedule.epochs, cfg.data.batch_size) == (6, 10.0, 256)
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.eps, cfg.optim.weight_decay) == (5e-4, (0.9, 0.98), 1e-6, 0.01)
    assert cfg.optim.scale_lr and cfg.schedule.warmup_frac == 0.1 and cfg.precision == "bf16"
    assert cfg.data.augment.size == 224 and cfg.data.augment.scale == (0.08, 1.0)
    assert cfg.task_cfg.loss.variant == "layer_avg" and cfg.task_cfg.teacher.dtype == "float16"
    assert cfg.task_cfg.loss.layer_tensor == "auto" and cfg.task_cfg.student.train_pos_embed is False
    demo = load_config(DEMO_CONFIG)
    assert demo.task_cfg.teacher.checkpoint == "demo_out/teacher/d2v2_tiny.pt" and demo.device == "cpu"


@pytest.mark.parametrize("args,message", [
    (["train", "CONFIG", "optim.lrr=1"], "error: unknown config key 'optim.lrr'"),
    (["train", "CONFIG", "teacher.checkpoint=/nonexistent/t.pt"],
     "error: config key 'teacher.checkpoint': file not found: /nonexistent/t.pt"),
    (["train", "/nonexistent.yaml"], "error: config file not found: /nonexistent.yaml"),
])
def test_cli_user_errors_are_one_line(args, message, capsys, tmp_path):
    args = [str(DEMO_CONFIG) if a == "CONFIG" else a for a in args] + [f"out_dir={tmp_path / 'run'}"]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith(message)


def test_console_script_make_demo_teacher(tmp_path):
    out = tmp_path / "t" / "teacher.pt"
    r = subprocess.run([sys.executable, "-m", "trainer.cli", "make-demo-teacher", str(out), "--dim", "32",
                        "--depth", "2", "--heads", "2"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert out.is_file()
    r = subprocess.run([sys.executable, "-m", "trainer.cli", "make-demo-teacher", str(out), "--dim", "30"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "divisible" in r.stderr
    (tmp_path / "file").write_text("")
    r = subprocess.run([sys.executable, "-m", "trainer.cli", "make-demo-teacher", str(tmp_path / "file" / "t.pt")],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and r.stderr.startswith("error: cannot write") and r.stderr.count("\n") == 1
