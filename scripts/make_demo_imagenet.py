"""Build the demo ImageNet: a few classes of generated photos-like images in the hub archive layout.

    python scripts/make_demo_imagenet.py OUT_DIR [--per-class 24]

Writes OUT_DIR/data/train_images_0.tar.gz, train_images_1.tar.gz and val_images.tar.gz with
members `<image_id>_<synset>.JPEG`, exactly like the hub's loading-script layout. Each class
has its own shape and colour scheme (so a small model can learn something), sizes vary, and
the awkward cases real ImageNet has are included: grayscale JPEGs, CMYK JPEGs, a PNG named
.JPEG, plus one zero-byte and one truncated file that shardify must reject.
Deterministic: the same arguments give the same bytes.
"""

from __future__ import annotations

import argparse
import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331"]


def make_image(label: int, rng: np.random.Generator) -> Image.Image:
    w, h = int(rng.integers(96, 200)), int(rng.integers(80, 180))
    hue = label / len(CLASSES)
    base = np.array([np.cos(2 * np.pi * (hue + k / 3)) * 0.5 + 0.5 for k in range(3)]) * 255
    yy, xx = np.mgrid[0:h, 0:w]
    grad = (xx / w)[..., None] * 0.6 + 0.4
    arr = np.clip(base * grad + rng.normal(0, 18, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 5))):
        cx, cy, r = rng.integers(0, w), rng.integers(0, h), int(rng.integers(8, 30))
        colour = tuple(int(255 - c) for c in base)
        box = (cx - r, cy - r, cx + r, cy + r)
        shape = label % 3
        if shape == 0:
            draw.ellipse(box, fill=colour)
        elif shape == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return img.filter(ImageFilter.GaussianBlur(0.6))


def encode(img: Image.Image, kind: str) -> bytes:
    out = io.BytesIO()
    if kind == "gray":
        img.convert("L").save(out, format="JPEG", quality=88)
    elif kind == "cmyk":
        img.convert("CMYK").save(out, format="JPEG", quality=88)
    elif kind == "png":
        img.save(out, format="PNG")
    else:
        img.save(out, format="JPEG", quality=88)
    data = out.getvalue()
    if kind == "empty":
        return b""
    if kind == "truncated":
        return data[: len(data) // 3]
    return data


def build(out_dir: Path, per_class: int = 24, val_per_class: int = 6, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = out_dir / "data"
    out.mkdir(parents=True, exist_ok=True)
    train = []
    for label, synset in enumerate(CLASSES):
        for i in range(per_class):
            kind = "jpeg"
            if i == 3:
                kind = "gray"
            elif i == 5 and label % 2 == 0:
                kind = "cmyk"
            elif i == 7 and label == 1:
                kind = "png"
            elif i == 9 and label == 2:
                kind = "empty"
            elif i == 11 and label == 3:
                kind = "truncated"
            train.append((f"{synset}_{i + 1:05d}_{synset}.JPEG", encode(make_image(label, rng), kind)))
    val = []
    for label, synset in enumerate(CLASSES):
        for i in range(val_per_class):
            index = label * val_per_class + i + 1
            val.append((f"ILSVRC2012_val_{index:08d}_{synset}.JPEG", encode(make_image(label, rng), "jpeg")))
    archives = {"train_images_0.tar.gz": train[0::2], "train_images_1.tar.gz": train[1::2], "val_images.tar.gz": val}
    for name, members in archives.items():
        with tarfile.open(out / name, "w:gz") as tar:
            for member, data in members:
                info = tarfile.TarInfo(member)
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    return {"train": len(train), "validation": len(val)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--per-class", type=int, default=24)
    args = ap.parse_args()
    counts = build(args.out_dir, args.per_class)
    print(f"demo ImageNet in {args.out_dir}: {counts['train']} train and {counts['validation']} validation "
          f"images in {len(CLASSES)} classes (hub archive layout)")


if __name__ == "__main__":
    main()
