"""The job's work state under `<out>/.shardify/`: what makes a rerun resume, and finalize merge.

- `job.json`: the fingerprint of every option that changes the output bytes. A rerun with a
  different fingerprint is refused (or starts over with --overwrite).
- `plan-<split>.json`: inputs and shard count of a split, listing-time rejects, and one key
  digest per shard so that finalize can prove nothing is missing or doubled.
- `shards/<split>-NNNNNN.json`: the stats of a finished shard, written just before the tar is
  renamed into place. A shard is done when both its tar and its stats exist.
- `nodes/<split>-node-R-of-K.json`: which shards a node wrote (the partial manifests).
- `keys-<split>.npy`: sorted 64-bit hashes of the split's keys, so that a key used by two
  splits of one directory is refused (keys are unique per dataset directory).
- `work/<split>-node-R-of-K/`: the node's plan while it writes: every listed input as a JSON
  row (`rows.jsonl`, `rows.idx`) and the seeded order as row numbers (`order.u64`); files, so
  that memory does not grow with the number of inputs (see shardify/plan.py).
- `stage/<split>/`: payloads of sources that cannot be read at random, staged once for all
  nodes: `<unit>.bin` and `<unit>.jsonl` per unit, and `<unit>.claim-<g>` while a node
  streams it (shardify/staging.py, shardify/stage_claims.py).
- `locks/node-<R>.lock`: held by the run writing node R's shards (shardify/outlock.py).
This module is the only one that knows these paths.
All are written to a temporary name and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
from pathlib import Path

from shardify.format import ShardifyError

STATE_DIR = ".shardify"
TMP_MARK = ".tmp-"


def state_dir(out_dir: Path) -> Path:
    return Path(out_dir) / STATE_DIR


def job_path(out_dir: Path) -> Path:
    return state_dir(out_dir) / "job.json"


def plan_path(out_dir: Path, split: str) -> Path:
    return state_dir(out_dir) / f"plan-{split}.json"


def plan_paths(out_dir: Path) -> list[Path]:
    return sorted(state_dir(out_dir).glob("plan-*.json"))


def keys_path(out_dir: Path, split: str) -> Path:
    return state_dir(out_dir) / f"keys-{split}.npy"


def stats_dir(out_dir: Path) -> Path:
    return state_dir(out_dir) / "shards"


def stats_path(out_dir: Path, shard_stem: str) -> Path:
    """Stats of the shard `shard_stem` (e.g. "train-000003")."""
    return stats_dir(out_dir) / f"{shard_stem}.json"


def node_path(out_dir: Path, split: str, node_rank: int, num_nodes: int) -> Path:
    return state_dir(out_dir) / "nodes" / f"{split}-node-{node_rank}-of-{num_nodes}.json"


def node_paths(out_dir: Path, split: str) -> list[Path]:
    return sorted((state_dir(out_dir) / "nodes").glob(f"{split}-node-*.json"))


def work_dir(out_dir: Path, split: str, node_rank: int, num_nodes: int) -> Path:
    """A node's plan files for a split (rows, order): rebuilt by every run, deleted when the
    node's shards of the split are written."""
    return state_dir(out_dir) / "work" / f"{split}-node-{node_rank}-of-{num_nodes}"


def stage_dir(out_dir: Path, split: str | None = None) -> Path:
    root = state_dir(out_dir) / "stage"
    return root if split is None else root / split


def lock_path(out_dir: Path, node_rank: int) -> Path:
    return state_dir(out_dir) / "locks" / f"node-{node_rank}.lock"


def written_shards(out_dir: Path) -> list[str]:
    """Names of the shard tars this job wrote and finished (from their stats), e.g. "train-000003.tar"."""
    names = []
    for path in sorted(stats_dir(out_dir).glob("*.json")):
        try:
            names.append(read_json(path)["name"])
        except (OSError, ValueError, KeyError, TypeError):
            names.append(f"{path.stem}.tar")  # a damaged stats file still names its shard
    return names


def tmp_path(path: Path) -> Path:
    """Where to write `path` before renaming it: unique per host and process, because nodes
    sharing an output directory on a network file system may write the same file at once."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{socket.gethostname()}-{os.getpid()}")


def write_json_atomic(path, obj, indent: int | None = 1) -> None:
    """Write JSON to `tmp_path(path)`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def unlink_file(path: Path) -> None:
    """Delete a regular file we wrote; never a folder or a link of the same name."""
    if path.is_file() and not path.is_symlink():
        path.unlink()


def read_json(path: Path):
    """A work-state file; one that something else damaged is a one-line error naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ShardifyError(f"{path} is damaged ({exc}); shardify writes its state atomically, so "
                            "something else changed it: write to a new --out") from None


def key_hash(key: str) -> int:
    """A key's 64-bit hash: the unit of `key_digest` and of the cross-split key check (plain
    ints: numpy's import would cost a single-split job more than hashing its keys)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def write_uint64_npy(path: Path, values: list[int]) -> None:
    """`values` as a 1-D little-endian uint64 .npy file (format 1.0, the bytes np.save writes),
    under a temporary name, then renamed into place."""
    from array import array

    data = array("Q", values)
    if sys.byteorder != "little":
        data.byteswap()
    tmp = tmp_path(path)
    with open(tmp, "wb") as f:
        f.write(_uint64_npy_header(len(values)))
        f.write(data.tobytes())
    os.replace(tmp, path)


def _uint64_npy_header(count: int) -> bytes:
    """The .npy 1.0 header of a 1-D little-endian uint64 array: 128 bytes for any count below
    10**40, so that a streamed file can write it first and fix the count at the end."""
    header = f"{{'descr': '<u8', 'fortran_order': False, 'shape': ({count},), }}"
    # padded so that the data starts at a multiple of 64: magic, version and length take 10 bytes
    header += " " * (-(len(header) + 11) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1")


class Uint64NpyWriter:
    """A 1-D uint64 .npy file written block by block (numpy arrays), the count set at close."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "wb")
        self._f.write(_uint64_npy_header(0))
        self.count = 0

    def append(self, values) -> None:
        values.astype("<u8", copy=False).tofile(self._f)
        self.count += len(values)

    def close(self) -> None:
        header = _uint64_npy_header(self.count)
        assert len(header) == len(_uint64_npy_header(0))  # same length: rewritten in place
        self._f.seek(0)
        self._f.write(header)
        self._f.close()


def key_digest(keys) -> int:
    """Order-independent digest of a multiset of keys: sum of 64-bit hashes, mod 2**64."""
    return digest_of_hashes(map(key_hash, keys))


def digest_of_hashes(hashes) -> int:
    """`key_digest` from the keys' `key_hash` values (for a caller that has them already)."""
    return sum(hashes) % (1 << 64)


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
