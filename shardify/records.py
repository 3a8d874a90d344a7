"""The records that flow through a shardify job: listed inputs, rejections, job options.

A source lists `Item`s (cheap: names and locations, no image bytes), a worker reads each item's
payload and the source encodes it into WebDataset fields, or raises `Reject` with a reason that
ends up in rejects.jsonl. Nothing is ever dropped without one of the two outcomes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)  # millions of these are alive while a split is planned
class Item:
    """One input of a split, as listed by a source, before its payload is read."""

    key: str  # unique, dot-free sample key
    origin: str  # where it came from, human readable (path, archive:member, file#row)
    loc: Any = None  # opaque, picklable locator for the source's reader
    meta: dict = field(default_factory=dict)  # small per-input facts (label, synset, caption ...)


class Reject(Exception):
    """An input that cannot be written, with a machine-readable reason and a detail."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def reject_record(split: str, item: Item, rej: Reject, shard: str | None) -> dict:
    """A line of rejects.jsonl."""
    return {"split": split, "key": item.key, "source": item.origin, "reason": rej.reason,
            "detail": rej.detail, "shard": shard}
