"""Epoch order: which sample sits at each position of an epoch, and who reads it.

The order of an epoch is a pure function of (sources, weights, seed, epoch, shuffle window):

1. Each source (one manifest) is an endless stream of its samples: "source epoch" q lists the
   source's shards in a seeded permutation, each shard's samples in tar order. Mix epoch e takes
   the next n_i samples of source i's stream, so with weights every sample of a source is seen
   once before any is seen twice, and without weights (n_i = size of source i) mix epoch e is
   exactly source epoch e.
2. The epoch's "read order" is cut into windows of K samples (K = shuffle_buffer). Window w
   takes from every source its next c_{w,i} samples, the c spread in proportion to n_i, so every
   window (and so every batch) mixes the sources in the requested proportions.
3. Inside a window the samples are permuted by a hash of (seed, epoch, w): the bounded shuffle.
   Reading stays sequential (window after window, every shard front to back) and only ever
   needs one window of samples in memory.

Positions of the resulting epoch order are then dealt out: global step g of a run that started
at position c takes positions [c + g*B*W, c + (g+1)*B*W); rank r takes its B-slice of that and
DataLoader worker (g % num_workers) builds it. The samples consumed after any number of steps
are therefore a prefix of the epoch order whatever W and the worker count, so a checkpoint is
just (epoch, consumed) and resuming on another world size repeats and skips nothing.

All randomness comes from `mix64`, a splitmix64-style hash: version-independent, vectorised
in numpy, and the same in every process.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from shardify.format import validate_manifest

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix_int(x: int) -> int:
    """splitmix64 finaliser on a Python int (exact, wraps at 2**64)."""
    x = (x + _GOLDEN) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def mix64(*keys: int) -> int:
    """Hash a tuple of non-negative ints to 64 bits; the root of every random draw."""
    h = 0x6A09E667F3BCC908
    for k in keys:
        h = _mix_int(h ^ (int(k) & _M64))
    return h


def mix64_array(base: int, xs: np.ndarray) -> np.ndarray:
    """Vectorised `_mix_int(base ^ x)` for a uint64 array (numpy wraps uint64 arithmetic)."""
    x = np.bitwise_xor(np.uint64(base), xs.astype(np.uint64))
    with np.errstate(over="ignore"):
        x = x + np.uint64(_GOLDEN)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hashed_permutation(n: int, *keys: int) -> np.ndarray:
    """A permutation of range(n) that depends only on `keys` (sort by hash, ties by index)."""
    h = mix64_array(mix64(*keys), np.arange(n, dtype=np.uint64))
    return np.argsort(h, kind="stable").astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Sources (manifests)


@dataclass(frozen=True)
class Source:
    """One manifest's split: shard URLs and sample counts, in manifest order."""

    manifest: str
    urls: tuple[str, ...]
    names: tuple[str, ...]
    counts: np.ndarray  # samples per shard
    starts: np.ndarray  # global index (within the source) of each shard's first sample

    @property
    def size(self) -> int:
        return int(self.counts.sum())


def _is_url(path: str) -> bool:
    return "://" in path


def _join(base_dir: str, name: str) -> str:
    if _is_url(name) or os.path.isabs(name):
        return name
    return posixpath.join(base_dir, name) if _is_url(base_dir) else os.path.join(base_dir, name)


def _read_text(path: str) -> str:
    if _is_url(path):
        import fsspec  # only for remote manifests; local reads stay dependency-free

        with fsspec.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


def _missing_fs(path: str, e: ImportError) -> str:
    from trainer.rundir import missing_package

    return missing_package(path) or str(e).strip().splitlines()[0]


def manifest_file(manifest: str) -> str:
    """The manifest.json a shard directory or manifest path names (local paths with ~ expanded)."""
    if _is_url(manifest):
        return manifest if manifest.endswith(".json") else posixpath.join(manifest, "manifest.json")
    path = os.path.expanduser(manifest)
    return path if path.endswith(".json") else os.path.join(path, "manifest.json")


