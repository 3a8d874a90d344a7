"""ImageNet-1k (ILSVRC 2012) in every layout it has had, on the hub or in a local directory.

Layouts, recognised from the file list:
- `archives`: `data/train_images_{0..4}.tar.gz`, `data/val_images.tar.gz`,
  `data/test_images.tar.gz` with members `<image_id>_<synset>.JPEG` (the hub's loading-script
  era). Streamed once and staged (gzip has no random access).
- `parquet`: `data/{split}-NNNNN-of-NNNNN.parquet` with columns `image` {bytes, path} and
  `label` (the hub's parquet conversion). Streamed by record batch and staged.
- `wds`: a WebDataset mirror like `timm/imagenet-1k-wds` (`*-train-NNNN.tar`,
  `*-validation-NNNN.tar` with `jpg`/`cls` members). Local tars are read in place.
- `imagefolder`: the classic `train/<synset>/*.JPEG`, `val/<synset>/*.JPEG` tree (local only).

Labels are the position of the synset in the canonical sorted list of the 1000 synsets
(shardify/data/imagenet_classes.tsv), so every layout gives the same `cls` for an image.
Keys are the original image ids (`n01440764_10026`, `ILSVRC2012_val_00000001`).
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from shardify.format import ShardifyError, make_key
from shardify.images import DEFAULT_MAX_PIXELS, normalise_image
from shardify.records import Item, Reject
from shardify.sources.base import ListContext, Reader, Source
from shardify.sources.wds_tar import IMAGE_EXTS, image_member, tar_samples
from shardify.staging import LocalFileReader, stage_units, unit_error
from shardify.storage import Location

HUB_ID = "ILSVRC/imagenet-1k"
SPLITS = ("train", "validation", "test")
_SYNSET_SUFFIX = re.compile(r"_(n\d{8})$")
_IMAGE_EXT = (".jpeg", ".jpg", ".png")


@functools.cache
def imagenet_classes() -> tuple[list[str], list[str]]:
    """(synsets, names) in canonical order: label i is synsets[i]."""
    # beside the package's modules (package data; importlib.resources would add its own imports)
    text = (Path(__file__).parents[1] / "data" / "imagenet_classes.tsv").read_text("utf-8")
    rows = [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]
    return [r[0] for r in rows], [r[1] for r in rows]


@functools.cache
def _synset_index() -> dict[str, int]:
    return {s: i for i, s in enumerate(imagenet_classes()[0])}


def _split_image_name(stem: str) -> tuple[str, str | None]:
    """'n01440764_10026_n01440764' -> ('n01440764_10026', 'n01440764'); no suffix -> (stem, None)."""
    m = _SYNSET_SUFFIX.search(stem)
    if m and m.start() > 0:
        return stem[: m.start()], m.group(1)
    return stem, None


def _folders(split: str) -> tuple[str, ...]:
    """imagefolder: the top folders a split's images are in."""
    return ("val", "validation") if split == "validation" else (split,)


def _printable(rel: str) -> str:
    """A listed path as text: bytes of a name that is not valid UTF-8 (which Python lists as
    surrogate escapes, and which no JSON file or key can hold) written as `\\xff`, so the
    name's key and origin stay unique and say which file it was."""
    if rel.isascii():
        return rel
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _basename_stem(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0] if "." in name else name


def _wds_samples(tar: tarfile.TarFile, read_images: bool):
    """Yield (key, (image member, bytes or None) or None, label or None) per WebDataset sample.

    Members of a sample are adjacent (the WebDataset convention); `read_images=False` reads only
    the small `cls` members, for tars read in place later.
    """
    for key, group in tar_samples(tar, lambda ext: ext == "cls" or read_images and ext in IMAGE_EXTS):
        try:
            label = int(group["cls"][1].strip()) if "cls" in group else None
        except ValueError:
            label = None  # rejected as no_label when written
        yield key, image_member(group), label


_ARCHIVE = re.compile(r"data/(train_images_\d+|val_images|test_images)\.tar\.gz")
_WDS_TAR = re.compile(r"-(train|validation|val)-\d+\.tar$")
_SYNSET_DIR = re.compile(r"(train|val|validation)/n\d{8}/")


def detect_layout(files: list[str]) -> str:
    if any(_ARCHIVE.fullmatch(f) for f in files if f.startswith("data/")):
        return "archives"
    if any(f.endswith(".parquet") for f in files):
        return "parquet"
    if any(_WDS_TAR.search(f) for f in files if f.endswith(".tar")):
        return "wds"
    if any(_SYNSET_DIR.match(f) for f in files):
        return "imagefolder"
    raise ShardifyError(
        "cannot recognise an ImageNet layout here: expected data/*_images*.tar.gz archives, "
        "parquet files, a WebDataset mirror (*-train-NNNN.tar) or train/<synset>/*.JPEG folders"
    )


