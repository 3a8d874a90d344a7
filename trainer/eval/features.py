"""Frozen features: pooling, extraction through the project's loader, and the on-disk cache.

Images are read with the loader's validation transform (resize the whole image to the model's
size, normalise), every sample exactly once: the remainder is padded with marked repeats and
the marks drop them. Extraction keeps both poolings of the image tokens ([CLS] and the mean of
the patch tokens), so switching `--pool` costs no second pass.

The cache is keyed by what decides the features: the SHA-256 of the model file, the SHA-256 of
each manifest (which pins every shard by its own SHA-256), the split, the image transform and a
format version. An entry is one `<key>.pt` of plain tensors and lists (read back with
`weights_only=True`) plus a readable `<key>.json`; it is written to a temporary name and
renamed, so an interrupted extraction never leaves an entry that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from shardify.checksum import sha256_file
from trainer.data import AugmentConfig, DataConfig, build_loader

CACHE_VERSION = 1
POOLS = ("cls", "mean")


def pool_tokens(tokens_BTD: torch.Tensor, pool: str) -> torch.Tensor:
    """[CLS] (token 0) or the mean of the other tokens (the patch tokens)."""
    if pool == "cls":
        return tokens_BTD[:, 0]
    if pool == "mean":
        return tokens_BTD[:, 1:].mean(dim=1)
    raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")


# -- fingerprints ------------------------------------------------------------------------------

_HASHES: dict[tuple, str] = {}


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (remembered per path, size and mtime within this process)."""
    st = os.stat(path)
    memo = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _HASHES:
        _HASHES[memo] = sha256_file(path)
    return _HASHES[memo]


def manifest_path(shards: str) -> str:
    return shards if shards.endswith(".json") else os.path.join(shards, "manifest.json")


def read_manifest(shards: str) -> tuple[dict, str]:
    """(manifest, sha256 of its bytes) of a shard directory or manifest path."""
    path = manifest_path(shards)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"manifest not found: {path}") from None
    try:
        return json.loads(raw), hashlib.sha256(raw).hexdigest()
    except ValueError as e:
        raise ValueError(f"cannot read manifest {path}: {e}") from None


def eval_data_config(shards: str, split: str, augment: AugmentConfig, batch_size: int, workers: int,
                     tokenizer: str = "", text_max_len: int = 64) -> DataConfig:
    """The loader settings of an evaluation pass: every sample once, in shard order, no augmentation."""
    aug = AugmentConfig(**{**asdict(augment), "train": False})
    return DataConfig(manifests=[shards], split=split, batch_size=batch_size, num_workers=workers, seed=0,
                      shuffle_buffer=0, remainder="pad", decode_device="auto", augment=aug,
                      tokenizer=tokenizer, text_max_len=text_max_len)


# -- extraction --------------------------------------------------------------------------------

def _progress(what: str, done: int, total: int, t0: float) -> None:
    if sys.stderr.isatty():
        print(f"\r{what}: {done}/{total} batches, {time.perf_counter() - t0:.0f}s", end="", file=sys.stderr,
              flush=True)


@torch.no_grad()
def extract_image_features(encoder: torch.nn.Module, data_cfg: DataConfig, device: torch.device,
                           what: str = "features") -> dict:
    """{"cls": [N, D], "mean": [N, D], "labels": [N], "keys": [N]} (float32 on CPU), in read order."""
    encoder = encoder.to(device).eval()
    loader = build_loader(data_cfg, 0, 1, device, "image")
    pooled = {p: [] for p in POOLS}
    labels, keys = [], []
    t0, total = time.perf_counter(), len(loader)
    for i, batch in enumerate(loader):
        keep = ~batch["is_pad"].to(torch.bool)
        tokens = encoder(batch["image"][keep].float())
        for p in POOLS:
            pooled[p].append(pool_tokens(tokens, p).float().cpu())
        labels.append(batch["label"][keep].cpu())
        keys.extend(k for k, m in zip(batch["key"], keep.tolist()) if m)
        _progress(what, i + 1, total, t0)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    return {**{p: torch.cat(v) for p, v in pooled.items()}, "labels": torch.cat(labels), "keys": keys}


@torch.no_grad()
def extract_pair_embeddings(image_encoder: torch.nn.Module, text_encoder: torch.nn.Module,
                            data_cfg: DataConfig, device: torch.device) -> dict:
    """Normalised token-0 embeddings of image-text pair shards (one sample per caption):
    {"images": [I, D], "image_ids": [I], "texts": [T, D], "caption_image_ids": [T]}. Each image
    id is embedded once, from its first sample."""
    image_encoder, text_encoder = image_encoder.to(device).eval(), text_encoder.to(device).eval()
    loader = build_loader(data_cfg, 0, 1, device, "image_text")
    images, image_ids, texts, caption_ids, seen = [], [], [], [], set()
    t0, total = time.perf_counter(), len(loader)
    for i, batch in enumerate(loader):
        keep = (~batch["is_pad"].to(torch.bool)).tolist()
        rows = [b for b, k in enumerate(keep) if k]
        ids = [batch["image_id"][b] for b in rows]
        t = text_encoder(batch["input_ids"][rows], batch["padding_mask"][rows])
        texts.append(F.normalize(t[:, 0].float(), dim=-1).cpu())
        caption_ids.extend(ids)
        new = []
        for b, iid in zip(rows, ids):
            if iid not in seen:
                seen.add(iid)
                new.append(b)
                image_ids.append(iid)
        if new:  # an image already embedded is not run again (5 captions = 5 samples per image)
            x = image_encoder(batch["image"][new].float())
            images.append(F.normalize(x[:, 0].float(), dim=-1).cpu())
        _progress("pairs", i + 1, total, t0)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    return {"images": torch.cat(images), "image_ids": image_ids, "texts": torch.cat(texts),
            "caption_image_ids": caption_ids}


# -- cache -------------------------------------------------------------------------------------

class FeatureCache:
    """Entries under `directory`, keyed by `key(**facts)`; `directory=None` disables caching."""

    def __init__(self, directory: str | Path | None):
        self.dir = Path(directory) if directory else None

    @staticmethod
    def key(**facts) -> str:
        facts = {"version": CACHE_VERSION, **facts}
        return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def get_or_compute(self, facts: dict, compute: Callable[[], dict]) -> tuple[dict, bool]:
        """(entry, was_cached)."""
        if self.dir is None:
            return compute(), False
        key = self.key(**facts)
        path = self.dir / f"{key}.pt"
        if path.is_file():
            try:
                return torch.load(path, map_location="cpu", weights_only=True), True
            except Exception as e:  # noqa: BLE001  (a damaged entry is recomputed, never trusted)
                print(f"feature cache entry {path} unreadable ({type(e).__name__}); recomputing", file=sys.stderr)
        entry = compute()
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        try:
            torch.save(entry, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        meta = {"version": CACHE_VERSION, **facts, "samples": len(entry.get("labels", entry.get("texts", [])))}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str) + "\n")
        return entry, False
