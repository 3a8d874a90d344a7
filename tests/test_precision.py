"""Precision in one place: every task takes autocast and its float32 fallback from
trainer/precision.py, and the fallback is the same (and said once) for teacher and student."""

import ast
from pathlib import Path

import torch

from trainer import precision

REPO = Path(__file__).resolve().parents[1]


def test_autocast_fp32_is_a_no_op_and_bf16_casts():
    x = torch.ones(2, 4)
    with precision.autocast(torch.device("cpu"), "fp32"):
        assert torch.nn.functional.linear(x, torch.ones(4, 4)).dtype == torch.float32
    with precision.autocast(torch.device("cpu"), "bfloat16"):
        assert torch.nn.functional.linear(x, torch.ones(4, 4)).dtype == torch.bfloat16


def test_fallback_to_float32_is_logged_with_the_key(monkeypatch, caplog):
    cpu = torch.device("cpu")
    assert precision.usable_autocast_dtype(cpu, "bf16", "precision", "student") == "bf16"
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    with caplog.at_level("WARNING"):
        assert precision.usable_autocast_dtype(cpu, "bf16", "precision", "student") == "float32"
    assert "precision bf16" in caplog.text and "the student runs in float32" in caplog.text
    assert precision.usable_autocast_dtype(cpu, "fp32") == "fp32"  # fp32 never needs a check


def test_every_task_takes_precision_from_one_module():
    """No task imports autocast from another task, and each resolves teacher and student dtypes
    through usable_autocast_dtype (so all three fall back alike)."""
    for path in sorted((REPO / "trainer" / "tasks").glob("*_kd.py")) + [REPO / "trainer" / "tasks" / "multimodal.py"]:
        tree = ast.parse(path.read_text())
        imports = {(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert ("trainer.precision", "autocast") in imports, path.name
        assert not any(m and m.startswith("trainer.tasks.") and name == "autocast" for m, name in imports), path.name
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") ==
                 "usable_autocast_dtype"]
        keys = {c.args[2].value for c in calls if len(c.args) > 2}
        assert keys == {"teacher.dtype", "precision"}, path.name
