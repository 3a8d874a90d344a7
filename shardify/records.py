"""The records that flow through a shardify job: listed inputs, rejections, job options.

A source lists `Item`s (cheap: names and locations, no image bytes), a worker reads each item's
payload and the source encodes it into WebDataset fields, or raises `Reject` with a reason that
ends up in rejects.jsonl. Nothing is ever dropped without one of the two outcomes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")


MAX_KEY_LEN = 90  # key + "." + extension must fit the 100-byte ustar name field


def make_key(text: str) -> str:
    """Turn a file stem or id into a valid sample key (no dots, only [A-Za-z0-9_-], <= 90 chars).

    Over-long keys keep their first 73 characters and get a hash of the whole text, so they
    stay unique and still say where the sample came from.
    """
    key = _BAD_KEY_CHARS.sub("_", text)
    if not key:
        raise ValueError(f"cannot make a sample key from {text!r}")
    if len(key) > MAX_KEY_LEN:
        import hashlib

        key = key[:73] + "_" + hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
    return key


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


class UserError(Exception):
    """A mistake or a condition the user can fix; the CLI prints it as one line, exit 2."""
