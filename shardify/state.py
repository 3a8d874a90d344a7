"""The job's work state under `<out>/.shardify/`: what makes a rerun resume, and finalize merge.

- `job.json`: the fingerprint of every option that changes the output bytes. A rerun with a
  different fingerprint is refused (or starts over with --overwrite).
- `plan-<split>.json`: inputs and shard count of a split, listing-time rejects, and one key
  digest per shard so that finalize can prove nothing is missing or doubled.
- `shards/<split>-NNNNNN.json`: the stats of a finished shard, written just before the tar is
  renamed into place. A shard is done when both its tar and its stats exist.
- `nodes/<split>-node-R-of-K.json`: which shards a node wrote (the partial manifests).
All are written to a temporary name and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

STATE_DIR = ".shardify"
TMP_MARK = ".tmp-"


def state_dir(out_dir: Path) -> Path:
    return Path(out_dir) / STATE_DIR


def tmp_path(path: Path) -> Path:
    """Where to write `path` before renaming it: unique per host and process, because nodes
    sharing an output directory on a network file system may write the same file at once."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{socket.gethostname()}-{os.getpid()}")


def write_json_atomic(path: Path, obj, indent: int | None = 1) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def key_digest(keys) -> int:
    """Order-independent digest of a multiset of keys: sum of 64-bit hashes, mod 2**64."""
    total = 0
    for k in keys:
        total += int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little")
    return total % (1 << 64)


def remove_temporaries(out_dir: Path, prefixes: list[str] | None = None) -> int:
    """Delete files left half-written by an interrupted run; return how many.

    With `prefixes`, only temporaries of those shards (e.g. "train-000003"): other nodes may be
    writing theirs in the same directory right now.
    """
    removed = 0
    wanted = tuple(f".{p}." for p in prefixes) if prefixes is not None else None
    for path in Path(out_dir).rglob(f"*{TMP_MARK}*"):
        if path.is_file() and (wanted is None or path.name.startswith(wanted)):
            path.unlink()
            removed += 1
    return removed
