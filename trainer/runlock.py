"""One run per out_dir, and the clean-up only its holder may do.

The lock: an exclusive `flock` on `<out_dir>/run.lock`, held by rank 0 for the
run's whole life, with the holder's host, pid, SLURM job id and start time written in it.

Why flock: the kernel drops it when the holder dies, however it dies (SIGKILL, node reboot of a
local disk), so a lock left by a dead run is simply taken over; nothing has to guess whether a
pid is still alive. On network file systems flock works where the file system supports it (NFSv4
and Lustre with the flock mount option do; a file system without it refuses the lock and the run
says so).

A refused run changes nothing on disk: if acquiring created out_dir (or its parents) and the run
then stops before it starts, `release(remove_created=True)` removes what it created.

The clean-up: a run killed while writing a checkpoint or rewriting log.jsonl leaves
`<name>.tmp<PID>` behind (checkpoints: the size of the model and optimiser). The next holder of
the lock removes those of dead writers (`remove_stale_tmp`): only names our writers use, only
when that process no longer exists.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import socket
import time
from pathlib import Path

from trainer.errors import UserError

LOCK_NAME = "run.lock"


def holder_line() -> str:
    job = os.environ.get("SLURM_JOB_ID")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return f"host {socket.gethostname()}, pid {os.getpid()}" + (f", job {job}" if job else "") + f", since {stamp}"


class RunLock:
    """`acquire()` takes the lock or raises UserError naming the holder; `release()` drops it."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self._fd: int | None = None
        self._created: list[Path] = []  # directories this lock created, outermost first

    def acquire(self) -> RunLock:
        self._make_dirs()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read(fd)
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise UserError(f"out_dir {self.out_dir} is in use by another run ({holder or 'holder unknown'}): "
                                    f"wait for it to end, stop it, or choose another out_dir") from None
                raise UserError(f"cannot lock {self.path}: {e.strerror} (the file system may not support "
                                f"flock)") from None
            # the previous holder unlinks the file when it ends: if it did so between our open
            # and our flock, we hold a lock on a removed file; open the path again
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, (holder_line() + "\n").encode())
        self._fd = fd
        return self

    def _make_dirs(self) -> None:
        missing = []
        for d in (self.out_dir, *self.out_dir.parents):
            if d.exists():
                break
            missing.append(d)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create out_dir {self.out_dir}: {e.strerror or e}") from None
        self._created = list(reversed(missing))

    def __del__(self):  # a Trainer dropped without close(): do not hold the directory forever
        self.release()

    def release(self, remove_created: bool = False) -> None:
        """Drop the lock (the file goes too). With remove_created, also remove the directories
        acquire() created, if they are still empty: a refused run leaves out_dir as it was."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still holding it: nobody can lock this inode in between
        os.close(self._fd)
        self._fd = None
        if remove_created:
            for d in reversed(self._created):
                with contextlib.suppress(OSError):
                    d.rmdir()  # only if empty
        self._created = []


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        return ""


# what our own writers leave behind when killed mid-write: trainer/checkpoint.py and
# trainer/logs.py write `<name>.tmp<PID>` and rename it over `<name>`
_TMP = re.compile(r"^(step_\d{8}\.pt|best\.pt|log\.jsonl)\.tmp(\d+)$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def remove_stale_tmp(*directories: Path) -> list[tuple[Path, int]]:
    """Remove the temporary files of our writers whose process is gone; returns (path, bytes).
    Call it holding the run lock: then no other run writes here, and a live pid keeps its file
    only because it might be ours after all."""
    removed = []
    for d in dict.fromkeys(directories):  # checkpoint.dir may be out_dir itself
        if not d.is_dir():
            continue
        for p in d.iterdir():
            m = _TMP.match(p.name)
            if m is None or _pid_alive(int(m.group(2))) or not p.is_file():
                continue
            size = p.stat().st_size
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append((p, size))
    return removed
