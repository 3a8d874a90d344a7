"""Which task stages which unit: claims on the shared output file system, so each unit is
downloaded once however many tasks (SLURM array tasks, `--num-nodes`) shard the split.

Every task of a job lists the whole split, but a unit (a .tar.gz archive, a parquet file, a
remote tar) is streamed by one task only. Before streaming unit U, a task creates
`<stage>/<U>.claim-0` with O_CREAT|O_EXCL, which exactly one task can do, even on NFS.
The claim names its task (`node-R-of-K`), host and pid. While the unit streams, a thread in
the claiming process touches the claim every HEARTBEAT_S seconds. Once the unit's list is
renamed into place (staging.py), the claims are deleted: the list alone means "staged".

A claim can be taken over by creating the next generation, `<U>.claim-<g+1>`. Again exactly
one task can do that, and the holder of generation g notices and gives up the unit. A task
takes over:
- its own claims of an earlier run (the same rank and node count): that run is dead, because
  outlock.py allows one run per rank. A requeued or rerun task resumes at once;
- a claim of another task whose heartbeat has not changed for LEASE_S seconds, as the waiting
  task sees it. It compares what it observes over time on its own clock, so clock skew between
  nodes does not matter. That task died (or its node did) and may never be rerun.

Task r first stages its own units (every K-th, starting at r), then the other tasks' units it
finds unclaimed, from the back of each task's list. So a task whose peers never start (an
array throttled with `%N`, a node that is down) still stages the whole split itself.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from shardify import state

HEARTBEAT_S = 10.0  # how often a claim's holder touches it
LEASE_S = 120.0  # a claim unchanged this long, seen from another task, is abandoned
_CLAIM = ".claim-"


def task_name(node_rank: int, num_nodes: int) -> str:
    return f"node-{node_rank}-of-{num_nodes}"


def work_order(units: list[str], node_rank: int, num_nodes: int) -> list[str]:
    """The order in which task `node_rank` tries the units: its own first, then the others' from
    the back of their lists (their owners work from the front, so the two meet late)."""
    own = units[node_rank::num_nodes]
    others = [u for i, u in enumerate(units) if i % num_nodes != node_rank]
    return own + others[::-1]


@dataclass(frozen=True)
class Claim:
    path: Path
    unit: str  # the unit's file-name form (staging.safe_name)
    generation: int
    task: str
    host: str
    pid: int


def _claims(stage_dir: Path, safe: str) -> list[Path]:
    return list(Path(stage_dir).glob(f"{glob.escape(safe)}{_CLAIM}*"))


def current(stage_dir: Path, safe: str) -> Claim | None:
    """The newest claim of unit `safe` (the one in force), or None when nobody claimed it."""
    best = None
    for path in _claims(stage_dir, safe):
        suffix = path.name[len(safe) + len(_CLAIM):]
        if suffix.isdigit() and (best is None or int(suffix) > best[0]):
            best = (int(suffix), path)
    if best is None:
        return None
    try:
        who = json.loads(best[1].read_text(encoding="utf-8"))
        return Claim(best[1], safe, best[0], str(who["task"]), str(who["host"]), int(who["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        # being written right now (created empty, then filled), or damaged: nobody's claim but
        # still in force until it goes stale
        return Claim(best[1], safe, best[0], "", "", -1)


def claim(stage_dir: Path, safe: str, task: str, over: Claim | None) -> Claim | None:
    """Claim unit `safe` for `task` (over `over`, taking it over); None when another task got
    there first."""
    generation = 0 if over is None else over.generation + 1
    path = Path(stage_dir) / f"{safe}{_CLAIM}{generation}"
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    me = Claim(path, safe, generation, task, socket.gethostname(), os.getpid())
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"task": task, "host": me.host, "pid": me.pid,
                   "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}, f)
    if over is not None:  # the previous holder's half-written files (its names: state.tmp_path)
        for path in Path(stage_dir).glob(f".{glob.escape(safe)}.*{state.TMP_MARK}{over.host}-{over.pid}"):
            with contextlib.suppress(OSError):
                path.unlink()
    return me


def release(stage_dir: Path, safe: str) -> None:
    """Delete every claim of a unit that is staged (its list is in place)."""
    for path in _claims(stage_dir, safe):
        with contextlib.suppress(OSError):
            path.unlink()


class Heartbeat:
    """While a unit streams: touch its claim every HEARTBEAT_S seconds (a thread, so a stream
    stalled in a network read still shows that its process is alive) and notice when another
    task took the unit over (`superseded`)."""

    def __init__(self, held: Claim):
        self.held = held
        self.superseded = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shardify-claim-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        newer = self.held.path.with_name(f"{self.held.unit}{_CLAIM}{self.held.generation + 1}")
        while not self._stop.wait(HEARTBEAT_S):
            if newer.exists():
                self.superseded.set()
                return
            with contextlib.suppress(OSError):
                os.utime(self.held.path)


class StaleWatch:
    """What a waiting task has seen of the claims it waits for: a claim whose generation and
    modification time stay the same for LEASE_S seconds (on this task's clock) is abandoned."""

    def __init__(self):
        self._seen: dict[str, tuple[tuple, float]] = {}

    def abandoned(self, safe: str, held: Claim) -> bool:
        try:
            mtime = held.path.stat().st_mtime_ns
        except OSError:
            return False  # gone: released or taken over meanwhile; look again next round
        signature = (held.generation, mtime)
        now = time.monotonic()
        before = self._seen.get(safe)
        if before is None or before[0] != signature:
            self._seen[safe] = (signature, now)
            return False
        return now - before[1] >= LEASE_S
