"""The plan lives in files: planning keeps Python-object memory flat in the number of inputs, and
the file-based order (external sorts by hash, in parts) is exactly the in-memory definition:
duplicates, hash collisions and ties included."""

from __future__ import annotations

import hashlib
import tracemalloc
import types
from pathlib import Path

import numpy as np
import pytest

from shardify import extsort, state
from shardify import plan as planning
from shardify.job import JobOptions
from shardify.records import Item
from shardify.sources.base import Reader, Source

pytestmark = pytest.mark.timeout(300)


class _ListSource(Source):
    """A source that yields generated items (keys `k{i}`, some listed twice)."""

    dataset = "fake"
    fields = ("txt",)

    def __init__(self, n: int, dup_every: int = 0):
        self.n, self.dup_every = n, dup_every

    def describe(self) -> dict:
        return {}

    def splits(self) -> list[str]:
        return ["train"]

    def list_items(self, split, ctx):
        for i in range(self.n):
            key = f"k{i // 2}" if self.dup_every and i % self.dup_every == 1 else f"k{i}"
            yield Item(key=key, origin=f"row{i}", loc=("some/path", i, None), meta={"caption": f"c{i}", "n": i})

    def open_reader(self, split) -> Reader:
        raise NotImplementedError

    def encode(self, item, payload):
        raise NotImplementedError


def _plan(source, out: Path, seed=3, per_shard=7) -> planning.SplitPlan:
    (out / ".shardify").mkdir(parents=True, exist_ok=True)
    return planning.plan_split(source, "train", out, JobOptions(seed=seed, samples_per_shard=per_shard,
                                                                progress=False), print)


class _WeakBlake2b:
    """blake2b with only 8 bits of its digest left: most keys collide, in both hashes."""

    def __init__(self, data=b"", digest_size=8, key=b""):
        self._digest = hashlib.blake2b(data, digest_size=digest_size, key=key).digest()

    def digest(self) -> bytes:
        return self._digest[:1] + bytes(len(self._digest) - 1)


@pytest.mark.parametrize("weak", [False, True], ids=["blake2b", "colliding-hashes"])
def test_the_plan_in_files_is_the_in_memory_order(tmp_path, monkeypatch, weak):
    if weak:
        monkeypatch.setattr(planning, "hashlib", types.SimpleNamespace(blake2b=_WeakBlake2b))
    monkeypatch.setattr(extsort, "BLOCK_ROWS", 64)  # many blocks and sorted parts from 700 rows
    source = _ListSource(700, dup_every=5)
    plan = _plan(source, tmp_path / "out")

    # the definition, in memory: first listing of a key wins; seeded order; contiguous shards
    items, seen, dups = list(source.list_items("train", None)), set(), []
    unique = []
    for it in items:
        (dups if it.key in seen else unique).append(it)
        seen.add(it.key)
    order = planning.seeded_order([it.key for it in unique], 3)
    if weak:  # many order ties were broken by key
        hashes = [planning.order_hash(it.key, 3) for it in unique]
        assert len(set(hashes)) < len(hashes) // 2

    def key_hash(key: str) -> int:
        return int.from_bytes(planning.hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")

    bounds = planning.shard_bounds(len(unique), planning.num_shards(len(unique), 7))
    assert (plan.inputs, plan.planned, plan.shards) == (700, len(unique), len(bounds)) and dups
    for i, (a, b) in enumerate(bounds):
        got = plan.shard_items(i)
        want = [unique[j] for j in order[a:b]]
        assert [(it.key, it.origin, list(it.loc), it.meta) for it in got] == \
            [(it.key, it.origin, list(it.loc), it.meta) for it in want]
        assert plan.key_digests[i] == str(sum(key_hash(it.key) for it in want) % (1 << 64))
    assert [r["key"] for r in plan.listing_rejects] == [it.key for it in dups]
    assert [r["source"] for r in plan.listing_rejects] == [it.origin for it in dups]
    keys = np.load(state.keys_path(tmp_path / "out", "train"))
    assert keys.tolist() == sorted(key_hash(it.key) for it in unique)
    assert state.read_json(state.plan_path(tmp_path / "out", "train"))["key_digests"] == plan.key_digests
    plan.discard()
    assert not (tmp_path / "out" / ".shardify" / "work").exists()


def test_planning_memory_does_not_grow_with_the_inputs(tmp_path):
    """Python objects alive during planning: flat in the number of inputs (the listing went
    into a list of Items before, about 700 bytes a row: 20 MB here)."""
    _plan(_ListSource(100), tmp_path / "warm")  # imports and first-use caches, not measured
    tracemalloc.start()
    try:
        _plan(_ListSource(30_000), tmp_path / "out")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 6_000_000, f"planning 30,000 inputs peaked at {peak / 1e6:.1f} MB of Python objects"


def test_first_common_finds_a_shared_value_block_by_block():
    rng = np.random.default_rng(0)
    for trial in range(50):
        a = np.unique(rng.integers(0, 5000, 300, dtype=np.uint64))
        b = np.unique(rng.integers(0, 5000, 200, dtype=np.uint64))
        if trial % 2:
            b = np.setdiff1d(b, a)  # nothing shared
        size_a, size_b = 1 + trial % 7, 1 + trial % 11

        def blocks(x, size):
            return (x[i:i + size] for i in range(0, len(x), size))

        found = extsort.first_common(blocks(a, size_a), blocks(b, size_b))
        shared = set(a.tolist()) & set(b.tolist())
        assert (found is None) == (not shared) and (found is None or found in shared)


def test_a_job_leaves_no_plan_files_and_a_stopped_one_is_replanned(tmp_path, monkeypatch):
    """The work folder exists only while a node writes its shards: a finished run removes it, a
    run stopped while writing leaves it for the rerun, which plans afresh and writes the same
    shards as an uninterrupted run."""
    import imagenet_fixtures as fx
    from imagenet_fixtures import shard
    from shardify import job

    src = fx.write_imagefolder(tmp_path / "src", per_class=2, specials=False)
    shard(src, tmp_path / "whole", "--split", "train", "--samples-per-shard", "3")
    assert not (tmp_path / "whole" / ".shardify" / "work").exists()

    real = job.write_shard
    calls = []

    def stop_at_the_second(split, index, items):
        calls.append(index)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(split, index, items)

    monkeypatch.setattr(job, "write_shard", stop_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        job.run_job(_imagefolder(src), tmp_path / "out", ["train"],
                    JobOptions(samples_per_shard=3, progress=False), log=lambda m: None)
    assert list((tmp_path / "out" / ".shardify" / "work").glob("train-node-0-of-1/rows.jsonl"))
    monkeypatch.setattr(job, "write_shard", real)
    shard(src, tmp_path / "out", "--split", "train", "--samples-per-shard", "3")
    assert not (tmp_path / "out" / ".shardify" / "work").exists()
    assert len(calls) == 2 and len(list((tmp_path / "whole").glob("*.tar"))) >= 2
    for tar in sorted((tmp_path / "whole").glob("*.tar")):
        assert (tmp_path / "out" / tar.name).read_bytes() == tar.read_bytes()


def _imagefolder(src: Path):
    from shardify.sources.imagenet import ImageNetSource
    from shardify.storage import local_location

    return ImageNetSource(local_location(str(src)))
