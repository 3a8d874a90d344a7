"""The benchmark scripts run end to end (tiny settings on CPU) and print their summary lines,
so the prepared GPU script does not rot while no GPU is around."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.train_fixtures import REPO, write_image_shards


def run_script(tmp_path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args, "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=240)


def test_gpu_script_smoke_on_cpu(tmp_path):
    r = run_script(tmp_path, "bench/gpu_train.py", "--tiny", "--device", "cpu", "--batch", "4", "--steps", "2",
                   "--repeats", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"^gpu-train: \d+ images/s, data-wait \d+\.\d%, peak mem \d+\.\d GiB", r.stdout, re.M), r.stdout


@pytest.mark.slow
def test_bench_train_prints_its_line(tmp_path):
    data = ["--shards", str(write_image_shards(tmp_path / "shards"))]  # the real streaming path
    r = run_script(tmp_path, "bench/bench_train.py", *data, "--steps", "2", "--repeats", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"^train: \d+\.\d\d steps/s, data-wait \d+\.\d%$", r.stdout.strip().splitlines()[-1]), r.stdout
