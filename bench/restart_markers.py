"""Experiment: would restart markers in the stored JPEGs speed up the CPU path's region decode?

    python bench/restart_markers.py --images ../shared/bench-images

The CPU path decodes only a crop's rows and columns (libturbojpeg 3's cropping region), but the
library must still entropy-decode every row above the crop to find where the crop's data
starts. With restart markers (RSTn) every k MCU rows, a decoder could start at the marker just
above the crop instead: cut the scan there, renumber the later markers and patch the frame
height. Adding markers to a stored file needs a transcode, so this is an experiment, not a
path of the loader. It re-encodes every photo twice with Pillow (quality 90, 4:2:0), without
markers and with a marker every k MCU rows, draws one torchvision RandomResizedCrop box per
photo, and times per photo on one core (medians of --repeats):

- the region decode of the file without markers (what the loader does today);
- the region decode of the file with markers, whole (the markers' own cost);
- the region decode of that file cut at the last marker above the crop, and the cut itself.

It first checks that a cut file decodes to the same pixels. A line per K reads
`restart markers every K rows: region decode Tx, after a cut Px, cut + decode Cx (time; today's = 1)`.
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import re
import statistics
import struct
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.data import tjregion  # noqa: E402
from trainer.data.decode import jpeg_size  # noqa: E402

RST = re.compile(rb"\xff[\xd0-\xd7]")


def frame_and_scan(data: bytes) -> tuple[int, int]:
    """(offset of the frame header's height field, offset of the first entropy-coded byte)."""
    i, height_at = 2, None
    while True:
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            height_at = i + 5
        if marker == 0xDA:
            return height_at, i + 2 + length
        i += 2 + length


def cut_at_row(data: bytes, row: int, every: int, mcu_h: int) -> tuple[bytes, int]:
    """A JPEG holding the MCU rows from the last restart marker at or above `row` down to the
    end (markers every `every` MCU rows), and how many pixel rows were dropped."""
    interval = row // every
    if interval == 0:
        return data, 0
    height_at, scan = frame_and_scan(data)
    start = [m.end() for m in RST.finditer(data, scan)][interval - 1]
    body = data[start:]
    if interval % 8:  # the first kept marker must read RST0, the next RST1, ...
        body = RST.sub(lambda m: bytes((0xFF, 0xD0 + (m.group()[1] - 0xD0 - interval) % 8)), body)
    dropped = interval * every * mcu_h
    height = struct.unpack(">H", data[height_at:height_at + 2])[0] - dropped
    return data[:height_at] + struct.pack(">H", height) + data[height_at + 2:scan] + body, dropped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default="../shared/bench-images")
    ap.add_argument("--every", type=int, nargs="+", default=[1, 4], help="MCU rows per restart interval")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N photos (0: all)")
    args = ap.parse_args()
    import torch
    from PIL import Image
    from torchvision.transforms import RandomResizedCrop

    tj = tjregion.load()
    if tj is None:
        sys.exit(f"no region decoder: {tjregion.why_not()}")
    files = sorted(f for f in glob.glob(os.path.join(args.images, "*")) if f.lower().endswith((".jpg", ".jpeg")))
    files = files[:args.limit] if args.limit else files
    if not files:
        sys.exit(f"no JPEG files in {args.images}")
    torch.manual_seed(0)

    def encode(im, **kw) -> bytes:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90, subsampling=2, **kw)
        return buf.getvalue()

    photos = [Image.open(f).convert("RGB") for f in files]
    plain = [encode(im) for im in photos]
    boxes = []
    for data in plain:
        H, W = jpeg_size(data)
        boxes.append((H, W, *RandomResizedCrop.get_params(torch.empty(1, H, W), (0.08, 1.0), (3 / 4, 4 / 3))))

    def region(datas) -> None:
        for data, (H, W, i, j, h, w) in zip(datas, boxes):
            tj.decode(data, H, W, 1, i, i + h, j, j + w, True)

    def cut_region(datas, every) -> None:
        for data, (H, W, i, j, h, w) in zip(datas, boxes):
            c, d = cut_at_row(data, i // 16, every, 16)
            tj.decode(c, H - d, W, 1, i - d, i - d + h, j, j + w, True)

    def timed(fn) -> float:
        runs = []
        for _ in range(args.repeats):
            t0 = time.process_time()
            fn()
            runs.append((time.process_time() - t0) / len(files) * 1e3)
        return statistics.median(runs)

    print(f"photos: {len(files)} re-encoded at quality 90, 4:2:0; one core; ms per photo, medians of {args.repeats}")
    today = timed(lambda: region(plain))
    print(f"  no markers, region decode (today)       {today:.3f}")
    for every in args.every:
        marked = [encode(im, restart_marker_rows=every) for im in photos]
        for data, (H, W, i, j, h, w) in zip(marked, boxes):
            c, d = cut_at_row(data, i // 16, every, 16)
            whole = tj.decode(data, H, W, 1, i, i + h, j, j + w, True)
            part = tj.decode(c, H - d, W, 1, i - d, i - d + h, j, j + w, True)
            assert np.array_equal(whole[0], part[0]), "a cut file decodes to other pixels"
        size = sum(map(len, marked)) / sum(map(len, plain)) - 1
        pre_cut = [cut_at_row(data, i // 16, every, 16) for data, (H, W, i, *_) in zip(marked, boxes)]
        # the closures bind this iteration's values (timed() runs them at once, but say so)
        t_whole = timed(lambda marked=marked: region(marked))
        t_cut = timed(lambda marked=marked, every=every: cut_region(marked, every))

        def decode_pre_cut(pre_cut=pre_cut) -> None:  # a loop, not a list: each output is freed and reused
            for (c, d), (H, W, i, j, h, w) in zip(pre_cut, boxes):
                tj.decode(c, H - d, W, 1, i - d, i - d + h, j, j + w, True)
        t_precut = timed(decode_pre_cut)
        print(f"  markers every {every} MCU rows ({size:+.2%} bytes): region decode {t_whole:.3f}, "
              f"after a cut {t_precut:.3f}, cut + decode {t_cut:.3f}")
        print(f"restart markers every {every} rows: region decode {t_whole / today:.2f}x, after a cut "
              f"{t_precut / today:.2f}x, cut + decode {t_cut / today:.2f}x (time; today's = 1)")


if __name__ == "__main__":
    main()
