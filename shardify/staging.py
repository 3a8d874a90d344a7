"""Staging for layouts that cannot be read at random: stream each unit once, keep the payloads.

A unit (a .tar.gz archive, a parquet file, a remote tar) is streamed from start to end; every
payload is appended to `<stage>/<unit>.bin` and its entry (key, origin, offset, size, meta) to
a list saved as `<unit>.json` once the unit is complete. A rerun finds the list and skips the
unit, so an interrupted listing resumes unit by unit. Shard writers then read payloads from the
local .bin at random, like any other file. Units are staged in parallel processes.
"""

from __future__ import annotations

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


def _stage_one(args) -> list:
    streamer, unit, stage_dir, show_progress = args
    stage_dir = Path(stage_dir)
    safe = unit.replace("/", "__")
    bin_path, list_path = stage_dir / f"{safe}.bin", stage_dir / f"{safe}.json"
    if bin_path.exists() and list_path.exists():
        return state.read_json(list_path)
    stage_dir.mkdir(parents=True, exist_ok=True)
    tmp = state.tmp_path(bin_path)
    entries = []
    offset = 0
    start = last = time.monotonic()
    with open(tmp, "wb") as out:
        for key, origin, payload, meta in _guarded(streamer, unit):
            out.write(payload)
            entries.append([key, origin, offset, len(payload), meta])
            offset += len(payload)
            now = time.monotonic()
            if show_progress and now - last > _REPORT_EVERY_S:  # a hub archive takes minutes
                last = now
                print(f"  staging {unit}: {len(entries)} inputs, {offset / 1e9:.2f} GB, "
                      f"{offset / 1e6 / (now - start):.0f} MB/s", file=sys.stderr, flush=True)
    os.replace(tmp, bin_path)
    state.write_json_atomic(list_path, entries, indent=None)
    return entries


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
                progress: Callable[[str, int], None], show_progress: bool = True) -> list[Item]:
    """Stage every unit (in parallel) and return the items in unit order, then stream order."""
    jobs = [(streamer, unit, str(stage_dir), show_progress) for unit in units]
    items: list[Item] = []

    def collect(unit: str, entries: list) -> None:
        bin_path = str(Path(stage_dir) / (unit.replace("/", "__") + ".bin"))
        for key, origin, offset, size, meta in entries:
            items.append(Item(key=key, origin=origin, loc=(bin_path, offset, size), meta=meta))
        progress(f"staged {unit}", len(items))

    if workers > 1 and len(units) > 1:
        staged = run_in_workers(_stage_one, jobs, min(workers, len(units)), what="staging inputs")
        for unit, entries in zip(units, staged):
            collect(unit, entries)
    else:
        for job in jobs:
            collect(job[1], _stage_one(job))
    return items


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
