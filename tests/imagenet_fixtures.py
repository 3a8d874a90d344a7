"""Build tiny ImageNet copies in every hub/local layout, with known good and bad inputs.

Keys encode where a sample came from (`n01443537_00003`), so tests can assert order and labels.
The bad inputs are the kinds real ImageNet has or users meet: CMYK JPEGs, a PNG named .JPEG,
grayscale JPEGs (kept as is), and the kinds that must be rejected: zero-byte, truncated,
garbage, a decompression bomb (a PNG whose header claims 40000x40000 pixels).
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from shardify.cli import main

SYNSETS = ["n01440764", "n01443537", "n01484850"]  # labels 0, 1, 2 in the canonical order
UNKNOWN = "n99999999"  # a synset that is not an ImageNet-1k class: its image has no label


def label_of(synset: str) -> int | None:
    return SYNSETS.index(synset) if synset in SYNSETS else None


def jpeg_bytes(seed: int, size=(40, 30), mode="RGB", quality=90) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def png_bytes(seed: int, size=(24, 20)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 4)) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr, "RGBA").save(out, format="PNG")
    return out.getvalue()


def bomb_png(width=40000, height=40000) -> bytes:
    """A tiny PNG whose header claims a huge image (never decoded by a correct pipeline)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def good_images(split: str, per_class: int = 4, first_seed: int = 0) -> list[tuple[str, str, bytes]]:
    """(image id, synset, bytes) for normal RGB and grayscale JPEGs."""
    out = []
    for c, synset in enumerate(SYNSETS):
        for i in range(per_class):
            seed = first_seed + c * 100 + i
            if split == "train":
                image_id = f"{synset}_{i:05d}"
            else:
                image_id = f"ILSVRC2012_val_{c * per_class + i + 1:08d}"
            mode = "L" if i == 1 else "RGB"  # some grayscale, kept byte for byte
            out.append((image_id, synset, jpeg_bytes(seed, size=(40 + i, 30 + c), mode=mode)))
    return out


def special_images() -> list[tuple[str, str, bytes, str]]:
    """(image id, synset, bytes, expected outcome) for the awkward inputs, all in train."""
    good = jpeg_bytes(999, size=(64, 48))
    cmyk = io.BytesIO()
    Image.open(io.BytesIO(good)).convert("CMYK").save(cmyk, format="JPEG", quality=90)
    return [
        (f"{SYNSETS[0]}_90001", SYNSETS[0], cmyk.getvalue(), "reencoded:cmyk-jpeg"),
        (f"{SYNSETS[1]}_90002", SYNSETS[1], png_bytes(7), "reencoded:png"),
        (f"{SYNSETS[2]}_90003", SYNSETS[2], b"", "reject:empty"),
        (f"{SYNSETS[0]}_90004", SYNSETS[0], good[: len(good) // 2], "reject:truncated"),
        (f"{SYNSETS[1]}_90005", SYNSETS[1], b"this is not an image at all", "reject:unreadable"),
        (f"{SYNSETS[2]}_90006", SYNSETS[2], bomb_png(), "reject:too_many_pixels"),
        (f"{UNKNOWN}_90007", UNKNOWN, good, "reject:no_label"),  # not one of the 1000 classes
    ]


def all_inputs(split: str, per_class: int = 4, specials: bool = True):
    items = [(i, s, b, "ok") for i, s, b in good_images(split, per_class)]
    if specials and split == "train":
        items += special_images()
    return items


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_archives(root: Path, per_class: int = 4, specials: bool = True, n_train_archives: int = 2) -> Path:
    """The loading-script layout: data/train_images_K.tar.gz, data/val_images.tar.gz."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    train = all_inputs("train", per_class, specials)
    for k in range(n_train_archives):
        with tarfile.open(root / "data" / f"train_images_{k}.tar.gz", "w:gz") as tar:
            for image_id, synset, data, _ in train[k::n_train_archives]:
                _tar_add(tar, f"{image_id}_{synset}.JPEG", data)
    with tarfile.open(root / "data" / "val_images.tar.gz", "w:gz") as tar:
        for image_id, synset, data, _ in all_inputs("validation", per_class):
            _tar_add(tar, f"{image_id}_{synset}.JPEG", data)
    return root


def write_imagefolder(root: Path, per_class: int = 4, specials: bool = True) -> Path:
    for split, dirname in (("train", "train"), ("validation", "val")):
        for image_id, synset, data, _ in all_inputs(split, per_class, specials):
            path = root / dirname / synset / f"{image_id}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return root


def write_parquet(root: Path, per_class: int = 4, specials: bool = True, files_per_split: int = 2) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "data").mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation"):
        rows = all_inputs(split, per_class, specials)
        for k in range(files_per_split):
            part = rows[k::files_per_split]
            images = [{"bytes": data, "path": f"{image_id}_{synset}.JPEG"} for image_id, synset, data, _ in part]
            labels = [label_of(synset) for _, synset, _, _ in part]
            table = pa.table({"image": images, "label": labels})
            pq.write_table(table, root / "data" / f"{split}-{k:05d}-of-{files_per_split:05d}.parquet")
    return root


def write_wds(root: Path, per_class: int = 4, specials: bool = True, tars_per_split: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation"):
        rows = all_inputs(split, per_class, specials)
        for k in range(tars_per_split):
            with tarfile.open(root / f"imagenet1k-{split}-{k:04d}.tar", "w") as tar:
                for image_id, synset, data, _ in rows[k::tars_per_split]:
                    _tar_add(tar, f"{image_id}.jpg", data)
                    if label_of(synset) is not None:  # no cls member: a sample without a label
                        _tar_add(tar, f"{image_id}.cls", str(label_of(synset)).encode())
                    _tar_add(tar, f"{image_id}.json", json.dumps({"filename": image_id}).encode())
    return root


LAYOUT_WRITERS = {
    "archives": write_archives,
    "imagefolder": write_imagefolder,
    "parquet": write_parquet,
    "wds": write_wds,
}


def run_cli(*args, expect=0):
    """The shardify CLI in-process; asserts its exit code."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return result


def shard(source, out, *extra, expect=0):
    """`shardify imagenet` with small shards, a lenient reject rate and no progress bar."""
    return run_cli("imagenet", "--source", source, "--out", out, "--samples-per-shard", 5,
                   "--max-reject-rate", 0.5, "--no-progress", *extra, expect=expect)


# A `shardify` process whose workers block forever on one image (`<synset>_77777.JPEG`), so that
# a test can signal or kill the run while it is certainly writing. (A named pipe used to play
# this part; shardify now rejects those without opening them.)
BLOCKING_SHARDIFY = (
    "import threading\n"
    "from shardify.sources import imagenet\n"
    "read = imagenet._ImageNetReader.read\n"
    "def blocking_read(self, item):\n"
    "    if item.origin.endswith('_77777.JPEG'):\n"
    "        threading.Event().wait()\n"
    "    return read(self, item)\n"
    "imagenet._ImageNetReader.read = blocking_read\n"
    "from shardify.cli import run\n"
    "run()\n"
)


def blocking_source(root: Path) -> Path:
    """An ImageFolder copy with the one image BLOCKING_SHARDIFY's workers never finish reading."""
    src = write_imagefolder(root, per_class=4, specials=False)
    (src / "train" / SYNSETS[0] / f"{SYNSETS[0]}_77777.JPEG").write_bytes(jpeg_bytes(77777))
    return src