class ImageNetSource(Source):
    """ImageNet-1k from a Location (hub repo at a commit, or a local directory)."""

    dataset = "imagenet"
    fields = ("cls", "jpg", "json")

    def __init__(self, location: Location, max_pixels: int = DEFAULT_MAX_PIXELS, layout: str | None = None):
        self.loc = location
        self.layout = layout or detect_layout(location.files)
        self.max_pixels = max_pixels
        self._files_of: dict[str, list[str]] = {}  # split -> its files
        self._groups: dict | None = None  # imagefolder: see _by_folder
        if self.layout == "imagefolder" and location.local_path is None:
            raise ShardifyError("the imagefolder layout is only supported for a local --source DIR")

    # ---- description
    def describe(self) -> dict:
        return {**self.loc.describe(), "id": self.loc.repo_id or HUB_ID, "layout": self.layout}

    def options(self) -> dict:
        return {"max_pixels": self.max_pixels}

    def manifest_extras(self) -> dict:
        synsets, names = imagenet_classes()
        return {"classes": synsets, "class_names": names}

    def splits(self) -> list[str]:
        return [s for s in SPLITS if self._split_files(s)]

    def _split_files(self, split: str) -> list[str]:
        if split not in self._files_of:
            self._files_of[split] = self._find_split_files(split)
        return self._files_of[split]

    def _find_split_files(self, split: str) -> list[str]:
        files = self.loc.files
        if self.layout == "archives":
            pattern = {"train": r"data/train_images_\d+\.tar\.gz", "validation": r"data/val_images\.tar\.gz",
                       "test": r"data/test_images\.tar\.gz"}[split]
            chosen = [f for f in files if re.fullmatch(pattern, f)]
            return sorted(chosen, key=lambda f: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", f)])
        if self.layout == "parquet":
            return [f for f in files if f.endswith(".parquet")
                    and re.search(rf"(^|/)({split})(-\d+-of-\d+|/[^/]*|-[^/]*)\.parquet$", f)]
        if self.layout == "wds":
            names = {"validation": ("validation", "val")}.get(split, (split,))
            return [f for f in files if re.search(rf"-({'|'.join(names)})-\d+\.tar$", f)]
        return self._in_folders(split, images=True)  # imagefolder

    def _in_folders(self, split: str, images: bool) -> list[str]:
        """imagefolder: the image files (or the other files) under the split's top folders."""
        groups = self._by_folder()
        return [f for top in _folders(split) for f in groups.get(top, ((), ()))[0 if images else 1]]

    def _by_folder(self) -> dict[str, tuple[list[str], list[str]]]:
        """imagefolder: top folder -> (its image files, its other files), in one pass over the
        listing (sorted, so 'val/' comes before 'validation/' as in the listing)."""
        if self._groups is None:
            groups: dict[str, tuple[list[str], list[str]]] = {}
            for f in self.loc.files:
                images, others = groups.setdefault(f.split("/", 1)[0], ([], []))
                (images if f.lower().endswith(_IMAGE_EXT) else others).append(f)
            self._groups = groups
        return self._groups

    # ---- listing
    def list_items(self, split: str, ctx: ListContext) -> Iterator[Item]:
        for item in self._list(split, ctx):
            if split == "test":  # ImageNet's test labels are unknown by design: not a reject
                item.meta["test"] = True
            yield item

    def _list(self, split: str, ctx: ListContext) -> Iterable[Item]:
        files = self._split_files(split)
        if self.layout == "imagefolder":
            return itertools.chain(self._list_folder(files), self._not_taken(split))
        if self.layout == "wds" and self.loc.local_path is not None:
            return (it for rel in files for it in self._list_local_wds(rel))
        return stage_units(functools.partial(self._stream_unit, split), files, ctx.stage_dir, ctx)

    def _list_folder(self, files: list[str]) -> Iterator[Item]:
        for rel in files:
            name = _printable(rel)
            yield Item(key=make_key(_basename_stem(name)), origin=name, loc=(self.loc.path(rel), 0, None),
                       meta={"synset": name.split("/")[1]})

    def _not_taken(self, split: str) -> list[Item]:
        """Files under the split's folder that the layout does not read (other extensions,
        hidden files and folders, named pipes and other special files, links that loop): inputs
        all the same, so they are rejected with a reason instead of vanishing from the count."""
        dirs = _folders(split)
        out = []
        for rel in map(_printable, self._in_folders(split, images=False)):
            ext = rel.rsplit("/", 1)[-1].rpartition(".")[2] if "." in rel.rsplit("/", 1)[-1] else ""
            detail = (f"extension .{ext}" if ext else "no extension") + \
                f" is not one the imagefolder layout reads ({', '.join(_IMAGE_EXT)})"
            out.append(Item(key=make_key(rel), origin=rel, meta={"reject": "ignored_file", "detail": detail}))
        hidden = [(rel, "hidden folder, its files are not read" if rel.endswith("/") else "hidden file")
                  for rel in self.loc.hidden]
        for rel, what in hidden + list(self.loc.skipped):
            if rel.split("/", 1)[0] in dirs:
                rel = _printable(rel)
                out.append(Item(key=make_key(rel.rstrip("/")), origin=rel,
                                meta={"reject": "ignored_file", "detail": what}))
        return out

    def _stream_unit(self, split: str, rel: str):
        """Yield (key, origin, payload, meta) for every image of one archive/parquet/tar unit."""
        if self.layout == "archives":
            with self.loc.open(rel, stream=True) as raw, tarfile.open(fileobj=raw, mode="r|gz") as tar:
                for member in tar:
                    if not member.isfile() or not member.name.lower().endswith(_IMAGE_EXT):
                        continue
                    key, synset = _split_image_name(_basename_stem(member.name))
                    payload = tar.extractfile(member).read()
                    yield make_key(key), f"{rel}:{member.name}", payload, {"synset": synset}
        elif self.layout == "parquet":
            yield from self._stream_parquet(split, rel)
        else:  # remote wds tar: stream and stage
            with self.loc.open(rel, stream=True) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
                for key, image, label in _wds_samples(tar, read_images=True):
                    yield make_key(key), f"{rel}:{key}", image[1] if image else b"", {"synset": None, "label": label}

    def _stream_parquet(self, split: str, rel: str):
        import pyarrow.parquet as pq

        with self.loc.open(rel) as raw:
            pf = pq.ParquetFile(raw)
            names = pf.schema_arrow.names
            if "image" not in names:
                raise ShardifyError(f"{rel}: parquet file has no 'image' column (columns: {names})")
            columns = ["image"] + (["label"] if "label" in names else [])
            row = 0
            for batch in pf.iter_batches(batch_size=256, columns=columns):
                images = batch.column("image").to_pylist()
                labels = batch.column("label").to_pylist() if "label" in columns else [None] * len(images)
                for image, label in zip(images, labels):
                    if isinstance(image, (bytes, bytearray)):  # a plain binary image column
                        image = {"bytes": bytes(image)}
                    elif not isinstance(image, dict):
                        image = {}
                    path = image.get("path") or ""
                    if path:
                        key, synset = _split_image_name(_basename_stem(path))
                    else:
                        key, synset = f"{split}_{_basename_stem(rel)}_{row:07d}", None
                    payload = image.get("bytes") or b""
                    yield make_key(key), f"{rel}#{row}", payload, {"synset": synset, "label": label}
                    row += 1

    def _list_local_wds(self, rel: str) -> list[Item]:
        """Local mirror tars are read in place: list the image members with their data offsets."""
        path = self.loc.path(rel)
        try:
            with tarfile.open(path, mode="r:") as tar:
                return [Item(key=make_key(key), origin=f"{rel}:{key}",
                             loc=(path, image[0].offset_data, image[0].size) if image else (path, 0, 0),
                             meta={"synset": None, "label": label})
                        for key, image, label in _wds_samples(tar, read_images=False)]
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise unit_error(rel, exc) from None

    # ---- reading and encoding (worker side)
    def open_reader(self, split: str) -> Reader:
        return _ImageNetReader()

    def encode(self, item: Item, payload: bytes) -> dict[str, bytes]:
        label = _label(item)  # before decoding: a sample without a label is rejected cheaply
        jpeg, info = normalise_image(payload, self.max_pixels)
        # Every sample's json has the same keys with the same types: HF datasets infers the
        # schema from the first samples, so a key that shows up later is dropped, and one that
        # is null there cannot take a string later. "" means "not re-encoded".
        meta = {"source": item.origin, "reencoded_from": "", "synset": None, **info}
        fields = {"jpg": jpeg}
        if label is not None:
            meta["synset"] = imagenet_classes()[0][label]
            fields["cls"] = str(label).encode()
        fields["json"] = json.dumps(meta, sort_keys=True).encode()
        return fields


def _label(item: Item) -> int | None:
    """The canonical class index of an item; None for the (unlabelled) test split."""
    if item.meta.get("test"):
        return None
    label, synset = item.meta.get("label"), item.meta.get("synset")
    n_classes = len(imagenet_classes()[0])
    if label is not None and label >= 0:
        if label >= n_classes:
            raise Reject("no_label", f"label {label} is outside 0..{n_classes - 1}")
        return int(label)
    if synset:
        index = _synset_index().get(synset)
        if index is None:
            raise Reject("no_label", f"unknown synset {synset!r}")
        return index
    raise Reject("no_label", "the input has no class label")


class _ImageNetReader(Reader):
    def __init__(self):
        self._files = LocalFileReader()

    def read(self, item: Item) -> bytes:
        if "reject" in item.meta:
            raise Reject(item.meta["reject"], item.meta.get("detail", ""))
        path, offset, size = item.loc
        if size is None:
            with open(path, "rb") as f:
                return f.read()
        return self._files.read_at(path, offset, size)

    def close(self) -> None:
        self._files.close()
