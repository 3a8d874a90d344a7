"""Pair datasets whose images come in zip files: COCO Karpathy and Flickr30k.

Zips can be read at random (local or through the hub's file system), so nothing is staged:
an item is (zip, member) plus its caption. One sample per (image, caption) pair; the image's
id is kept in `json` so retrieval can group captions by image.

COCO Karpathy, local layout (`--source DIR`, also any hub repo holding the same files, `--repo`):
    train2014.zip   members train2014/COCO_train2014_000000000009.jpg ...
    val2014.zip     members val2014/COCO_val2014_000000000042.jpg ...
    dataset_coco.json   Karpathy's split: images[] with filepath, filename, cocoid, split
                        (train / restval / val / test), sentences[].raw
  Splits: train (= train + restval, 566,747 pairs), val, test (5,000 images, 25,010 pairs).
Flickr30k (`nlphuji/flickr30k`): flickr30k-images.zip + flickr_annotations_30k.csv with columns
  raw (JSON list of the captions), sentids, split (train/val/test), filename, img_id.
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from shardify.format import ShardifyError, make_key
from shardify.records import Item
from shardify.sources.base import ListContext, Reader, Source
from shardify.sources.pairs import PAIR_FIELDS, ImageOptions, PairFileReader, encode_pair, find_file
from shardify.staging import unit_error


@dataclass
class _ZipPairSource(Source):
    loc: object
    image: ImageOptions = field(default_factory=ImageOptions)

    fields = PAIR_FIELDS
    layout = "zip"

    def describe(self) -> dict:
        return {**self.loc.describe(), "layout": self.layout}

    def options(self) -> dict:
        return {"image": self.image.to_dict()}

    def open_reader(self, split: str) -> Reader:
        return PairFileReader(self.loc)

    def encode(self, item: Item, payload: bytes) -> dict[str, bytes]:
        return encode_pair(item, payload, self.image, self.dataset)

    def _require(self, basename: str) -> str:
        rel = find_file(self.loc.files, basename)
        if rel is None:
            where = self.loc.local_path or self.loc.repo_id
            raise ShardifyError(f"{where} has no {basename} (the {self.dataset} layout needs it; "
                                f"see docs/datasets/{self.dataset}.md)")
        return rel

    def _zip_names(self, rel: str) -> dict[str, str]:
        """{basename: member} of a zip (its central directory only)."""
        try:
            with self.loc.open(rel) as f, zipfile.ZipFile(f) as z:
                return {n.rsplit("/", 1)[-1]: n for n in z.namelist() if not n.endswith("/")}
        except (zipfile.BadZipFile, EOFError, OSError) as exc:
            raise unit_error(rel, exc) from None

    @staticmethod
    def _pairs(key: str, origin: str, loc, captions: list[str], meta: dict, missing: str | None) -> list[Item]:
        items = []
        for k, caption in enumerate(captions):
            m = {**meta, "caption": caption, "caption_index": k}
            if missing:
                m.update(reject="missing", detail=missing)
            items.append(Item(key=f"{key}-{k}", origin=f"{origin}#caption{k}", loc=loc, meta=m))
        return items


class CocoKarpathySource(_ZipPairSource):
    dataset = "coco-karpathy"
    hub_id = None  # no hub mirror in this layout is assumed; pass --repo to use one
    SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}

    def splits(self) -> list[str]:
        return list(self.SPLITS)

    def list_items(self, split: str, ctx: ListContext) -> Iterator[Item]:
        with self.loc.open(self._require("dataset_coco.json")) as f:
            images = json.load(f)["images"]
        wanted = self.SPLITS[split]
        zips: dict[str, tuple[str, dict]] = {}
        count = 0
        for img in images:
            if img.get("split") not in wanted:
                continue
            folder, filename = img["filepath"], img["filename"]
            if folder not in zips:
                rel = self._require(f"{folder}.zip")
                zips[folder] = (rel, self._zip_names(rel))
            rel, names = zips[folder]
            member = names.get(filename)
            missing = None if member else f"{filename} is not in {rel}"
            cocoid = int(img["cocoid"])
            meta = {"image_id": cocoid, "karpathy_split": img["split"], "filename": filename}
            captions = [s["raw"] for s in img.get("sentences", [])]
            sentids = [s.get("sentid") for s in img.get("sentences", [])]
            pairs = self._pairs(f"coco{cocoid}", f"{rel}:{member or filename}", ("zip", rel, member),
                                captions, meta, missing)
            for item, sentid in zip(pairs, sentids):
                item.meta["sentid"] = sentid
            yield from pairs
            count += len(pairs)
            ctx.progress(f"{count} pairs", count)


class Flickr30kSource(_ZipPairSource):
    dataset = "flickr30k"
    hub_id = "nlphuji/flickr30k"

    def splits(self) -> list[str]:
        return ["train", "val", "test"]

    def list_items(self, split: str, ctx: ListContext) -> Iterator[Item]:
        csv_rel = self._require("flickr_annotations_30k.csv")
        zip_rel = self._require("flickr30k-images.zip")
        names = self._zip_names(zip_rel)
        with self.loc.open(csv_rel) as f:
            rows = list(csv.DictReader(io.TextIOWrapper(f, encoding="utf-8", newline="")))
        for row in rows:
            if row.get("split") != split:
                continue
            filename = row["filename"]
            member = names.get(filename)
            missing = None if member else f"{filename} is not in {zip_rel}"
            stem = filename.rsplit(".", 1)[0]
            try:
                captions = json.loads(row["raw"])
            except (json.JSONDecodeError, KeyError) as exc:
                raise ShardifyError(f"{csv_rel}: row for {filename} has no JSON list in `raw` ({exc})") from None
            image_id = int(stem) if stem.isdigit() else stem
            meta = {"image_id": image_id, "filename": filename, "karpathy_split": split}
            yield from self._pairs(f"f30k{make_key(stem)}", f"{zip_rel}:{member or filename}",
                                   ("zip", zip_rel, member), captions, meta, missing)
