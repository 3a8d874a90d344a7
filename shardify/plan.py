"""Which input goes to which shard, which node writes which shard, and what is already done.

The order of a split is a seeded permutation that depends only on the sample keys and the seed
(inputs sorted by a keyed BLAKE2b hash, ties by key), never on how the source listed them or on
how many workers and nodes run. Shard i takes the contiguous range [floor(i*N/S),
floor((i+1)*N/S)) of that order, so shard sizes differ by at most one input.

`plan_split` lists a split through its source, rejects keys listed twice, refuses a key another
split of the directory uses, cuts the order into shards and records the plan; `shard_done` and
`remove_stale_shards` decide what a rerun keeps (resume detection).

Memory does not grow with the number of inputs: the listing streams into files (the items as
JSON rows, shardify/rowfile.py; per row its order hash, key hash and row number as fixed-size
records) and both sorts, by key hash to find duplicates and by order hash for the shards, are
external (shardify/extsort.py). What stays in memory is per shard (its key digest) or per
rejected input. Shard writers read their rows from the files; forked workers share no plan.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shardify import extsort, state
from shardify.checksum import sha256_file
from shardify.format import ShardifyError, shard_name
from shardify.records import Item, Reject, reject_record
from shardify.rowfile import RowReader, RowWriter
from shardify.sources.base import ListContext, Source

# per listed row: its order hash (big-endian digest: sorts like the digest's bytes), its key hash
# (state.key_hash) and its row number in the listing
RECORD = np.dtype([("order", "<u8"), ("key", "<u8"), ("row", "<u8")])
RECORDS, ORDER = "records.bin", "order.u64"


def _order_salt(seed: int) -> bytes:
    return f"shardify-order-{seed}".encode()[:64]


def order_hash(key: str, seed: int) -> int:
    """The key's place in the seeded order (ties, vanishingly rare, go by key)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8, key=_order_salt(seed)).digest(), "big")


def seeded_order(keys: list[str], seed: int) -> list[int]:
    """Indices of `keys` in the seeded shuffled order (the definition, in memory; plan_split
    computes the same order in files)."""
    hashes = [order_hash(k, seed) for k in keys]
    return sorted(range(len(keys)), key=lambda i: (hashes[i], keys[i]))


def num_shards(n_inputs: int, samples_per_shard: int) -> int:
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be at least 1")
    return math.ceil(n_inputs / samples_per_shard)


