"""One run per node of an output directory: an exclusive lock held for the run's life.

Two runs writing one `--out` at once corrupt each other: the second deletes the first's
temporary files (they look like an interrupted run's leftovers) and the first dies with a
misleading "No such file". So a run takes an flock(2) on `<out>/.shardify/locks/node-<R>.lock`
(R: its --node-rank) before it touches the directory, and a second run for the same node is
refused with one line naming the holder (host, pid, SLURM job, start time: written into the
lock file). The kernel drops a lock when its process ends, however it ends, so the lock of a
dead run is simply taken over. Nodes of one multi-node job lock their own ranks and write side
by side; a run is also refused while a run with another --num-nodes holds any rank (a
single-node run cleans every node's temporaries). Each run writes its record before it reads
the others', and waits up to 5 s for a peer that has locked its file but not yet written its
record (the tasks of an array start at the same instant). `shardify finalize` takes no lock.

On a file system without flock (some Lustre and NFS mounts) the holder written in the file is
checked instead: refused while that process is alive on this host, taken over otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from shardify import state
from shardify.format import ShardifyError

_HELD = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)  # what flock answers when another holds it


@contextlib.contextmanager
def out_lock(out_dir: Path, node_rank: int, num_nodes: int, log=None):
    """Hold node `node_rank`'s lock on `out_dir` inside the block; ShardifyError if another run does.

    Directories this creates for the lock are removed again on the way out when empty, so a
    run refused before it wrote anything leaves the disk as it was."""
    path = state.lock_path(out_dir, node_rank)
    created = []  # the folders this makes on the way to the lock file, deepest first
    folder = path.parent
    while not folder.exists():
        created.append(folder)
        folder = folder.parent
    me = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": _slurm_job(),
          "node_rank": node_rank, "num_nodes": num_nodes,
          "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    fd = None
    try:
        fd = _acquire(path, me, log)
        # recorded before the others are judged: tasks of one array start together, and each
        # reads the others' records
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(me) + "\n").encode())
        _refuse_other_node_counts(path.parent, path, num_nodes)
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)  # while still held: nobody can have locked this file meanwhile
            os.close(fd)
        for d in created:
            with contextlib.suppress(OSError):  # not empty: another node, or this run's output
                d.rmdir()


def _acquire(path: Path, me: dict, log) -> int:
    """Open and lock the lock file; retried when another run removed it in between."""
    for _ in range(20):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # the folder was removed by a run that just ended
            continue
        try:
            _flock(fd, path, me, log)
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder unlinked this file on its way out: lock the new one
    raise ShardifyError(f"cannot take the lock {path}: it keeps changing; is another run starting and ending?")


def _flock(fd: int, path: Path, me: dict, log) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except OSError as exc:
        if exc.errno in _HELD:
            raise ShardifyError(_busy(path)) from None
        no_flock = exc
    holder = _holder(path)  # no flock on this file system: judge by the holder it names
    if holder and holder.get("host") == me["host"] and _pid_alive(holder.get("pid")):
        raise ShardifyError(_busy(path)) from None
    if log is not None:
        log(f"warning: {path.parent.parent.parent} is on a file system without locks "
            f"({no_flock.strerror}): make sure no other run writes into it")


def _refuse_other_node_counts(lock_dir: Path, mine: Path, num_nodes: int) -> None:
    """Runs of one multi-node job write side by side; a run with another --num-nodes would
    delete the others' temporaries (a single-node run deletes every node's)."""
    for other in sorted(lock_dir.glob("node-*.lock")):
        if other == mine or not _is_held(other):
            continue
        holder = _recorded_holder(other) or {}
        if num_nodes == 1 or holder.get("num_nodes") != num_nodes:
            raise ShardifyError(_busy(other))


def _recorded_holder(path: Path, wait_s: float = 5.0) -> dict | None:
    """The holder a held lock names, waiting a moment for a run that has just locked it to
    write its record (a task of the same array starting at the same instant)."""
    deadline = time.monotonic() + wait_s
    while (holder := _holder(path)) is None and time.monotonic() < deadline and _is_held(path):
        time.sleep(0.05)
    return holder


def _is_held(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False  # gone: its run ended
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError as exc:
        return exc.errno in _HELD
    finally:
        os.close(fd)  # also drops the shared lock, if it was taken


def _busy(path: Path) -> str:
    out_dir = path.parent.parent.parent
    holder = _holder(path)
    if holder:
        job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
        who = (f"pid {holder.get('pid')} on {holder.get('host')}{job}, node rank {holder.get('node_rank')} "
               f"of {holder.get('num_nodes')}, since {holder.get('started')}")
    else:
        who = f"holder not yet recorded in {path}"
    return (f"{out_dir} is being written by another shardify run ({who}); wait for it to end, or write "
            "to another --out")


def _holder(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8") or "null")
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _slurm_job() -> str | None:
    env = os.environ
    job = env.get("SLURM_ARRAY_JOB_ID") or env.get("SLURM_JOB_ID")
    if job and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{job}_{env['SLURM_ARRAY_TASK_ID']}"
    return job
