"""Graceful stops with real signals: SIGTERM/SIGUSR1/SIGINT stop the run at the next step
boundary with one checkpoint and exit status 75, a resume continues bit-identically, a second
signal ends the process at once, and torchrun ranks never outlive torchrun.

The signals are real (os.kill), sent from the loader hook of tests/train_fixtures.py at a known
batch, to the process itself or to its parent (torchrun)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_train_loop import assert_same_params, final_params, run, trainer_subprocess
from tests.train_fixtures import DEMO_CONFIG, REPO, build_real_loader, make_teacher, tiny_overrides
from trainer.config import load_config
from trainer.loop import Trainer
from trainer.signals import STOPPED_EXIT_CODE


@pytest.fixture
def teacher(tmp_path):
    return make_teacher(tmp_path / "teacher.pt")


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def alive_with(marker: str) -> list[str]:
    """Command lines of live processes that mention `marker` (zombies do not count)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmd and state != "Z":
            found.append(f"{d.name}: {cmd}")
    return found


def wait_until_gone(marker: str, timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := alive_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1", "SIGINT"])
def test_signal_in_process_stops_at_the_step_with_one_checkpoint_and_resumes_exactly(tmp_path, teacher, sig,
                                                                                   monkeypatch):
    monkeypatch.setenv("FAKE_LOADER_SIGNAL_AT", f"2:{sig}")  # asked while fetching batch 2: step 3 is finished
    args = tiny_overrides(tmp_path / "stopped", teacher)
    before = signal.getsignal(signal.SIGTERM)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as run() does: the same summation order as the reference
    try:
        t = Trainer(load_config(DEMO_CONFIG, args), loader_factory=build_real_loader)
        try:
            t.train()
        finally:
            t.close()
    finally:
        torch.set_num_threads(threads)
    assert t.stopped == sig and t.step == 3
    assert checkpoints(tmp_path / "stopped" / "run") == ["step_00000003.pt"]  # one checkpoint, no temporaries
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers were put back
    monkeypatch.delenv("FAKE_LOADER_SIGNAL_AT")
    if sig != "SIGTERM":
        return  # the same stop: one resume comparison is enough
    run(tmp_path / "ref", teacher)  # uninterrupted
    t = run(tmp_path / "stopped", teacher, resume="auto")
    assert t.step == 8 and t.stopped is None
    assert_same_params(final_params(tmp_path / "ref" / "run"), final_params(tmp_path / "stopped" / "run"), atol=1e-6)


@pytest.mark.slow
def test_sigterm_single_process_exits_75(tmp_path, teacher):
    args = tiny_overrides(tmp_path, teacher)
    r = trainer_subprocess(args, {"FAKE_LOADER_SIGNAL_AT": "2:SIGTERM"})
    assert r.returncode == STOPPED_EXIT_CODE, r.stderr
    assert "received SIGTERM: stopping at the next step boundary" in r.stderr
    assert "stopped by SIGTERM at step 3 of 8" in r.stderr and "Traceback" not in r.stderr
    assert checkpoints(tmp_path / "run") == ["step_00000003.pt"]


@pytest.mark.slow
def test_sigterm_to_every_process_with_loader_workers(tmp_path, teacher):
    """SLURM signals every process of a job step: the DataLoader workers (forked, with the
    handler) keep serving until the loop stops; no 'worker exited unexpectedly'."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "FAKE_LOADER_SIGNAL_AT": "2:SIGTERM:group"}
    cmd = [sys.executable, "-m", "tests.train_fixtures", str(DEMO_CONFIG),
           *tiny_overrides(tmp_path, teacher, **{"data.num_workers": 2})]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=240, start_new_session=True)
    assert r.returncode == STOPPED_EXIT_CODE, r.stderr[-3000:]
    assert r.stderr.count("received SIGTERM") == 1 and "Traceback" not in r.stderr
    assert checkpoints(tmp_path / "run") == ["step_00000003.pt"]


_SECOND_SIGNAL = """
import os, signal, sys, time
from trainer.signals import GracefulStop, REPEAT_WINDOW_S
stop = GracefulStop().install()
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGTERM)  # the same event twice (SLURM and torchrun): still one request
deadline = time.monotonic() + 20
while stop.requested is None and time.monotonic() < deadline:
    time.sleep(0.01)
