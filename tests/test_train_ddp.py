"""DDP on CPU (gloo) through torchrun: 2 processes with half the batch each give the same
parameters as 1 process with the whole batch, only rank 0 writes, and a run killed on 1
process resumes on 2. Each torchrun start costs seconds on a 2-core machine: marked slow."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_train_loop import NOISE_ONLY, assert_same_params, final_params, run, trainer_subprocess
from tests.train_fixtures import DEMO_CONFIG, REPO, make_teacher, tiny_overrides

pytestmark = pytest.mark.slow

TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))


def torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "-m", "tests.train_fixtures",
           str(DEMO_CONFIG), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=280)


@pytest.fixture
def teacher(tmp_path):
    return make_teacher(tmp_path / "teacher.pt")


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, teacher):
    run(tmp_path / "one", teacher)  # batch 8 on 1 process
    r = torchrun(2, tiny_overrides(tmp_path / "two", teacher, **{"data.batch_size": 4}))
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_params(final_params(tmp_path / "one" / "run"), final_params(tmp_path / "two" / "run"), atol=1e-5,
                       skip=NOISE_ONLY)
    # rank 0 alone logs: one JSONL record and one console line per logging step
    records = [json.loads(x) for x in (tmp_path / "two" / "run" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in records] == [2, 4, 6, 8]
    assert r.stdout.count("step 8/8 |") == 1
    ckpt = torch.load(tmp_path / "two" / "run" / "checkpoints" / "step_00000008.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2


def test_killed_single_process_run_resumes_on_two(tmp_path, teacher):
    run(tmp_path / "ref", teacher)
    args = tiny_overrides(tmp_path / "run2", teacher)
    r = trainer_subprocess(args, {"FAKE_LOADER_KILL_AT": "5"})
    assert r.returncode == -9, r.stderr
    # same global batch (2 x 4) on two processes: the loader state (samples consumed) carries over
    r = torchrun(2, args + ["data.batch_size=4", "resume=auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 4 (saved by 1 process(es), now 2)" in r.stderr
    assert_same_params(final_params(tmp_path / "ref" / "run"), final_params(tmp_path / "run2" / "run"), atol=1e-5,
                       skip=NOISE_ONLY)
