"""Which input goes to which shard, which node writes which shard, and what is already done.

The order of a split is a seeded permutation that depends only on the sample keys and the seed
(inputs sorted by a keyed BLAKE2b hash), never on how the source listed them or on how many
workers and nodes run. Shard i takes the contiguous range [floor(i*N/S), floor((i+1)*N/S)) of
that order, so shard sizes differ by at most one input.

`plan_split` lists a split through its source, rejects keys listed twice, refuses a key another
split of the directory uses, cuts the order into shards and records the plan; `shard_done` and
`remove_stale_shards` decide what a rerun keeps (resume detection).
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path

from shardify import state
from shardify.checksum import sha256_file
from shardify.format import ShardifyError, shard_name
from shardify.records import Item, Reject, reject_record
from shardify.sources.base import ListContext, Source


def seeded_order(keys: list[str], seed: int) -> list[int]:
    """Indices of `keys` in the seeded shuffled order."""
    salt = f"shardify-order-{seed}".encode()[:64]
    digests = [hashlib.blake2b(k.encode(), digest_size=8, key=salt).digest() for k in keys]
    return sorted(range(len(keys)), key=lambda i: (digests[i], keys[i]))


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


def plan_split(source: Source, split: str, out_dir: Path, opts, log) -> tuple[list, list, list]:
    """List a split, reject duplicate keys, and cut the seeded order into shards.

    `opts` is the job's JobOptions (seed, samples_per_shard, workers, progress).
    Returns (items per shard, listing rejects, key digest per shard) and records the plan in the
    state directory. A key that another split of the directory already uses is refused.
    """
    stage_dir = state.stage_dir(out_dir, split)
    staged_before = stage_dir.exists()
    last = [0.0]

    def progress(desc: str, count: int) -> None:
        now = time.monotonic()
        if opts.progress and now - last[0] > 2.0:
            last[0] = now
            log(f"  listing {split}: {desc} ({count} inputs so far)")

    ctx = ListContext(stage_dir=stage_dir, workers=opts.workers, progress=progress, show_progress=opts.progress)
    items = source.list_items(split, ctx)
    seen: set[str] = set()
    unique: list[Item] = []
    listing_rejects = []
    for item in items:
        if item.key in seen:
            listing_rejects.append(reject_record(split, item, Reject("duplicate_key", "key listed before"), None))
        else:
            seen.add(item.key)
            unique.append(item)
    del seen
    key_hashes = [state.key_hash(it.key) for it in unique]  # once per key: two uses below
    sorted_hashes = sorted(key_hashes)
    try:
        _check_keys_unique_across_splits(out_dir, split, unique, sorted_hashes)
    except ShardifyError:
        if not staged_before:  # a refused command leaves nothing behind
            import shutil

            shutil.rmtree(stage_dir, ignore_errors=True)
        raise
    order = seeded_order([it.key for it in unique], opts.seed)
    n_shards = num_shards(len(unique), opts.samples_per_shard)
    bounds = shard_bounds(len(unique), n_shards)
    per_shard = [[unique[j] for j in order[a:b]] for a, b in bounds]
    digests = [str(state.digest_of_hashes(key_hashes[j] for j in order[a:b])) for a, b in bounds]
    state.write_uint64_npy(state.keys_path(out_dir, split), sorted_hashes)
    state.write_json_atomic(state.plan_path(out_dir, split), {
        "split": split,
        "inputs": len(items),
        "shards": n_shards,
        "key_digests": digests,
        "listing_rejects": listing_rejects,
        "extras": source.split_extras(split, ctx),
    })
    return per_shard, listing_rejects, digests


def _check_keys_unique_across_splits(out_dir: Path, split: str, unique: list[Item], hashes: list[int]) -> None:
    """Keys are unique per dataset directory: refuse a split that reuses another split's key.
    `hashes`: the split's key hashes, sorted."""
    for path in state.plan_paths(out_dir):
        other = state.read_json(path).get("split")
        keys_file = state.keys_path(out_dir, other) if other else None
        if other == split or keys_file is None or not keys_file.exists():
            continue
        import numpy as np  # only when there is another split to compare with

        theirs = np.load(keys_file, allow_pickle=False)  # sorted
        ours = np.array(hashes, dtype=np.uint64)
        at = np.searchsorted(theirs, ours).clip(max=max(len(theirs) - 1, 0))
        common = ours[theirs[at] == ours] if len(theirs) else ours[:0]
        if len(common):
            shared = set(int(x) for x in common)
            for it in unique:
                if state.key_hash(it.key) in shared:
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
