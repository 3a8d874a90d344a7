"""Reproducible ustar shard writing with the checksum, size and DALI index computed on the way.

Every header carries the same mtime, owner and mode, members of a sample are adjacent and in
a fixed order, so identical samples give byte-identical tars on any machine. The sha256 is
updated from the same buffers that are written: the file is never read back.
"""

from __future__ import annotations

import hashlib
import tarfile

BLOCK = 512
RECORD = 20 * BLOCK  # tar pads the archive to whole records, like GNU tar and Python's tarfile


def member_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


class ShardTarWriter:
    """Writes samples to one tar file; call close() to finish it (or use as a context manager)."""

    def __init__(self, path, field_order: tuple[str, ...] = ()):
        self.path = path
        self._file = open(path, "wb")
        self._sha = hashlib.sha256()
        self._order = {ext: i for i, ext in enumerate(field_order)}
        self.offset = 0
        self.samples = 0
        self.index_lines: list[str] = []  # DALI-style .idx lines, one per sample
        self.keys: list[str] = []  # keys written, in order

    def _put(self, data: bytes) -> None:
        self._file.write(data)
        self._sha.update(data)
        self.offset += len(data)

    def write_sample(self, key: str, fields: dict[str, bytes]) -> None:
        parts = []
        # Known extensions first in the declared order, any others after them alphabetically.
        for ext in sorted(fields, key=lambda e: (self._order.get(e, len(self._order)), e)):
            data = fields[ext]
            name = f"{key}.{ext}"
            self._put(member_header(name, len(data)))
            parts.append(f"{ext} {self.offset} {len(data)} {name}")
            self._put(data)
            pad = -len(data) % BLOCK
            if pad:
                self._put(b"\0" * pad)
        self.index_lines.append(" ".join(parts))
        self.keys.append(key)
        self.samples += 1

    def close(self) -> dict:
        """Finish the archive; return its stats (bytes, sha256, samples, first/last key)."""
        self._put(b"\0" * (2 * BLOCK))
        pad = -self.offset % RECORD
        if pad:
            self._put(b"\0" * pad)
        self._file.close()
        return {
            "samples": self.samples,
            "bytes": self.offset,
            "sha256": self._sha.hexdigest(),
            "first_key": self.keys[0] if self.keys else None,
            "last_key": self.keys[-1] if self.keys else None,
        }

    def abort(self) -> None:
        self._file.close()

    def index_text(self) -> str:
        return f"v1.2 {self.samples}\n" + "".join(line + "\n" for line in self.index_lines)
