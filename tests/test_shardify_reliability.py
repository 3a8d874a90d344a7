"""shardify never loses a sample silently, never hangs, and says in one line what went wrong.

Each test reproduces one way a user lost data, waited forever or got a traceback."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import imagenet_fixtures as fx
from shardify.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, expect=0):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return result


def shard(source, out, *extra, expect=0):
    return run_cli("imagenet", "--source", source, "--out", out, "--samples-per-shard", 5,
                   "--max-reject-rate", 0.5, "--no-progress", *extra, expect=expect)


def tree_bytes(out: Path) -> dict:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _blocking_source(root: Path) -> Path:
    """An ImageFolder copy where one "image" is a FIFO nobody writes to: the worker that reads
    it blocks, so the test can kill it (or press Ctrl-C) while the job is certainly running."""
    src = fx.write_imagefolder(root, per_class=4, specials=False)
    os.mkfifo(src / "train" / fx.SYNSETS[0] / f"{fx.SYNSETS[0]}_77777.JPEG")
    return src


def _start(src: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "shardify", "imagenet", "--source", str(src), "--out", str(out),
           "--samples-per-shard", "2", "--workers", "2", "--no-progress", "--split", "train"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def _wait_for_workers(proc: subprocess.Popen, n: int = 2) -> list[int]:
    deadline = time.time() + 60
    while time.time() < deadline:
        kids = _children(proc.pid)
        if len(kids) >= n:
            time.sleep(1.0)  # let them pick up tasks (one blocks on the FIFO)
            return kids
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the workers never started")


def test_a_killed_worker_ends_the_run_with_one_line(tmp_path):
    proc = _start(_blocking_source(tmp_path / "src"), tmp_path / "out")
    kids = _wait_for_workers(proc)
    for kid in kids:  # the OOM killer picks one; kill them all so the blocked one goes too
        os.kill(kid, signal.SIGKILL)
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the main process hangs after its workers died")
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    assert "error: a worker process died" in err and "rerun the same command" in err


@pytest.mark.slow
def test_ctrl_c_with_several_workers_ends_promptly(tmp_path):
    """With the progress bar on and workers busy, Ctrl-C used to hang about half the time."""
    src = fx.write_imagefolder(tmp_path / "src", per_class=50, specials=False)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for trial in range(3):
        out = tmp_path / f"out{trial}"
        cmd = [sys.executable, "-m", "shardify", "imagenet", "--source", str(src), "--out", str(out),
               "--samples-per-shard", "2", "--workers", "4", "--hash-thread", "on", "--split", "train"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline and len(list(out.glob("train-*.tar"))) < 3 + 8 * trial:
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C: the whole group
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise AssertionError(f"trial {trial}: Ctrl-C did not end the run")
        assert proc.returncode == 130, err
        assert "Traceback" not in err and "interrupted: rerun" in err
        rerun = subprocess.run(cmd + ["--no-progress"], capture_output=True, text=True, env=env)
        assert rerun.returncode == 0, rerun.stderr
