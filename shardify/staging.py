"""Staging for layouts that cannot be read at random: stream each unit once, keep the payloads.

A unit (a .tar.gz archive, a parquet file, a remote tar) is streamed from start to end; every
payload is appended to `<stage>/<unit>.bin` and its entry (key, origin, offset, size, meta) as
a JSON line to `<unit>.jsonl`, renamed into place once the unit is complete (entries go to the
file as they come: memory does not grow with the unit's size). A rerun finds the list and skips the
unit, so an interrupted listing resumes unit by unit. Shard writers then read payloads from the
local .bin at random, like any other file. Units are staged in parallel processes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from shardify import state
from shardify.format import ShardifyError
from shardify.records import Item
from shardify.workers import run_in_workers

# A unit streamer yields (key, origin, payload bytes, meta) in the unit's order.
Streamer = Callable[[str], Iterator[tuple[str, str, bytes, dict]]]


_REPORT_EVERY_S = 10.0


def _stage_one(args) -> None:
    """Stage one unit, unless a previous run did (its list is written last)."""
    streamer, unit, stage_dir, show_progress = args
    stage_dir = Path(stage_dir)
    safe = unit.replace("/", "__")
    bin_path, list_path = stage_dir / f"{safe}.bin", stage_dir / f"{safe}.jsonl"
    if bin_path.exists() and list_path.exists():
        return
    stage_dir.mkdir(parents=True, exist_ok=True)
    tmp, list_tmp = state.tmp_path(bin_path), state.tmp_path(list_path)
    count = offset = 0
    start = last = time.monotonic()
    with open(tmp, "wb") as out, open(list_tmp, "w", encoding="utf-8") as entries:
        for key, origin, payload, meta in _guarded(streamer, unit):
            out.write(payload)
            entries.write(json.dumps([key, origin, offset, len(payload), meta]) + "\n")
            offset += len(payload)
            count += 1
            now = time.monotonic()
            if show_progress and now - last > _REPORT_EVERY_S:  # a hub archive takes minutes
                last = now
                print(f"  staging {unit}: {count} inputs, {offset / 1e9:.2f} GB, "
                      f"{offset / 1e6 / (now - start):.0f} MB/s", file=sys.stderr, flush=True)
    os.replace(tmp, bin_path)
    os.replace(list_tmp, list_path)  # last: its presence means "staged"


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


def stage_units(streamer: Streamer, units: list[str], stage_dir: Path, workers: int,
                progress: Callable[[str, int], None], show_progress: bool = True) -> Iterator[Item]:
    """Stage every unit (in parallel), then yield the items in unit order, then stream order.

    The staging processes return nothing: each unit's list is read back from its file, one unit
    at a time, so the listing never holds more than one unit's entries.
    """
    jobs = [(streamer, unit, str(stage_dir), show_progress) for unit in units]
    if workers > 1 and len(units) > 1:
        run_in_workers(_stage_one, jobs, min(workers, len(units)), what="staging inputs")
    count = 0
    for job in jobs:
        _stage_one(job)  # staged above (a no-op then), or staged now
        unit = job[1]
        safe = unit.replace("/", "__")
        bin_path = str(Path(stage_dir) / f"{safe}.bin")
        list_path = Path(stage_dir) / f"{safe}.jsonl"
        with open(list_path, encoding="utf-8") as entries:
            for line in entries:
                try:
                    key, origin, offset, size, meta = json.loads(line)
                except ValueError as exc:
                    raise ShardifyError(f"{list_path} is damaged ({exc}); shardify writes it atomically, so "
                                    "something else changed it: write to a new --out") from None
                yield Item(key=key, origin=origin, loc=(bin_path, offset, size), meta=meta)
                count += 1
        progress(f"staged {unit}", count)


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
