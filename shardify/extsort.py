"""Sorting more fixed-size records than fit in memory, by a uniformly distributed 64-bit hash.

The records are appended to a flat file while a split is listed. To sort them, the file is cut
into parts by the top bits of the hash (each part gets about `max_rows` records), and each part
is sorted on its own in memory: the parts, in order of their top bits, are the sorted whole. One
sequential pass to cut, one to sort; memory stays at `max_rows` records whatever the count
(hashes of distinct keys are uniform; only millions of copies of one key could fill one part).
Records with equal hashes keep the order they were appended in (the sort is stable).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

BLOCK_ROWS = 1 << 20  # records read, cut or sorted at once: ~24 MB of (hash, hash, row) records


class RecordFile:
    """An append-only file of numpy records of one dtype."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype = Path(path), np.dtype(dtype)
        self._f = open(self.path, "wb")
        self.count = 0

    def append(self, records: np.ndarray) -> None:
        records.astype(self.dtype, copy=False).tofile(self._f)
        self.count += len(records)

    def close(self) -> None:
        self._f.close()


def read_blocks(path: Path, dtype: np.dtype, block_rows: int | None = None, offset: int = 0) -> Iterator[np.ndarray]:
    """The records of a flat file (from byte `offset`), `block_rows` (default BLOCK_ROWS) at a time."""
    block_rows = block_rows or BLOCK_ROWS
    with open(path, "rb") as f:
        f.seek(offset)
        while True:
            block = np.fromfile(f, dtype=dtype, count=block_rows)
            if not len(block):
                return
            yield block


def sorted_parts(path: Path, dtype: np.dtype, field: str, max_rows: int | None = None) -> Iterator[np.ndarray]:
    """The records of `path` sorted by the uint64 `field`, as consecutive sorted parts of about
    `max_rows` (default BLOCK_ROWS) records each.

    The part files are written next to `path` and each is deleted once it has been read.
    """
    path, dtype = Path(path), np.dtype(dtype)
    max_rows = max_rows or BLOCK_ROWS
    n = path.stat().st_size // dtype.itemsize
    bits = 0
    while n > max_rows << bits:
        bits += 1
    if bits == 0:
        records = np.fromfile(path, dtype=dtype)
        yield records[np.argsort(records[field], kind="stable")]
        return
    parts = [path.with_name(f"{path.name}.part{p:05d}") for p in range(1 << bits)]
    shift = np.uint64(64 - bits)
    for block in read_blocks(path, dtype, max_rows):
        top = block[field] >> shift
        order = np.argsort(top, kind="stable")
        block, top = block[order], top[order]
        cuts = np.searchsorted(top, np.arange((1 << bits) + 1, dtype=np.uint64))
        for p in np.flatnonzero(np.diff(cuts)):  # only the parts this block has records for
            with open(parts[p], "ab") as f:
                block[cuts[p]:cuts[p + 1]].tofile(f)
    for part in parts:
        if not part.exists():
            continue
        records = np.fromfile(part, dtype=dtype)
        part.unlink()
        yield records[np.argsort(records[field], kind="stable")]


def sorted_npy_blocks(path: Path, block_rows: int | None = None) -> Iterator[np.ndarray]:
    """The values of a 1-D .npy file, `block_rows` at a time, without loading or mapping it all."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        offset = f.tell()
    if len(shape) != 1:
        raise ValueError(f"{path}: expected a 1-D array, found shape {shape}")
    yield from read_blocks(path, dtype, block_rows, offset)


def first_common(a_blocks: Iterator[np.ndarray], b_blocks: Iterator[np.ndarray]) -> int | None:
    """A value found in both sorted streams of blocks, or None (a merge walk: every pair of
    blocks whose ranges overlap is compared once, with one block of each in memory)."""
    a, b = next(a_blocks, None), next(b_blocks, None)
    while a is not None and b is not None:
        if not len(a):
            a = next(a_blocks, None)
            continue
        if not len(b):
            b = next(b_blocks, None)
            continue
        common = np.intersect1d(a, b, assume_unique=False)
        if len(common):
            return int(common[0])
        if a[-1] <= b[-1]:
            a = next(a_blocks, None)
        else:
            b = next(b_blocks, None)
    return None