def read_manifest(manifest: str) -> tuple[dict, str]:
    """(validated manifest, its path); FileNotFoundError or ValueError naming the file."""
    path = manifest_file(manifest)
    try:
        doc = json.loads(_read_text(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"manifest not found: {path}") from None
    except ImportError as e:  # fsspec has no implementation for the scheme installed (s3fs, gcsfs)
        raise ValueError(f"cannot read manifest {path}: {_missing_fs(path, e)}") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read manifest {path}: {e}") from None
    validate_manifest(doc, path)  # the contract's checks (a ShardifyError is a ValueError)
    return doc, path


def load_source(manifest: str, split: str) -> Source:
    """Read one manifest (its path or its directory) and return the split's shard list."""
    doc, path = read_manifest(manifest)
    splits = doc["splits"]
    if split not in splits:
        raise ValueError(f"split {split!r} not in manifest {path} (has: {', '.join(sorted(splits)) or 'none'})")
    shards = splits[split].get("shards", [])
    if not shards:
        raise ValueError(f"split {split!r} of manifest {path} lists no shards")
    base = posixpath.dirname(path) if _is_url(path) else os.path.dirname(os.path.abspath(path))
    names = tuple(str(s["name"]) for s in shards)
    counts = np.array([int(s["samples"]) for s in shards], dtype=np.int64)
    if (counts < 0).any():
        raise ValueError(f"manifest {path}: negative sample count")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return Source(path, tuple(_join(base, n) for n in names), names, counts, starts)


def epoch_counts(sizes: list[int], weights: list[float]) -> list[int]:
    """Samples each source contributes per epoch: its size, or its weight's share of the total.

    The epoch length is always the total size, so "one epoch" keeps its usual meaning; weights
    only change the mix (largest-remainder rounding, ties to the lower index).
    """
    total = sum(sizes)
    if not weights:
        return list(sizes)
    if len(weights) != len(sizes):
        raise ValueError(f"data.weights has {len(weights)} entries for {len(sizes)} manifests")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"data.weights must be non-negative with a positive sum, got {weights}")
    wsum = float(sum(weights))
    quotas = [total * w / wsum for w in weights]
    n = [int(np.floor(q)) for q in quotas]
    rest = total - sum(n)
    order = sorted(range(len(n)), key=lambda i: (-(quotas[i] - n[i]), i))
    for i in order[:rest]:
        n[i] += 1
    for i, (ni, si) in enumerate(zip(n, sizes)):
        if ni > 0 and si == 0:
            raise ValueError(f"manifest {i} has no samples but a positive weight")
    return n


# ---------------------------------------------------------------------------------------------
# The epoch plan

_T = TypeVar("_T")


