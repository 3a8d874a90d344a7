"""Image-text pairs: what every pair dataset shares (sample encoding, reading, registry).

A pair sample is `jpg` (the image, normalised like ImageNet's: GPU-decodable JPEG, original
bytes kept when they already are one), `txt` (the caption, UTF-8) and `json` (image id,
source, original url when there is one, width, height, format, how it was changed).

The datasets are peer modules with the same shape:
- pairs_zip.py   COCO Karpathy (COCO 2014 zips + dataset_coco.json), Flickr30k (nlphuji zip + csv)
- pairs_wds.py   CC3M / CC12M from the pixparse WebDataset mirrors (re-sharded, not re-encoded)
- pairs_urls.py  URL-only lists (conceptual_captions, sbu, any csv/tsv/parquet/jsonl), downloaded
                 (the download summary and --retry-failed: shardify/download/retry.py)
"""

from __future__ import annotations

import io
import json
import zipfile
import zlib
from dataclasses import dataclass

from shardify.download.fetcher import check_image_bytes
from shardify.format import ShardifyError
from shardify.images import DEFAULT_MAX_PIXELS, normalise_image
from shardify.records import Item, Reject
from shardify.sources.base import Reader
from shardify.staging import LocalFileReader

PAIR_FIELDS = ("jpg", "txt", "json")
# Per-input facts in every pair's json (null when a dataset does not have them).
PAIR_JSON_KEYS = ("image_id", "url", "caption_index", "sentid", "karpathy_split", "filename", "orig_key")
_PAIR_STRING_KEYS = ("url", "karpathy_split", "filename", "orig_key")  # "" when absent
RESIZE_QUALITY = 95


@dataclass
class ImageOptions:
    """Image options shared by every pair dataset (all change bytes: in the fingerprint)."""

    max_side: int | None = None  # downscale so the longer side is at most this (None: keep)
    max_pixels: int = DEFAULT_MAX_PIXELS  # reject images above this many pixels (bombs)
    min_side: int = 10  # reject images whose shorter side is below this (1-pixel placeholders)

    def to_dict(self) -> dict:
        return {"max_side": self.max_side, "max_pixels": self.max_pixels, "min_side": self.min_side}


def _resize(jpeg: bytes, max_side: int) -> tuple[bytes, int, int]:
    from PIL import Image

    img = Image.open(io.BytesIO(jpeg))
    w, h = img.size
    scale = max_side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = img.convert("L" if img.mode == "L" else "RGB").resize(size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=RESIZE_QUALITY)
    return out.getvalue(), size[0], size[1]


def encode_pair(item: Item, payload: bytes, opts: ImageOptions, source_name: str) -> dict[str, bytes]:
    """jpg/txt/json fields of one pair, or raise Reject."""
    caption = item.meta.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise Reject("no_caption", "the caption is missing or empty")
    check_image_bytes(payload)  # the one check per sample: error pages and text are not images
    jpeg, info = normalise_image(payload, opts.max_pixels)
    width, height = info["width"], info["height"]
    if min(width, height) < opts.min_side:
        raise Reject("placeholder", f"{width}x{height} image (shorter side below --min-side {opts.min_side})")
    # Every sample's json has the same keys with the same types: HF datasets infers the schema
    # from the first samples, so a key that shows up later is dropped, and one that is null
    # there cannot take a string later. "" means "does not apply" for strings.
    meta = {"source": source_name, "origin": item.origin, "format": info["format"],
            "reencoded_from": info.get("reencoded_from", ""), "orig_width": width, "orig_height": height}
    if opts.max_side and max(width, height) > opts.max_side:
        jpeg, width, height = _resize(jpeg, opts.max_side)
    meta.update(width=width, height=height)
    for k in PAIR_JSON_KEYS:
        value = item.meta.get(k)
        meta[k] = "" if value is None and k in _PAIR_STRING_KEYS else value
    return {"jpg": jpeg, "txt": caption.encode("utf-8"),
            "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")}


class PairFileReader(Reader):
    """Reads images from zips, byte ranges of tars (local or hub) and staged files.

    Item.loc is ("zip", rel, member) | ("range", rel, offset, size) | ("staged", path, offset, size);
    an item listed with meta["reject"] raises that reject.
    """

    def __init__(self, loc):
        self.loc = loc
        self._zips: dict = {}
        self._files: dict = {}
        self._staged = LocalFileReader()

    def read(self, item: Item) -> bytes:
        if "reject" in item.meta:
            raise Reject(item.meta["reject"], item.meta.get("detail", ""))
        kind = item.loc[0]
        if kind == "zip":
            _, rel, member = item.loc
            z = self._zips.get(rel)
            if z is None:
                z = self._zips[rel] = zipfile.ZipFile(self.loc.open(rel))
            try:
                return z.read(member)
            except KeyError:
                raise Reject("missing", f"{member} is not in {rel}") from None
            except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                raise Reject("unreadable", f"{rel}:{member}: {type(exc).__name__}: {exc}") from None
        if kind == "range":
            _, rel, offset, size = item.loc
            f = self._files.get(rel)
            if f is None:
                f = self._files[rel] = self.loc.open(rel)
            f.seek(offset)
            data = f.read(size)
            if len(data) != size:
                raise Reject("truncated", f"{rel}: {len(data)} of {size} bytes at {offset}")
            return data
        if kind == "staged":
            return self._staged.read_at(*item.loc[1:])
        raise ValueError(f"unknown item location {item.loc!r}")

    def close(self) -> None:
        for z in self._zips.values():
            z.close()
        for f in self._files.values():
            f.close()
        self._zips.clear()
        self._files.clear()
        self._staged.close()


def find_file(files: list[str], basename: str) -> str | None:
    """The shortest path in `files` whose last component is `basename`."""
    hits = sorted((f for f in files if f.rsplit("/", 1)[-1] == basename), key=lambda f: (f.count("/"), f))
    return hits[0] if hits else None


# name -> (module, class); datasets are imported only when chosen
DATASETS = {
    "coco-karpathy": ("shardify.sources.pairs_zip", "CocoKarpathySource"),
    "flickr30k": ("shardify.sources.pairs_zip", "Flickr30kSource"),
    "cc3m": ("shardify.sources.pairs_wds", "CC3MSource"),
    "cc12m": ("shardify.sources.pairs_wds", "CC12MSource"),
    "conceptual_captions": ("shardify.sources.pairs_urls", "ConceptualCaptionsSource"),
    "sbu": ("shardify.sources.pairs_urls", "SBUSource"),
    "urls": ("shardify.sources.pairs_urls", "UrlListSource"),
}


def source_class(name: str):
    import importlib

    if name not in DATASETS:
        raise ShardifyError(f"unknown pair dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    module, cls = DATASETS[name]
    return getattr(importlib.import_module(module), cls)
