"""The sha256 of a file, read in 1 MiB chunks: shard checksums, tokenizer fingerprints."""

from __future__ import annotations

import hashlib

CHUNK = 1 << 20


def sha256_file(path, progress=None) -> str:
    """Hex sha256 of the file at `path` (str or os.PathLike); `progress(n)`, when given, is
    called with the size of each chunk read (a progress bar's `update`)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return h.hexdigest()
