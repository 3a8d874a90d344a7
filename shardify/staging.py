"""Staging for layouts that cannot be read at random: stream each unit once, keep the payloads.

A unit (a .tar.gz archive, a parquet file, a remote tar) is streamed from start to end; every
payload is appended to `<stage>/<unit>.bin` and its entry (key, origin, offset, size, meta) as
a JSON line to `<unit>.jsonl`, renamed into place once the unit is complete (entries go to the
file as they come: memory does not grow with the unit's size). A rerun finds the list and skips the
unit, so an interrupted listing resumes unit by unit. Shard writers then read payloads from the
.bin at random, like any other file. Units are staged in parallel processes.

The stage folder lies in the output directory, which every task of a multi-node job shares:
each unit is streamed by one task only, and the others wait for its list (stage_claims.py).
So the split is downloaded once in total, and every task then lists all of it from the files.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from shardify import stage_claims, state
from shardify.format import ShardifyError
from shardify.records import Item
from shardify.sources.base import ListContext
from shardify.workers import run_in_workers

# A unit streamer yields (key, origin, payload bytes, meta) in the unit's order.
Streamer = Callable[[str], Iterator[tuple[str, str, bytes, dict]]]


_REPORT_EVERY_S = 10.0
_WAIT_REPORT_EVERY_S = 30.0
_POLL_S = (1.0, 10.0)  # waiting for other tasks' units: first and longest pause between looks
STAGED, BUSY = "staged", "busy"


def safe_name(unit: str) -> str:
    return unit.replace("/", "__")


def _paths(stage_dir: Path, unit: str) -> tuple[Path, Path]:
    safe = safe_name(unit)
    return Path(stage_dir) / f"{safe}.bin", Path(stage_dir) / f"{safe}.jsonl"


def _staged(stage_dir: Path, unit: str) -> bool:
    bin_path, list_path = _paths(stage_dir, unit)
    return bin_path.exists() and list_path.exists()


class _Superseded(Exception):
    """Another task took the unit over (this one looked dead to it): leave the unit to it."""


def _stage_one(args) -> str:
    """Stage one unit if this task may (STAGED), or leave it to the task that holds it (BUSY).

    `over` is the claim this task may take over (its own from an earlier run, or one seen
    abandoned), None to claim a unit nobody holds."""
    streamer, unit, stage_dir, show_progress, task, over = args
    stage_dir = Path(stage_dir)
    if _staged(stage_dir, unit):
        return STAGED
    stage_dir.mkdir(parents=True, exist_ok=True)
    held = stage_claims.claim(stage_dir, safe_name(unit), task, over)
    if held is None:
        return BUSY
    if _staged(stage_dir, unit):  # staged, and its claims released, since the look above
        stage_claims.release(stage_dir, safe_name(unit))
        return STAGED
    bin_path, list_path = _paths(stage_dir, unit)
    tmp, list_tmp = state.tmp_path(bin_path), state.tmp_path(list_path)
    count = offset = 0
    start = last = time.monotonic()
    try:
        with stage_claims.Heartbeat(held) as heartbeat, open(tmp, "wb") as out, \
                open(list_tmp, "w", encoding="utf-8") as entries:
            for key, origin, payload, meta in _guarded(streamer, unit):
                out.write(payload)
                entries.write(json.dumps([key, origin, offset, len(payload), meta]) + "\n")
                offset += len(payload)
                count += 1
                now = time.monotonic()
                if heartbeat.superseded.is_set():
                    raise _Superseded()
                if show_progress and now - last > _REPORT_EVERY_S:  # a hub archive takes minutes
                    last = now
                    print(f"  staging {unit}: {count} inputs, {offset / 1e9:.2f} GB, "
                          f"{offset / 1e6 / (now - start):.0f} MB/s", file=sys.stderr, flush=True)
        os.replace(tmp, bin_path)
        os.replace(list_tmp, list_path)  # last: its presence means "staged"
    except (_Superseded, FileNotFoundError) as exc:
        # FileNotFoundError: the task that took the unit over deleted our temporaries
        if isinstance(exc, FileNotFoundError) and stage_claims.current(stage_dir, safe_name(unit)) == held:
            raise
        for path in (tmp, list_tmp):
            path.unlink(missing_ok=True)
        return BUSY
    except BaseException:
        for path in (tmp, list_tmp):
            path.unlink(missing_ok=True)
        raise
    stage_claims.release(stage_dir, safe_name(unit))
    return STAGED


def unit_error(unit: str, exc: BaseException) -> ShardifyError:
    """One line for a unit that cannot be read to its end (truncated or garbage archive or
    parquet file): its inputs cannot be counted, so the job stops instead of losing them."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return ShardifyError(f"{unit}: cannot read it to the end ({type(exc).__name__}{': ' + text if text else ''}); "
                         "the file is damaged or incomplete: fetch it again, or move it out of --source")


