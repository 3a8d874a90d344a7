"""Reproducible ustar shard writing with the checksum, size and DALI index computed on the way.

Every header carries the same mtime, owner and mode, members of a sample are adjacent and in
a fixed order, so identical samples give byte-identical tars on any machine.

Speed matters here (sharding ImageNet is I/O plus hashing): headers are filled into a
precomputed template instead of going through tarfile.TarInfo (20x faster, same bytes), each
sample goes to the kernel in one writev call, and sha256 can run in a helper thread on the same
buffers (hashlib releases the GIL), overlapping with reading and writing when a core is spare. The file is never
read back.
"""

from __future__ import annotations

import hashlib
import os
import queue
import tarfile
import threading

from shardify.format import idx_line, idx_text

BLOCK = 512
RECORD = 20 * BLOCK  # tar pads the archive to whole records, like GNU tar and Python's tarfile
_ZEROS = bytes(RECORD)


def _template() -> bytearray:
    """A ustar header for an empty file named '' with our fixed metadata, checksum blank."""
    info = tarfile.TarInfo("")
    info.mtime, info.mode, info.uid, info.gid = 0, 0o644, 0, 0
    info.uname = info.gname = ""
    header = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    header[148:156] = b" " * 8  # checksum field counts as spaces while summing
    return header


_TEMPLATE = _template()
_TEMPLATE_SUM = sum(_TEMPLATE)


def member_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of a regular file `name` of `size` bytes."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ValueError(f"member name longer than 100 bytes: {name!r} (keys are at most 90 characters)")
    if size >= 8**11:
        raise ValueError(f"member {name!r} is {size} bytes, above the ustar limit of 8 GiB")
    header = bytearray(_TEMPLATE)
    header[0 : len(raw)] = raw
    size_field = b"%011o\0" % size
    header[124:136] = size_field
    # The template's name and size fields are NULs and '0's: adjust the sum by what changed.
    checksum = _TEMPLATE_SUM + sum(raw) + sum(size_field) - sum(_TEMPLATE[124:136])
    header[148:156] = b"%06o\0 " % checksum
    return bytes(header)


class _Hasher:
    """sha256 of the buffers in write order, in a background thread when `threaded`."""

    def __init__(self, threaded: bool):
        self._sha = hashlib.sha256()
        self._thread = None
        if threaded:
            self._queue: queue.SimpleQueue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while (buffers := self._queue.get()) is not None:
            for buf in buffers:
                self._sha.update(buf)

    def feed(self, buffers) -> None:
        if self._thread is None:
            for buf in buffers:
                self._sha.update(buf)
        else:
            self._queue.put(buffers)

    def hexdigest(self) -> str:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        return self._sha.hexdigest()


class ShardTarWriter:
    """Writes samples to one tar file; close() finishes it and returns its stats."""

    def __init__(self, path, field_order: tuple[str, ...] = (), hash_thread: bool = True):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._hasher = _Hasher(hash_thread)
        self._order = {ext: i for i, ext in enumerate(field_order)}
        self.offset = 0
        self.samples = 0
        self.index_lines: list[str] = []  # DALI-style .idx lines, one per sample
        self.keys: list[str] = []  # keys written, in order

    def _put(self, buffers: list) -> None:
        total = sum(len(b) for b in buffers)
        written = os.writev(self._fd, buffers)
        if written != total:  # rare partial write: finish with plain writes
            rest = b"".join(buffers)[written:]
            while rest:
                rest = rest[os.write(self._fd, rest):]
        self._hasher.feed(buffers)
        self.offset += total

    def write_sample(self, key: str, fields: dict[str, bytes]) -> None:
        buffers = []
        parts = []
        offset = self.offset
        # Known extensions first in the declared order, any others after them alphabetically.
        for ext in sorted(fields, key=lambda e: (self._order.get(e, len(self._order)), e)):
            data = fields[ext]
            name = f"{key}.{ext}"
            buffers.append(member_header(name, len(data)))
            offset += BLOCK
            parts.append((ext, offset, len(data), name))
            buffers.append(data)
            pad = -len(data) % BLOCK
            if pad:
                buffers.append(_ZEROS[:pad])
            offset += len(data) + pad
        self._put(buffers)
        self.index_lines.append(idx_line(parts))
        self.keys.append(key)
        self.samples += 1

    def close(self) -> dict:
        """Finish the archive; return its stats (bytes, sha256, samples, first/last key)."""
        end = 2 * BLOCK
        end += -(self.offset + end) % RECORD
        self._put([_ZEROS[:end]] if end <= RECORD else [bytes(end)])
        os.close(self._fd)
        return {
            "samples": self.samples,
            "bytes": self.offset,
            "sha256": self._hasher.hexdigest(),
            "first_key": self.keys[0] if self.keys else None,
            "last_key": self.keys[-1] if self.keys else None,
        }

    def abort(self) -> None:
        os.close(self._fd)
        self._hasher.hexdigest()  # stop the thread

    def index_text(self) -> str:
        return idx_text(self.index_lines)
