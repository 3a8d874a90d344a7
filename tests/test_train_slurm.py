"""The SLURM job scripts: bash syntax, and the command lines they build from SLURM variables,
run with stand-in `srun`, `scontrol`, `torchrun` and `shardify` that print their arguments."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.train_fixtures import REPO

SLURM = REPO / "scripts" / "slurm"
SCRIPTS = sorted(SLURM.glob("*.sbatch"))


def test_scripts_exist():
    assert {p.name for p in SCRIPTS} >= {"train_multinode.sbatch", "shard_array.sbatch"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def stub_env(tmp_path: Path, **slurm) -> dict:
    """PATH with stand-ins; the VENV's tools print 'TOOL ARGS...'."""
    bin_dir, venv_bin = tmp_path / "bin", tmp_path / "venv" / "bin"
    bin_dir.mkdir()
    venv_bin.mkdir(parents=True)
    stubs = {
        bin_dir / "srun": 'while [[ $1 == --* ]]; do shift; done; exec "$@"',  # drop srun's own options
        bin_dir / "scontrol": 'printf "node07\\nnode08\\n"',
        venv_bin / "torchrun": 'echo torchrun "$@"',
        venv_bin / "shardify": 'echo shardify "$@"',
    }
    for path, body in stubs.items():
        path.write_text(f"#!/usr/bin/env bash\n{body}\n")
        path.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "VENV": str(tmp_path / "venv"), **slurm}


def test_train_job_builds_the_torchrun_rendezvous(tmp_path):
    env = stub_env(tmp_path, SLURM_JOB_NODELIST="node[07-08]", SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID="4242",
                   SLURM_GPUS_ON_NODE="4")
    r = subprocess.run(["bash", str(SLURM / "train_multinode.sbatch"), "configs/image_kd.yaml", "resume=auto"],
                       capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [
        "torchrun", "--nnodes=2", "--nproc-per-node=4", "--rdzv-id=4242", "--rdzv-backend=c10d",
        "--rdzv-endpoint=node07:29500", "-m", "trainer.cli", "train", "configs/image_kd.yaml", "resume=auto"]


def test_shard_array_maps_task_ids_to_node_ranks(tmp_path):
    env = stub_env(tmp_path, SLURM_ARRAY_TASK_ID="6", SLURM_ARRAY_TASK_MIN="4", SLURM_ARRAY_TASK_COUNT="4",
                   SLURM_CPUS_PER_TASK="16")
    r = subprocess.run(["bash", str(SLURM / "shard_array.sbatch"), "imagenet", "--out", "/data/x"],
                       capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["shardify", "imagenet", "--out", "/data/x", "--num-nodes", "4",
                                "--node-rank", "2", "--workers", "16"]
    env.pop("SLURM_ARRAY_TASK_ID")
    r = subprocess.run(["bash", str(SLURM / "shard_array.sbatch"), "imagenet"], capture_output=True, text=True,
                       env=env, cwd=REPO)
    assert r.returncode == 2 and "array job" in r.stderr
