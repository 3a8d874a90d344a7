"""The sha256 of a file, read in 1 MiB chunks: shard checksums, tokenizer fingerprints."""

from __future__ import annotations

import hashlib

CHUNK = 1 << 20


def sha256_file(path) -> str:
    """Hex sha256 of the file at `path` (any os.PathLike or str)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
