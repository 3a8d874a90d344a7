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
from pathlib import Path

STATE_DIR = ".shardify"
TMP_MARK = ".tmp-"


def state_dir(out_dir: Path) -> Path:
    return Path(out_dir) / STATE_DIR


def write_json_atomic(path: Path, obj, indent: int | None = 1) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
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


def remove_temporaries(out_dir: Path) -> int:
    """Delete files left half-written by an interrupted run; return how many."""
    removed = 0
    for root in (Path(out_dir), state_dir(out_dir)):
        if not root.is_dir():
            continue
        for path in root.rglob(f"*{TMP_MARK}*"):
            if path.is_file():
                path.unlink()
                removed += 1
    return removed
