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


# -- the real job: stand-in srun/scontrol, the real torchrun and trainer (2 gloo ranks on CPU) ----

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def real_job_env(tmp_path: Path, restart: int = 0) -> dict:
    """srun drops its options and runs the command; scontrol names this host and records every
    other call in scontrol.log; scancel records its call in scancel.log and signals the job step
    (the batch shell's other children: torchrun), as SLURM does; $VENV/bin/torchrun is the real one."""
    from tests.test_train_ddp import TORCHRUN

    bin_dir, venv_bin = tmp_path / "bin", tmp_path / "venv" / "bin"
    if not bin_dir.is_dir():
        bin_dir.mkdir()
        venv_bin.mkdir(parents=True)
        (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done; exec "$@"\n')
        (bin_dir / "scontrol").write_text(
            '#!/usr/bin/env bash\nif [[ $1 == show ]]; then echo 127.0.0.1; exit; fi\n'
            f'echo "$*" >> {tmp_path / "scontrol.log"}\n')
        (bin_dir / "scancel").write_text(
            f'#!/usr/bin/env bash\necho "$*" >> {tmp_path / "scancel.log"}\n'
            'sig=${1#--signal=}\n'
            'for p in $(pgrep -P "$PPID"); do [[ $p != $$ ]] && kill -s "$sig" "$p"; done\nexit 0\n')
        for p in bin_dir.iterdir():
            p.chmod(0o755)
        (venv_bin / "torchrun").symlink_to(TORCHRUN)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PET_", "TORCHELASTIC_"))}
    return {**env, "PATH": f"{bin_dir}:{os.environ['PATH']}", "VENV": str(tmp_path / "venv"),
            "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node07",
            "SLURM_JOB_NUM_NODES": "1", "GPUS_PER_NODE": "2", "RDZV_PORT": str(_free_port()),
            "SLURM_RESTART_COUNT": str(restart)}


@pytest.mark.slow
def test_usr1_at_the_batch_shell_checkpoints_and_requeues_once(tmp_path):
    import signal
    import time

    from tests.test_train_signals import alive_with, wait_until_gone
    from tests.train_fixtures import DEMO_CONFIG, make_teacher, tiny_overrides

    teacher = make_teacher(tmp_path / "teacher.pt")
    run_dir = tmp_path / "run"
    # enough steps that the run is still going when the signal comes (6 steps per epoch)
    args = tiny_overrides(tmp_path, teacher, **{"data.batch_size": 4, "schedule.max_steps": 60,
                                                "logging.every_steps": 1, "checkpoint.every_steps": 1000})
    job = subprocess.Popen(["bash", str(SLURM / "train_multinode.sbatch"), str(DEMO_CONFIG), *args],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=real_job_env(tmp_path),
                           cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + 200
        while not ((run_dir / "log.jsonl").is_file() and (run_dir / "log.jsonl").read_text()):
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()
            time.sleep(0.1)
        job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 does 120 s before the time limit
        out, err = job.communicate(timeout=200)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 1, err[-3000:]  # torchrun's status after forwarding a signal
    assert "batch shell got SIGUSR1" in err and "stopped by SIGTERM at step" in err, err[-3000:]
    assert (tmp_path / "scancel.log").read_text() == "--signal=TERM 4242\n"
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # exactly once, with the job id
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert len(ckpts) == 1 and ckpts[0] < "step_00000060.pt", ckpts
    stopped_at = int(ckpts[0][5:13])
    assert not wait_until_gone(str(tmp_path), timeout=10), alive_with(str(tmp_path))
    # the requeued job: same command line, SLURM_RESTART_COUNT=1, continues from that checkpoint
    args = [a for a in args if not a.startswith("resume=")]
    r = subprocess.run(["bash", str(SLURM / "train_multinode.sbatch"), str(DEMO_CONFIG), *args],
                       capture_output=True, text=True, env=real_job_env(tmp_path, restart=1), cwd=REPO, timeout=280)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "continuing with resume=auto" in r.stderr and f"at step {stopped_at} (saved by 2" in r.stderr
    assert (run_dir / "checkpoints" / "step_00000060.pt").is_file()
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # a finished job does not requeue