print("first:", stop.requested, flush=True)
time.sleep(REPEAT_WINDOW_S + 0.2)
os.kill(os.getpid(), signal.SIGINT)  # later: a second request, which ends the process at once
time.sleep(5)
print("still alive", flush=True)
"""


def test_a_second_signal_exits_at_once_and_a_repeat_does_not():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", _SECOND_SIGNAL], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 128 + signal.SIGINT, (r.stdout, r.stderr)
    assert r.stdout == "first: SIGTERM\n"
    assert "received SIGINT again: exiting now, without a checkpoint" in r.stderr


_STUCK_IN_C = """
import ctypes, os, signal, subprocess
from trainer.signals import GracefulStop
stop = GracefulStop().install()
# the main thread stuck in a C call that never returns to Python (a collective waiting for a dead
# peer): it does not even take the signal, which goes to another thread
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
pid = os.getpid()
subprocess.Popen(["bash", "-c", f"sleep 0.5; kill -TERM {pid}; sleep 3; kill -TERM {pid}"])
ctypes.CDLL(None).sleep(60)
print("main thread came back", flush=True)
"""


def test_a_second_signal_ends_a_process_whose_main_thread_is_stuck_in_c():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", _STUCK_IN_C], capture_output=True, text=True, env=env, timeout=120)
    # ended by the second signal: had it waited for the main thread, the C call would return
    # after 60 s, print, and exit with 0
    assert r.returncode == 128 + signal.SIGTERM, (r.stdout, r.stderr)
    assert r.stdout == "" and "received SIGTERM: stopping" in r.stderr and "received SIGTERM again" in r.stderr


# -- torchrun: 2 gloo ranks on CPU ------------------------------------------------------------------

def _torchrun(args: list[str], env_extra: dict) -> subprocess.CompletedProcess:
    from tests.test_train_ddp import TORCHRUN

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env_extra}
    env.pop("PET_SIGNALS_TO_HANDLE", None)  # torchrun's defaults: SIGUSR1 is not forwarded
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "tests.train_fixtures", str(DEMO_CONFIG), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=280)


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_both_ranks_at_one_step_and_resumes_bit_identically(tmp_path, teacher):
    ref = _torchrun(tiny_overrides(tmp_path / "ref", teacher, **{"data.batch_size": 4}), {})
    assert ref.returncode == 0, ref.stderr[-3000:]
    args = tiny_overrides(tmp_path / "stopped", teacher, **{"data.batch_size": 4})
    # mid-epoch (6 steps per epoch): torchrun gets SIGTERM while rank 0 fetches its batch 2
    r = _torchrun(args, {"FAKE_LOADER_SIGNAL_AT": "2:SIGTERM:parent"})
    # torchrun ends with its own status 1 after forwarding a signal; the ranks end with 75
    assert r.returncode == 1 and "got signal: 15" in r.stderr, r.stderr[-3000:]
    assert f"stopped by SIGTERM at step 3 of 8 with a checkpoint in {tmp_path / 'stopped' / 'run'}" in r.stderr
    assert f"exit status {STOPPED_EXIT_CODE}" in r.stderr
    assert checkpoints(tmp_path / "stopped" / "run") == ["step_00000003.pt"]
    assert not wait_until_gone(str(tmp_path / "stopped"), timeout=5)
    r = _torchrun(args + ["resume=auto"], {})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 3 (saved by 2 process(es), now 2)" in r.stderr
    assert_same_params(final_params(tmp_path / "ref" / "run"), final_params(tmp_path / "stopped" / "run"), atol=1e-6)


@pytest.mark.slow
def test_sigusr1_to_torchrun_alone_leaves_no_orphan_rank(tmp_path, teacher):
    """torchrun does not forward SIGUSR1 by default and dies of it; the ranks get SIGTERM from
    the kernel (they asked for it when their parent dies), stop with a checkpoint and exit."""
    args = tiny_overrides(tmp_path, teacher, **{"data.batch_size": 4})
    r = _torchrun(args, {"FAKE_LOADER_SIGNAL_AT": "2:SIGUSR1:parent"})
    assert r.returncode == -signal.SIGUSR1, r.stderr[-3000:]
    assert not wait_until_gone(str(tmp_path), timeout=60), "a rank outlived torchrun"
    assert "stopped by SIGTERM at step 3 of 8" in r.stderr, r.stderr[-3000:]
    assert checkpoints(tmp_path / "run") == ["step_00000003.pt"]