def shard_bounds(n_inputs: int, n_shards: int) -> list[tuple[int, int]]:
    """[start, end) of each shard over the ordered inputs; sizes differ by at most one."""
    return [((i * n_inputs) // n_shards, ((i + 1) * n_inputs) // n_shards) for i in range(n_shards)]


def node_shards(n_shards: int, num_nodes: int, node_rank: int) -> list[int]:
    """The shards node `node_rank` of `num_nodes` writes (round robin, so work is balanced)."""
    if not 0 <= node_rank < num_nodes:
        raise ValueError(f"node rank {node_rank} is not in [0, {num_nodes})")
    return list(range(node_rank, n_shards, num_nodes))


@dataclass
class SplitPlan:
    """A planned split: counts and digests in memory, the rows of each shard in `work` files.
    Small and picklable: workers get it and read only their shards' rows."""

    split: str
    inputs: int  # listed inputs, duplicates included
    planned: int  # inputs in shards (duplicates are listing rejects)
    shards: int
    key_digests: list[str]
    listing_rejects: list[dict]
    work: Path
    _rows: RowReader = field(init=False, repr=False)

    def __post_init__(self):
        self._rows = RowReader(self.work)

    def bounds(self, index: int) -> tuple[int, int]:
        return (index * self.planned) // self.shards, ((index + 1) * self.planned) // self.shards

    def shard_size(self, index: int) -> int:
        start, end = self.bounds(index)
        return end - start

    def shard_items(self, index: int) -> list[Item]:
        """The items of shard `index`, in the seeded order."""
        start, end = self.bounds(index)
        with open(self.work / ORDER, "rb") as f:
            f.seek(start * 8)
            rows = np.fromfile(f, dtype="<u8", count=end - start)
        return [self._rows.item(int(r)) for r in rows]

    def discard(self) -> None:
        """Delete the plan's files (ours alone: the work folder is this node's)."""
        self._rows.close()
        _remove_work(self.work)


def _remove_work(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
    try:
        work.parent.rmdir()  # .shardify/work, once no node has files there
    except OSError:
        pass


def plan_split(source: Source, split: str, out_dir: Path, opts, log) -> SplitPlan:
    """List a split, reject duplicate keys, and cut the seeded order into shards.

    `opts` is the job's JobOptions (seed, samples_per_shard, workers, progress, node).
    Records the plan in the state directory. A key that another split of the directory already
    uses is refused, and then nothing of the plan (nor a staging it started) is left behind.
    """
    stage_dir = state.stage_dir(out_dir, split)
    staged_before = stage_dir.exists()
    last = [0.0]

    def progress(desc: str, count: int) -> None:
        now = time.monotonic()
        if opts.progress and now - last[0] > 2.0:
            last[0] = now
            log(f"  listing {split}: {desc} ({count} inputs so far)")

    ctx = ListContext(stage_dir=stage_dir, workers=opts.workers, progress=progress, show_progress=opts.progress,
                      node_rank=opts.node_rank, num_nodes=opts.num_nodes)
    work = state.work_dir(out_dir, split, opts.node_rank, opts.num_nodes)
    shutil.rmtree(work, ignore_errors=True)  # left by a run that was stopped: the plan is made afresh
    work.mkdir(parents=True)
    try:
        n_inputs = _list_to_files(source.list_items(split, ctx), work, opts.seed)
        rows = RowReader(work)
        duplicates = _find_duplicates(work, rows)
        listing_rejects = [reject_record(split, rows.item(r), Reject("duplicate_key", "key listed before"), None)
                           for r in duplicates]
        try:
            _check_keys_unique_across_splits(out_dir, split, work, rows)
        except ShardifyError:
            if not staged_before:  # a refused command leaves nothing behind
                shutil.rmtree(stage_dir, ignore_errors=True)
            raise
        planned = n_inputs - len(duplicates)
        n_shards = num_shards(planned, opts.samples_per_shard)
        digests = _write_order(work, rows, np.array(duplicates, dtype=np.uint64), planned, n_shards)
        rows.close()
        (work / RECORDS).unlink()
        os.replace(work / "keys.npy", state.keys_path(out_dir, split))
    except BaseException:
        _remove_work(work)
        raise
    state.write_json_atomic(state.plan_path(out_dir, split), {
        "split": split,
        "inputs": n_inputs,
        "shards": n_shards,
        "key_digests": digests,
        "listing_rejects": listing_rejects,
        "extras": source.split_extras(split, ctx),
    })
    return SplitPlan(split, n_inputs, planned, n_shards, digests, listing_rejects, work)


def _list_to_files(items, work: Path, seed: int) -> int:
    """Write every listed item as a row, and its (order hash, key hash, row) record; return the
    count. Hashes are gathered in compact arrays and written in blocks."""
    rows = RowWriter(work)
    records = extsort.RecordFile(work / RECORDS, RECORD)
    order_hashes, key_hashes = array("Q"), array("Q")
    salt, blake2b, from_bytes = _order_salt(seed), hashlib.blake2b, int.from_bytes

    def flush() -> None:
        block = np.empty(len(order_hashes), dtype=RECORD)
        block["order"] = np.frombuffer(order_hashes, dtype=np.uint64)
        block["key"] = np.frombuffer(key_hashes, dtype=np.uint64)
        block["row"] = np.arange(records.count, records.count + len(block), dtype=np.uint64)
        records.append(block)
        del order_hashes[:], key_hashes[:]

    try:
        for item in items:
            rows.add(item)
            key = item.key.encode()
            order_hashes.append(from_bytes(blake2b(key, digest_size=8, key=salt).digest(), "big"))
            key_hashes.append(from_bytes(blake2b(key, digest_size=8).digest(), "little"))  # state.key_hash
            if len(order_hashes) >= extsort.BLOCK_ROWS:
                flush()
        flush()
    finally:
        records.close()
        rows.close()
    return records.count


def _equal_runs(values: np.ndarray):
    """(start, end) of every run of two or more equal neighbours in `values`."""
    same = np.flatnonzero(values[1:] == values[:-1])
    start = None
    for k, i in enumerate(same):
        if start is None:
            start = i
        if k + 1 == len(same) or same[k + 1] != i + 1:
            yield int(start), int(i) + 2
            start = None


def _find_duplicates(work: Path, rows: RowReader) -> list[int]:
    """Rows whose key an earlier row has (in listing order), and `keys.npy`: the sorted key
    hashes of the other rows (the cross-split check's file). Equal hashes are rare: only their
    keys are read back to tell a duplicate from a collision."""
    duplicates: list[int] = []
    keys_out = state.Uint64NpyWriter(work / "keys.npy")
    try:
        for part in extsort.sorted_parts(work / RECORDS, RECORD, "key"):
            drop = []
            for start, end in _equal_runs(part["key"]):
                seen: set[str] = set()
                for at in range(start, end):  # in row order: the sort is stable
                    key = rows.key(int(part["row"][at]))
                    if key in seen:
                        drop.append(at)
                        duplicates.append(int(part["row"][at]))
                    seen.add(key)
            keys_out.append(np.delete(part["key"], drop) if drop else part["key"])
    finally:
        keys_out.close()
    duplicates.sort()
    return duplicates


def _write_order(work: Path, rows: RowReader, duplicates: np.ndarray, planned: int, n_shards: int) -> list[str]:
    """Write the planned rows in the seeded order (`order.u64`); return each shard's key digest."""
    starts = np.array([(i * planned) // n_shards for i in range(n_shards)], dtype=np.int64)
    digests = np.zeros(n_shards, dtype=np.uint64)
    at = 0
    with open(work / ORDER, "wb") as out:
        for part in extsort.sorted_parts(work / RECORDS, RECORD, "order"):
            if len(duplicates):
                part = part[~np.isin(part["row"], duplicates)]
            for start, end in _equal_runs(part["order"]):  # a tie goes by key, as in seeded_order
                run = part[start:end]
                keys = [rows.key(int(r)) for r in run["row"]]
                part[start:end] = run[sorted(range(len(run)), key=keys.__getitem__)]
            part["row"].tofile(out)
            if len(part):
                shard = np.searchsorted(starts, np.arange(at, at + len(part)), side="right") - 1
                first = np.flatnonzero(np.r_[True, shard[1:] != shard[:-1]])
                digests[shard[first]] += np.add.reduceat(part["key"], first)  # uint64: mod 2**64
                at += len(part)
    return [str(int(d)) for d in digests]


def _check_keys_unique_across_splits(out_dir: Path, split: str, work: Path, rows: RowReader) -> None:
    """Keys are unique per dataset directory: refuse a split that reuses another split's key.
    Both key files are sorted: they are compared block by block."""
    ours = work / "keys.npy"
    for path in state.plan_paths(out_dir):
        other = state.read_json(path).get("split")
        keys_file = state.keys_path(out_dir, other) if other else None
        if other == split or keys_file is None or not keys_file.exists():
            continue
        common = extsort.first_common(extsort.sorted_npy_blocks(ours), extsort.sorted_npy_blocks(keys_file))
        if common is None:
            continue
        for part in extsort.sorted_parts(work / RECORDS, RECORD, "key"):
            hits = part["row"][part["key"] == np.uint64(common)]
            if len(hits):
                it = rows.item(int(hits[0]))
                raise ShardifyError(
                    f"the {split} input {it.origin} has the key {it.key!r}, which the split "
                    f"{other!r} in {out_dir} already uses; keys must be unique in a dataset "
                    f"directory: write {split} to another --out (or rename the file)"
                )


def remove_stale_shards(out_dir: Path, split: str, n_shards: int) -> None:
    """Shards past the end of the plan are left from a run over a larger source: delete them
    (only those our stats say we wrote), so that nothing in the directory looks like part of
    the dataset without being in it."""
    prefix = f"{split}-"
    for name in state.written_shards(out_dir):
        index = name[len(prefix): -len(".tar")] if name.startswith(prefix) and name.endswith(".tar") else ""
        if index.isdigit() and len(index) == 6 and int(index) >= n_shards:
            stem = name[: -len(".tar")]
            state.unlink_file(out_dir / name)
            state.unlink_file(out_dir / f"{stem}.idx")
            state.stats_path(out_dir, stem).unlink(missing_ok=True)


def shard_done(out_dir: Path, split: str, index: int, key_digest: str, listing: str | None = None) -> bool:
    """A shard is done when its tar, .idx and stats exist, it holds the planned inputs (a local
    source that changed between two runs changes the plan: such shards are written again), it
    was written from the source's current files (`listing`: a file replaced under the same name
    keeps the plan but not the bytes) and its bytes are the ones its stats describe (a tar
    truncated or modified by something else is written again). The sha256 is recomputed only
    for a tar whose mtime changed."""
    name = shard_name(split, index)
    tar, stats_path = out_dir / f"{name}.tar", state.stats_path(out_dir, name)
    if not (tar.is_file() and stats_path.exists() and (out_dir / f"{name}.idx").is_file()):
        return False
    st = state.read_json(stats_path)
    if st["key_digest"] != key_digest or st.get("listing") != listing:
        return False
    info = tar.stat()
    if info.st_size != st["bytes"]:
        return False
    if st.get("mtime_ns") != info.st_mtime_ns:  # touched or copied since written: check the bytes
        if sha256_file(tar) != st["sha256"]:
            return False
        st["mtime_ns"] = info.st_mtime_ns
        state.write_json_atomic(stats_path, st, indent=None)
    return True
