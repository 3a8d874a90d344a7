"""A split's listed inputs on disk: one JSON record per row, read back by row number.

Planning streams every `Item` a source lists into `rows.jsonl` (`[key, origin, loc, meta]`, one
line each) and its byte offset into `rows.idx` (little-endian uint64, one more entry than rows:
the end of the last one). Nothing about a row stays in memory, so a listing of any length
costs the same memory; a shard writer reads just its rows with two positioned reads each.
JSON, not pickle: state files may sit on a shared file system, and reading them runs no code.
Tuples come back as lists (readers unpack locations, so both work).
"""

from __future__ import annotations

import json
import os
import sys
from array import array
from pathlib import Path

from shardify.records import Item

ROWS = "rows.jsonl"
INDEX = "rows.idx"
_FLUSH_ROWS = 1 << 16  # offsets kept in memory before they are appended to the index
_encode = json.JSONEncoder(separators=(",", ":")).encode  # one encoder for all rows (json.dumps makes one per call)


class RowWriter:
    """Appends items; `close()` returns how many were written. Files go under `directory`."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self._rows = open(self.dir / ROWS, "wb")
        self._index = open(self.dir / INDEX, "wb")
        self._offsets = array("Q", [0])
        self._offset = 0
        self.count = 0

    def add(self, item: Item) -> int:
        """Write one item; return its row number."""
        line = _encode([item.key, item.origin, item.loc, item.meta]).encode() + b"\n"
        self._rows.write(line)
        self._offset += len(line)
        self._offsets.append(self._offset)
        if len(self._offsets) >= _FLUSH_ROWS:
            self._flush()
        self.count += 1
        return self.count - 1

    def _flush(self) -> None:
        if sys.byteorder != "little":
            self._offsets.byteswap()
        self._index.write(self._offsets.tobytes())
        self._offsets = array("Q")

    def close(self) -> int:
        self._flush()
        self._rows.close()
        self._index.close()
        return self.count

    def abort(self) -> None:
        self._rows.close()
        self._index.close()


class RowReader:
    """Reads rows by number. Picklable: files are opened on first use, in the process using it."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self._fds: tuple[int, int] | None = None
        self._pid = None

    def __getstate__(self):
        return {"dir": self.dir}

    def __setstate__(self, state):
        self.__init__(state["dir"])

    def _open(self) -> tuple[int, int]:
        if self._fds is None or self._pid != os.getpid():  # a forked child opens its own
            self._fds = (os.open(self.dir / ROWS, os.O_RDONLY), os.open(self.dir / INDEX, os.O_RDONLY))
            self._pid = os.getpid()
        return self._fds

    def item(self, row: int) -> Item:
        rows_fd, index_fd = self._open()
        bounds = os.pread(index_fd, 16, row * 8)
        if len(bounds) != 16:
            raise IndexError(f"row {row} is not in {self.dir / INDEX}")
        start, end = int.from_bytes(bounds[:8], "little"), int.from_bytes(bounds[8:], "little")
        key, origin, loc, meta = json.loads(os.pread(rows_fd, end - start, start))
        return Item(key=key, origin=origin, loc=loc, meta=meta)

    def key(self, row: int) -> str:
        return self.item(row).key

    def close(self) -> None:
        if self._fds is not None and self._pid == os.getpid():
            for fd in self._fds:
                os.close(fd)
        self._fds = None
