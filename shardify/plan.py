"""Which input goes to which shard, and which node writes which shard.

The order of a split is a seeded permutation that depends only on the sample keys and the seed
(inputs sorted by a keyed BLAKE2b hash), never on how the source listed them or on how many
workers and nodes run. Shard i takes the contiguous range [floor(i*N/S), floor((i+1)*N/S)) of
that order, so shard sizes differ by at most one input.
"""

from __future__ import annotations

import hashlib
import math


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


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}"
