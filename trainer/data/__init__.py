"""Streaming data path: shard manifests -> deterministic, resumable, rank-balanced batches.

Modules, in the order data flows: order (epoch order, dealing to ranks/workers), shards (tar
reading), stream (worker-side batch building), decode and augment (JPEG decode, crop, resize,
flip, jitter, normalise; GPU and CPU paths), text (token ids), loader (the trainer-facing
object). See docs/loader.md.
"""

from .config import AugmentConfig, DataConfig
from .loader import StreamingLoader, build_loader

__all__ = ["AugmentConfig", "DataConfig", "StreamingLoader", "build_loader"]
