"""JPEG decoding: header sizes, the CPU path's crop-driven decode, and batched nvJPEG on the GPU.

CPU path (DataLoader workers): the crop decides the decode. When the crop box is at least 2x
(4x, 8x) the output size on both sides, libjpeg-turbo decodes at 1/2 (1/4, 1/8) scale in the
DCT domain, which skips most of the IDCT and colour-conversion work; the fast integer IDCT and
fast upsampling are used throughout. The crop is then resized to S x S with the shared uint8
antialiased kernel. Downscaled decoding is the one place where the CPU path departs from the
exact maths: the box is mapped to the nearest pixel of the smaller image.

GPU path: workers ship the raw bytes; `decode_cuda` decodes the whole batch with nvJPEG
(`torchvision.io.decode_jpeg(list, device="cuda")`), grey images come out as RGB.
"""

from __future__ import annotations

import numpy as np
import torch

from shardify.format import JpegError as Reject  # the contract's JPEG header error (reason, detail)
from shardify.format import parse_jpeg_header

from .augment import cpu_resized_crop

# libjpeg-turbo's fast integer IDCT and upsampling: the exactness cost is about one grey level,
# the speed gain is what makes the CPU path keep up with a bare decode
FAST_DCT = True

def jpeg_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the JPEG frame header, without decoding; ValueError if not a JPEG.

    The header walk is shardify's (the module that decides what a shard's `jpg` may be)."""
    try:
        header = parse_jpeg_header(data)
    except Reject as rej:
        raise ValueError(f"{rej.reason}: {rej.detail}") from None
    if header.height == 0 or header.width == 0:
        raise ValueError("JPEG frame header with zero size")
    return header.height, header.width


def reduction(h: int, w: int, S: int) -> int:
    """Largest DCT scaling divisor (1, 2, 4, 8) that keeps the crop at least S on both sides."""
    f = 1
    while f < 8 and min(h, w) >= 2 * f * S:
        f *= 2
    return f


def decode_rgb(data: bytes, H: int, W: int, f: int = 1) -> np.ndarray:
    """HWC uint8 RGB, decoded at 1/f scale (grey and YCbCr alike); raises on a broken JPEG."""
    import simplejpeg

    return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=FAST_DCT, fastupsample=FAST_DCT,
                                  min_height=-(-H // f), min_width=-(-W // f), strict=True)


def cpu_decode_crop(data: bytes, H: int, W: int, box, flip: bool, S: int, mode: str = "bilinear",
                    reduce: bool = True) -> torch.Tensor:
    """The CPU path for one image: crop-driven decode, crop, resize, flip -> [3, S, S] uint8."""
    i, j, h, w = (int(v) for v in box)
    f = reduction(h, w, S) if reduce else 1
    arr = decode_rgb(data, H, W, f)
    if f > 1:  # map the box onto the smaller image (libjpeg rounds scaled sizes up)
        sy, sx = arr.shape[0] / H, arr.shape[1] / W
        i0, j0 = int(round(i * sy)), int(round(j * sx))
        i1 = min(arr.shape[0], max(i0 + 1, int(round((i + h) * sy))))
        j1 = min(arr.shape[1], max(j0 + 1, int(round((j + w) * sx))))
        i, j, h, w = i0, j0, i1 - i0, j1 - j0
    elif arr.shape[0] != H or arr.shape[1] != W:
        raise ValueError(f"decoded size {arr.shape[:2]} differs from the header's {(H, W)}")
    return cpu_resized_crop(arr, (i, j, h, w), flip, S, mode)


def decode_cuda(datas: list[torch.Tensor], device: torch.device) -> tuple[list[torch.Tensor | None], list[str]]:
    """nvJPEG-decode a batch of 1-D uint8 CPU tensors to [3, H, W] uint8 on `device`.

    Returns (images, errors): a broken JPEG gives None and its error text, so the caller can
    replace it; the batched call is tried first and single decodes only after it fails.
    """
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    # torchvision 0.29 flags its image IO as deprecated in favour of torchcodec on every call;
    # decode_jpeg(device="cuda") is still the batched nvJPEG entry point we want
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            imgs = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
            return list(imgs), [""] * len(datas)
        except RuntimeError:
            pass
        imgs, errs = [], []
        for d in datas:
            try:
                imgs.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
                errs.append("")
            except RuntimeError as e:
                imgs.append(None)
                errs.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
    return imgs, errs