class _Memo:
    """A small per-plan LRU memo. functools.lru_cache on a method would be one cache shared by
    every plan of the process, keyed on (and keeping alive) the plans of past epochs."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self.items: OrderedDict[Hashable, object] = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], _T]) -> _T:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = self.items[key] = make()
        if len(self.items) > self.maxsize:
            self.items.popitem(last=False)
        return value


class EpochPlan:
    """The order of one epoch: position -> (source, shard, index in shard, sample uid)."""

    def __init__(self, sources: list[Source], weights: list[float], seed: int, epoch: int, window: int,
                 shuffle: bool = True, shuffle_shards: bool | None = None):
        self.sources = sources
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.shuffle = shuffle  # permute samples inside each window
        self.shuffle_shards = shuffle if shuffle_shards is None else shuffle_shards
        self.n = np.array(epoch_counts([s.size for s in sources], weights), dtype=np.int64)
        self.N = int(self.n.sum())
        if self.N <= 0:
            raise ValueError("the manifests hold no samples")
        self.K = max(1, int(window))
        self.num_windows = -(-self.N // self.K)
        self.alloc = self._allocate()  # [num_windows + 1, S]: source offsets at window starts
        self._window_perms = _Memo(4)
        self._shard_orders = _Memo(64)

    def _allocate(self) -> np.ndarray:
        """Cumulative per-source counts at each window start, proportional and monotone."""
        S = len(self.sources)
        bounds = np.minimum(np.arange(self.num_windows + 1, dtype=np.int64) * self.K, self.N)
        if S == 1:
            return bounds[:, None].copy()
        A = np.zeros((self.num_windows + 1, S), dtype=np.int64)
        cur = np.zeros(S, dtype=np.int64)
        frac = self.n / self.N
        for w in range(self.num_windows):
            size = int(bounds[w + 1] - bounds[w])
            deficit = bounds[w + 1] * frac - cur
            take = np.clip(np.floor(deficit).astype(np.int64), 0, self.n - cur)
            rest = size - int(take.sum())
            # a source ahead of its share has a negative deficit, so the floors can overshoot
            for i in sorted(range(S), key=lambda i: (deficit[i] - take[i], i)):
                if rest >= 0:
                    break
                if take[i] > 0:
                    take[i] -= 1
                    rest += 1
            # hand the last few samples to the sources furthest behind their share (stable ties)
            for i in sorted(range(S), key=lambda i: (-(deficit[i] - take[i]), i)):
                if rest == 0:
                    break
                if cur[i] + take[i] < self.n[i]:
                    take[i] += 1
                    rest -= 1
            cur = cur + take
            A[w + 1] = cur
        return A

    def window_of(self, q: np.ndarray) -> np.ndarray:
        return q // self.K

    def window_range(self, w: int) -> tuple[int, int]:
        return w * self.K, min((w + 1) * self.K, self.N)

    def _window_perm(self, w: int) -> np.ndarray:
        return self._window_perms.get(w, lambda: self._make_window_perm(w))

    def _make_window_perm(self, w: int) -> np.ndarray:
        a, b = self.window_range(w)
        if not self.shuffle:
            return np.arange(b - a, dtype=np.int64)
        return hashed_permutation(b - a, 1, self.seed, self.epoch, w)

    def _shard_order(self, i: int, source_epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard permutation of source i in one of its source epochs, and cumulative sizes."""
        return self._shard_orders.get((i, source_epoch), lambda: self._make_shard_order(i, source_epoch))

    def _make_shard_order(self, i: int, source_epoch: int) -> tuple[np.ndarray, np.ndarray]:
        src = self.sources[i]
        if self.shuffle_shards:
            perm = hashed_permutation(len(src.counts), 2, self.seed, i, source_epoch)
        else:
            perm = np.arange(len(src.counts), dtype=np.int64)
        cum = np.concatenate([[0], np.cumsum(src.counts[perm])]).astype(np.int64)
        return perm, cum

    def lookup(self, q: np.ndarray) -> dict[str, np.ndarray]:
        """Map epoch positions (all in one window) to source, shard, index in shard and uid."""
        q = np.asarray(q, dtype=np.int64)
        out = {k: np.empty(len(q), dtype=np.int64) for k in ("source", "shard", "index", "uid")}
        if len(q) == 0:
            return out
        w = int(q[0] // self.K)
        if (q // self.K != w).any():
            raise ValueError("lookup expects positions of a single window")
        a, _ = self.window_range(w)
        t = self._window_perm(w)[q - a]  # read-order offset inside the window
        per_src = self.alloc[w + 1] - self.alloc[w]
        src_start = np.concatenate([[0], np.cumsum(per_src)])
        src = np.searchsorted(src_start, t, side="right") - 1
        for i in np.unique(src):
            m = src == i
            s = self.alloc[w, i] + (t[m] - src_start[i])  # offset in this epoch's slice of source i
            z = self.epoch * self.n[i] + s  # position in source i's endless stream
            size = self.sources[i].size
            se, pz = z // size, z % size
            shard = np.empty(len(z), dtype=np.int64)
            index = np.empty(len(z), dtype=np.int64)
            for e_src in np.unique(se):
                mm = se == e_src
                perm, cum = self._shard_order(int(i), int(e_src))
                k = np.searchsorted(cum, pz[mm], side="right") - 1
                shard[mm] = perm[k]
                index[mm] = pz[mm] - cum[k]
            out["source"][m] = i
            out["shard"][m] = shard
            out["index"][m] = index
            out["uid"][m] = self.sources[i].starts[shard] + index
        return out


# ---------------------------------------------------------------------------------------------
# Dealing positions to ranks and workers


@dataclass(frozen=True)
class Deal:
    """Which positions of the epoch order one rank (and its workers) reads after a resume point.

    N: epoch length; start: positions already consumed (global); B: per-rank batch size;
    W: world size; rank; pad: pad the last global batch with repeats instead of dropping it.
    """

    N: int
    start: int
    B: int
    W: int
    rank: int
    pad: bool

    @property
    def steps(self) -> int:
        """Global steps left in the epoch (the same on every rank)."""
        left = max(0, self.N - self.start)
        gb = self.B * self.W
        return -(-left // gb) if self.pad else left // gb

    def positions(self, step: int) -> np.ndarray:
        """Positions (possibly >= N: padding) of this rank's batch at a step after the start."""
        a = self.start + step * self.B * self.W + self.rank * self.B
        return np.arange(a, a + self.B, dtype=np.int64)

    def owner(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For positions p >= start: (step, rank) that reads them."""
        rel = p - self.start
        gb = self.B * self.W
        return rel // gb, (rel % gb) // self.B


def epoch_steps(N: int, B: int, W: int, pad: bool) -> int:
    """Batches per rank in a whole epoch."""
    return Deal(N, 0, B, W, 0, pad).steps
