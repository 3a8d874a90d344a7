"""Line-aligned packing of token ids into blocks (`shardify openwebtext --packing lines`).

The thesis's text data (`src/datasets_/masked_lm.py`, `build_sequences` and `__getitem__`)
packs whole cleaned lines, greedily and in order, into blocks of `block_size - 2` ids (254 of
256); each block gets [CLS] in front and [SEP] after its last real id, and the rest is [PAD]:

- a line that still fits (the block's ids plus the line's <= 254) joins the open block;
- a line that does not fit closes the open block and opens the next one;
- a line of 254 ids or more closes the open block and is cut into pieces of 254, each its own
  block (the last piece, however short, too: nothing joins it);
- document boundaries do not matter: lines are read as one stream (the thesis joined all
  documents' cleaned lines into one text file), so a block may end one document and begin the
  next; a line with no ids changes nothing.

Every id of every line is in exactly one block, in order. Unlike `stream` packing (tokenize.py),
most blocks carry padding, and since the teacher's instance norm runs over all positions of a
block, that padding is part of the thesis's targets.

Staged payload of one document (internal to shardify): uint32 [n_lines, len_0 .. len_{n-1},
ids of line 0, ids of line 1, ...].
"""

from __future__ import annotations

import numpy as np

from shardify.tokenization import Packer

PACKINGS = ("lines", "stream")


class LinePacker(Packer):
    """Greedy whole-line packing into [CLS] body [SEP] [PAD]... blocks of `block_size` ids."""

    def add_line(self, ids: np.ndarray) -> list[tuple[np.ndarray, int]]:
        """Add one line's ids; return the blocks it closed, as (block, real body ids)."""
        n = len(ids)
        if n >= self.body:  # a long line: close the open block, then the line in pieces of `body`
            out = self._close()
            out.extend(self._block(ids[i:i + self.body]) for i in range(0, n, self.body))
            return out
        if self._pending + n <= self.body:
            if n:
                self._parts.append(ids)
                self._pending += n
            return []
        out = self._close()
        self._parts, self._pending = [ids], n
        return out

    @property
    def pending(self) -> int:
        """Ids in the open block."""
        return self._pending

    def finish(self) -> list[tuple[np.ndarray, int]]:
        """The open block, if it holds any id."""
        return self._close()

    def _close(self) -> list[tuple[np.ndarray, int]]:
        if not self._pending:
            return []
        body = np.concatenate(self._parts)
        self._parts, self._pending = [], 0
        return [self._block(body)]

    def _block(self, body: np.ndarray) -> tuple[np.ndarray, int]:
        dt = self.sp.dtype
        block = np.full(self.block_size, self.sp.pad, dtype=dt)
        block[0] = self.sp.cls
        block[1:1 + len(body)] = body.astype(dt)
        block[1 + len(body)] = self.sp.sep
        return block, len(body)


def encode_lines(lengths: list[int], ids: np.ndarray) -> bytes:
    """A document's staged payload: its line lengths, then all its ids (uint32)."""
    head = np.asarray([len(lengths), *lengths], dtype=np.uint32)
    return head.tobytes() + np.asarray(ids, dtype=np.uint32).tobytes()


def decode_lines(payload: bytes) -> list[np.ndarray]:
    """The per-line id arrays of a staged payload (`encode_lines`)."""
    if not payload:
        return []
    arr = np.frombuffer(payload, dtype=np.uint32)
    n = int(arr[0])
    lengths = arr[1:1 + n].astype(np.int64)
    ends = np.cumsum(lengths) + 1 + n
    starts = ends - lengths
    return [arr[a:b] for a, b in zip(starts, ends, strict=True)]
