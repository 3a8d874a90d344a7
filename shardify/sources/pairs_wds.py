"""CC3M and CC12M from the pixparse WebDataset mirrors, re-sharded to our contract.

Layout (`pixparse/cc3m-wds`, `pixparse/cc12m-wds`, or a local copy with `--source DIR`):
    cc3m-train-0000.tar ... cc3m-validation-0000.tar ...   members {key}.jpg, {key}.txt, {key}.json
The split is the word between the dataset name and the tar number. Images are not re-encoded:
normalise_image keeps the original bytes of every JPEG a GPU decoder reads, and only fixes
the rare CMYK/PNG ones (the json says so).

Local tars are plain (uncompressed), so listing walks their headers and records each image's
byte range; workers read those ranges directly. From the hub, each tar is streamed once and its
images staged locally (shardify.staging), so no byte is downloaded twice.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from shardify.format import ShardifyError, make_key
from shardify.records import Item
from shardify.sources.base import ListContext, Reader, Source
from shardify.sources.pairs import PAIR_FIELDS, ImageOptions, PairFileReader, encode_pair
from shardify.sources.wds_tar import IMAGE_EXTS, image_member, tar_samples
from shardify.staging import stage_units, unit_error

_TAR_RE = re.compile(r"(?:^|/)(?P<name>[A-Za-z0-9_]+)-(?P<split>[A-Za-z]+)-(?P<n>\d+)\.tar$")


def _samples(tar: tarfile.TarFile, rel: str, with_bytes: bool):
    """(key, image member, image bytes or None, caption, json meta) per sample, in tar order."""
    for key, group in tar_samples(tar, lambda ext: ext in ("txt", "json") or with_bytes and ext in IMAGE_EXTS):
        meta = {}
        if "json" in group:
            try:
                meta = json.loads(group["json"][1])
            except ValueError:
                meta = {}
        caption = group["txt"][1].decode("utf-8", "replace") if "txt" in group else None
        yield key, image_member(group), caption, meta


def _item_fields(rel: str, split: str, key: str, image, caption, meta) -> tuple[str, str, dict]:
    """Key `{split}-{original key}`: mirrors number each split from 0, keys must be unique."""
    item_meta = {"caption": caption, "orig_key": key, "image_id": key, "url": meta.get("url")}
    if image is None:
        item_meta.update(reject="missing", detail="no image member in the sample")
    elif caption is None:
        item_meta.update(reject="no_caption", detail="no txt member in the sample")
    return make_key(f"{split}-{key}"), f"{rel}:{key}", item_meta


@dataclass
class _StageStreamer:
    """Streams one hub tar for staging (pickles into the staging processes)."""

    loc: object
    split: str

    def __call__(self, rel: str):
        with self.loc.open(rel) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for key, image, caption, meta in _samples(tar, rel, with_bytes=True):
                k, origin, item_meta = _item_fields(rel, self.split, key, image, caption, meta)
                yield k, origin, image[1] if image else b"", item_meta


@dataclass
class WdsPairSource(Source):
    loc: object
    image: ImageOptions = field(default_factory=ImageOptions)

    fields = PAIR_FIELDS
    name_prefix = ""  # tar names start with this, e.g. "cc3m"

    def __post_init__(self):
        self._tars: dict[str, list[str]] = {}
        for rel in self.loc.files:
            m = _TAR_RE.search(rel)
            if m and (not self.name_prefix or m.group("name") == self.name_prefix):
                self._tars.setdefault(m.group("split"), []).append(rel)
        if not self._tars:
            where = self.loc.local_path or self.loc.repo_id
            raise ShardifyError(f"{where} has no {self.name_prefix or 'NAME'}-SPLIT-NNNN.tar files "
                                f"(the WebDataset mirror layout; see docs/datasets/{self.dataset}.md)")
        for v in self._tars.values():
            v.sort()

    def describe(self) -> dict:
        return {**self.loc.describe(), "layout": "wds"}

    def options(self) -> dict:
        return {"image": self.image.to_dict()}

    def splits(self) -> list[str]:
        return sorted(self._tars)

    def list_items(self, split: str, ctx: ListContext) -> Iterator[Item]:
        tars = self._tars[split]
        if self.loc.local_path is None:  # the hub: stream each tar once, stage the images
            for item in stage_units(_StageStreamer(self.loc, split), tars, Path(ctx.stage_dir), ctx):
                item.loc = ("staged", *item.loc)
                yield item
            return
        count = 0
        for rel in tars:
            try:
                with self.loc.open(rel) as f, tarfile.open(fileobj=f, mode="r:") as tar:
                    for key, image, caption, meta in _samples(tar, rel, with_bytes=False):
                        k, origin, item_meta = _item_fields(rel, split, key, image, caption, meta)
                        loc = ("range", rel, image[0].offset_data, image[0].size) if image else None
                        yield Item(key=k, origin=origin, loc=loc, meta=item_meta)
                        count += 1
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise unit_error(rel, exc) from None
            ctx.progress(f"indexed {Path(rel).name}", count)

    def open_reader(self, split: str) -> Reader:
        return PairFileReader(self.loc)

    def encode(self, item: Item, payload: bytes) -> dict[str, bytes]:
        return encode_pair(item, payload, self.image, self.dataset)


class CC3MSource(WdsPairSource):
    dataset = "cc3m"
    hub_id = "pixparse/cc3m-wds"
    name_prefix = "cc3m"


class CC12MSource(WdsPairSource):
    dataset = "cc12m"
    hub_id = "pixparse/cc12m-wds"
    name_prefix = "cc12m"
