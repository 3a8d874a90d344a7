"""Image-classification datasets on the hub in parquet layout (CIFAR-10/100 and the like).

Layout: `<config>/<split>-NNNNN-of-NNNNN.parquet` (or `data/<split>-*.parquet`), one row per
image with an image column (a struct {bytes, path}, as `datasets` writes an Image feature, or
plain binary) and an integer label column. `uoft-cs/cifar10` has `img` and `label`;
`uoft-cs/cifar100` has `img`, `fine_label` and `coarse_label` (choose with `--label-column`);
both have the splits train and test. The class names come from the parquet files' Hugging Face
features metadata (a ClassLabel's `names`); without them the classes are the label numbers.

Written like ImageNet: `jpg` (re-encoded to a GPU-decodable JPEG when needed), `cls` (the label)
and `json` (source row, original size and format). A row without image bytes, an undecodable
image or a label outside the classes is a recorded reject, never a silent loss. Keys are
`<file stem>_<row>`, stable for a pinned revision. The files are streamed once and staged.
"""

from __future__ import annotations

import functools
import json
import re

from shardify.format import ShardifyError, make_key
from shardify.images import DEFAULT_MAX_PIXELS, normalise_image
from shardify.records import Item, Reject
from shardify.sources.base import ListContext, Reader, Source
from shardify.staging import LocalFileReader, stage_units
from shardify.storage import Location

SPLITS = ("train", "validation", "test")


def dataset_name(repo: str) -> str:
    """'uoft-cs/cifar10' -> 'cifar10' (what the manifest and `trainer report` call it)."""
    return repo.rstrip("/").rsplit("/", 1)[-1].lower()


class HFImagesSource(Source):
    """An image-classification dataset in the hub's parquet layout, from a Location."""

    fields = ("cls", "jpg", "json")

    def __init__(self, location: Location, repo: str, image_column: str = "img", label_column: str = "label",
                 name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.loc = location
        self.repo = repo
        self.image_column, self.label_column = image_column, label_column
        self.dataset = name or dataset_name(repo)
        self.max_pixels = max_pixels
        self._names: list[str] | None = None
        if not any(f.endswith(".parquet") for f in location.files):
            raise ShardifyError(f"{repo}: no parquet files (expected <config>/<split>-NNNNN-of-NNNNN.parquet)")

    # ---- description
    def describe(self) -> dict:
        return {**self.loc.describe(), "id": self.loc.repo_id or self.repo, "layout": "parquet"}

    def options(self) -> dict:
        return {"image_column": self.image_column, "label_column": self.label_column, "max_pixels": self.max_pixels}

    def split_files(self, split: str) -> list[str]:
        return [f for f in self.loc.files if re.search(rf"(^|/){split}(-\d+-of-\d+|-[^/]*)?\.parquet$", f)]

    def splits(self) -> list[str]:
        return [s for s in SPLITS if self.split_files(s)]

    def class_names(self) -> list[str]:
        """The label column's ClassLabel names from the first file's metadata (checked to name
        the column), or [] when the files carry none."""
        if self._names is None:
            import pyarrow.parquet as pq

            first = next(f for s in self.splits() for f in self.split_files(s))
            with self.loc.open(first) as raw:
                schema = pq.ParquetFile(raw).schema_arrow
            self._check_columns(first, schema.names)
            meta = json.loads((schema.metadata or {}).get(b"huggingface", b"{}") or b"{}")
            feature = ((meta.get("info") or {}).get("features") or {}).get(self.label_column) or {}
            self._names = [str(n) for n in feature.get("names") or []]
        return self._names

    def _check_columns(self, rel: str, names: list[str]) -> None:
        for what, col in (("--image-column", self.image_column), ("--label-column", self.label_column)):
            if col not in names:
                raise ShardifyError(f"{rel}: no column {col!r} ({what}); columns: {', '.join(names)}")

    def manifest_extras(self) -> dict:
        names = self.class_names()
        return {"classes": names, "class_names": names} if names else {}

    # ---- listing
    def list_items(self, split: str, ctx: ListContext) -> list[Item]:
        files = self.split_files(split)
        self.class_names()  # a wrong column name fails here, before any staging
        return stage_units(functools.partial(self._stream_unit, split), files, ctx.stage_dir, ctx)

    def _stream_unit(self, split: str, rel: str):
        """Yield (key, origin, payload, meta) for every row of one parquet file."""
        import pyarrow.parquet as pq

        stem = rel.rsplit("/", 1)[-1].removesuffix(".parquet")
        with self.loc.open(rel) as raw:
            pf = pq.ParquetFile(raw)
            self._check_columns(rel, pf.schema_arrow.names)
            row = 0
            for batch in pf.iter_batches(batch_size=256, columns=[self.image_column, self.label_column]):
                images = batch.column(self.image_column).to_pylist()
                labels = batch.column(self.label_column).to_pylist()
                for image, label in zip(images, labels):
                    if isinstance(image, (bytes, bytearray)):  # a plain binary image column
                        payload = bytes(image)
                    else:  # an Image feature's {bytes, path}; a null row has no bytes (a reject)
                        payload = (image.get("bytes") if isinstance(image, dict) else None) or b""
                    yield make_key(f"{stem}_{row:07d}"), f"{rel}#{row}", payload, {"label": label}
                    row += 1

    # ---- reading and encoding (worker side)
    def open_reader(self, split: str) -> Reader:
        return _StagedReader()

    def encode(self, item: Item, payload: bytes) -> dict[str, bytes]:
        label = item.meta.get("label")
        n = len(self.class_names())  # read once per process
        if not isinstance(label, int) or label < 0 or (n and label >= n):
            raise Reject("no_label", f"label {label!r} is not a class index" + (f" in 0..{n - 1}" if n else ""))
        if not payload:
            raise Reject("unreadable", "the row has no image bytes")
        jpeg, info = normalise_image(payload, self.max_pixels)
        meta = {"source": item.origin, "reencoded_from": "", **info}
        return {"jpg": jpeg, "cls": str(label).encode(), "json": json.dumps(meta, sort_keys=True).encode()}


class _StagedReader(Reader):
    def __init__(self):
        self._files = LocalFileReader()

    def read(self, item: Item) -> bytes:
        path, offset, size = item.loc
        return self._files.read_at(path, offset, size)

    def close(self) -> None:
        self._files.close()
