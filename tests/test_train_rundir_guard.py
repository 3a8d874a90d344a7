"""What guards a run directory: one run per out_dir (flock on run.lock, holder named, a dead
holder's lock taken over, a refused run leaves no trace), and the removal of temporary files
that killed writers left behind (only our names, only of dead processes)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.test_train_loop import run
from tests.train_fixtures import DEMO_CONFIG, REPO, make_teacher, tiny_overrides
from trainer.config import load_config
from trainer.errors import UserError
from trainer.loop import Trainer
from trainer.runlock import LOCK_NAME, RunLock, remove_stale_tmp


@pytest.fixture
def teacher(tmp_path):
    return make_teacher(tmp_path / "teacher.pt")


_HOLD = """
import sys, time
from trainer.runlock import RunLock
lock = RunLock(sys.argv[1]).acquire()  # kept: dropping it releases the lock
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def hold_lock(out_dir, seconds: float) -> subprocess.Popen:
    """Another process that holds out_dir's lock (as a running training would)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "SLURM_JOB_ID": "777"}
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(out_dir), str(seconds)], stdout=subprocess.PIPE,
                         text=True, env=env)
    assert p.stdout.readline() == "locked\n"
    return p


def test_a_second_run_on_the_same_out_dir_is_refused_naming_the_holder(tmp_path, teacher):
    holder = hold_lock(tmp_path / "run", 60)
    try:
        with pytest.raises(UserError) as e:
            Trainer(load_config(DEMO_CONFIG, tiny_overrides(tmp_path, teacher)))
        msg = str(e.value)
        assert "\n" not in msg and f"out_dir {tmp_path / 'run'} is in use by another run" in msg
        assert f"pid {holder.pid}, job 777" in msg and "host " in msg
        # refused: nothing of the second run was written (only the holder's lock file is there)
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing (SIGKILL): its lock is taken over, the run trains
    t = run(tmp_path, teacher, **{"schedule.max_steps": 2})
    assert t.step == 2
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # released (and removed) at close


def test_the_lock_is_held_for_the_run_and_a_refused_run_leaves_no_directory(tmp_path, teacher):
    t = Trainer(load_config(DEMO_CONFIG, tiny_overrides(tmp_path, teacher, **{"schedule.max_steps": 2})))
    try:
        assert f"pid {os.getpid()}" in (tmp_path / "run" / LOCK_NAME).read_text()
        with pytest.raises(UserError, match="is in use by another run"):
            RunLock(tmp_path / "run").acquire()
    finally:
        t.close()
    RunLock(tmp_path / "run").acquire().release()  # free again after close()
    # a refused run creates no out_dir
    with pytest.raises(UserError, match="data.augment.size"):
        Trainer(load_config(DEMO_CONFIG, tiny_overrides(tmp_path, teacher, out_dir=str(tmp_path / "new" / "run"),
                                                        **{"data.augment.size": 32})))
    assert not (tmp_path / "new").exists()
    # a lock taken for a run that then fails to start removes the directories it created
    lock = RunLock(tmp_path / "new" / "deep" / "run").acquire()
    lock.release(remove_created=True)
    assert not (tmp_path / "new").exists()


def test_stale_temporaries_of_dead_writers_are_removed_at_start(tmp_path, teacher, capsys):
    run(tmp_path, teacher, **{"schedule.max_steps": 4})
    ckpts = tmp_path / "run" / "checkpoints"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that no longer runs
    stale = [ckpts / f"step_00000006.pt.tmp{dead}", ckpts / f"best.pt.tmp{dead}",
             tmp_path / "run" / f"log.jsonl.tmp{dead}"]
    kept = [ckpts / f"step_00000006.pt.tmp{os.getppid()}",  # its writer still runs
            ckpts / f"notes.txt.tmp{dead}", tmp_path / "run" / "mine.tmp1"]  # not our names
    for p in stale + kept:
        p.write_bytes(b"x" * 1000)
    t = run(tmp_path, teacher, **{"schedule.max_steps": 6}, resume="auto")
    assert t.step == 6
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert "removed 3 temporary file(s) left by killed writers" in capsys.readouterr().err
    assert remove_stale_tmp(ckpts, tmp_path / "run") == []


def test_a_refused_lock_never_waits_for_the_holder(tmp_path):
    holder = hold_lock(tmp_path / "run", 30)
    try:
        # a blocking lock would wait for the holder to end and then succeed: no error
        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            RunLock(tmp_path / "run").acquire()
    finally:
        holder.kill()
        holder.wait()