def _guarded(streamer, unit: str):
    """The unit's entries; a failure to read the unit itself becomes one line naming it."""
    try:
        yield from streamer(unit)
    except (ShardifyError, KeyboardInterrupt):
        raise
    except Exception as exc:  # tarfile, gzip, zlib, lzma, pyarrow and OS errors: all "damaged file"
        raise unit_error(unit, exc) from None


def stage_units(streamer: Streamer, units: list[str], stage_dir: Path, ctx: ListContext) -> Iterator[Item]:
    """Stage every unit (in parallel; in a multi-node job, this task's share and what its peers
    leave unclaimed), wait for the units other tasks stage, then yield the items in unit order,
    then stream order.

    The staging processes return nothing: each unit's list is read back from its file, one unit
    at a time, so the listing never holds more than one unit's entries.
    """
    _stage_all(streamer, units, Path(stage_dir), ctx)
    count = 0
    for unit in units:
        bin_path, list_path = _paths(stage_dir, unit)
        with open(list_path, encoding="utf-8") as entries:
            for line in entries:
                try:
                    key, origin, offset, size, meta = json.loads(line)
                except ValueError as exc:
                    raise ShardifyError(f"{list_path} is damaged ({exc}); shardify writes it atomically, so "
                                    "something else changed it: write to a new --out") from None
                yield Item(key=key, origin=origin, loc=(str(bin_path), offset, size), meta=meta)
                count += 1
        ctx.progress(f"staged {unit}", count)


def _stage_all(streamer: Streamer, units: list[str], stage_dir: Path, ctx: ListContext) -> None:
    """Return once every unit is staged, by this task or another."""
    task = stage_claims.task_name(ctx.node_rank, ctx.num_nodes)
    order = stage_claims.work_order(units, ctx.node_rank, ctx.num_nodes)
    watch = stage_claims.StaleWatch()
    pause, last_report = _POLL_S[0], time.monotonic()
    while True:
        pending = [u for u in order if not _staged(stage_dir, u)]
        if not pending:
            return
        jobs, held_elsewhere = [], []
        for unit in pending:
            holder = stage_claims.current(stage_dir, safe_name(unit))
            # a single-node run is alone in the directory (outlock.py): every claim is a dead run's
            ours = holder is None or holder.task == task or ctx.num_nodes == 1
            if ours or watch.abandoned(safe_name(unit), holder):
                if not ours:
                    print(f"  {unit}: taking it over from {holder.task or 'a task'} (host {holder.host or '?'}, "
                          f"pid {holder.pid}), whose claim has not changed for {stage_claims.LEASE_S:.0f} s",
                          file=sys.stderr, flush=True)
                jobs.append((streamer, unit, str(stage_dir), ctx.show_progress, task, holder))
            else:
                held_elsewhere.append((unit, holder.task))
        if len(jobs) > 1 and ctx.workers > 1:
            results = run_in_workers(_stage_one, jobs, min(ctx.workers, len(jobs)), what="staging inputs")
        else:
            results = [_stage_one(job) for job in jobs]
        if STAGED in results:
            pause = _POLL_S[0]
            continue  # look again at once: more may be free now
        if ctx.show_progress and held_elsewhere and time.monotonic() - last_report >= _WAIT_REPORT_EVERY_S:
            last_report = time.monotonic()
            tasks = sorted({t or "?" for _, t in held_elsewhere})
            print(f"  waiting for {len(held_elsewhere)} of {len(units)} units that other tasks are staging "
                  f"({', '.join(tasks)}), e.g. {held_elsewhere[0][0]}", file=sys.stderr, flush=True)
        time.sleep(pause)
        pause = min(pause * 2, _POLL_S[1])


class LocalFileReader:
    """Reads (path, offset, size) payloads from local files, keeping a few handles open."""

    def __init__(self, max_open: int = 8):
        self._handles: dict[str, object] = {}
        self._max_open = max_open

    def read_at(self, path: str, offset: int, size: int) -> bytes:
        f = self._handles.get(path)
        if f is None:
            if len(self._handles) >= self._max_open:
                self._handles.pop(next(iter(self._handles))).close()
            f = self._handles[path] = open(path, "rb")
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"{path}: short read at {offset} ({len(data)} of {size} bytes)")
        return data

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()
