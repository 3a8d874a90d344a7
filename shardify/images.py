"""Image checks and normalisation for shards: every written `jpg` is one nvJPEG can decode.

JPEGs that a GPU decoder reads as they are (baseline or progressive Huffman, 1 or 3 YCbCr
components) keep their original bytes; everything else (CMYK/YCCK JPEGs, PNGs named .JPEG,
other formats) is decoded once and re-encoded as an RGB JPEG, and the metadata says so.

The checks read the JPEG header only (no decode), so sharding runs at I/O speed: the pixel
count from the frame header guards against decompression bombs, and a missing end-of-image
marker after the scan start marks a truncated file.
"""

from __future__ import annotations

import io

from shardify.jpeg import JpegError, JpegHeader, check_complete, gpu_unreadable_reason
from shardify.jpeg import parse_jpeg_header as _parse_jpeg_header
from shardify.records import Reject

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold
REENCODE_QUALITY = 95

def parse_jpeg_header(data: bytes) -> JpegHeader:
    """The contract's JPEG header walk (shardify/jpeg.py), failing as a Reject."""
    try:
        return _parse_jpeg_header(data)
    except JpegError as exc:
        raise Reject(exc.reason, exc.detail) from None


def _check_complete(data: bytes, h: JpegHeader) -> None:
    try:
        check_complete(data, h)
    except JpegError as exc:
        raise Reject(exc.reason, exc.detail) from None


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise Reject("too_many_pixels", f"{width}x{height} is above the limit of {max_pixels} pixels")


def _decode_and_reencode(data: bytes, max_pixels: int) -> tuple[bytes, int, int, str]:
    """Decode any format Pillow knows and re-encode it as an RGB JPEG."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # we apply our own limit, before decoding
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise Reject("unreadable", "not an image format Pillow recognises") from None
    except Exception as exc:  # Pillow raises many kinds on broken headers
        raise Reject("unreadable", f"{type(exc).__name__}: {exc}") from None
    fmt = (img.format or "unknown").lower()
    _check_pixels(img.width, img.height, max_pixels)
    try:
        img.load()
    except Exception as exc:
        text = str(exc)
        reason = "truncated" if "truncat" in text.lower() else "unreadable"
        raise Reject(reason, f"{fmt}: {type(exc).__name__}: {text}") from None
    if img.mode != "RGB":
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            # Composite transparency on white so transparent areas do not turn black.
            rgba = img.convert("RGBA")
            bg = Image.new("RGB", rgba.size, (255, 255, 255))
            bg.paste(rgba, mask=rgba.getchannel("A"))
            img = bg
        else:
            img = img.convert("RGB")
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=REENCODE_QUALITY, subsampling=2)
    return out.getvalue(), img.width, img.height, fmt


def normalise_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes, dict]:
    """Return (jpeg bytes to store, metadata) or raise Reject.

    Metadata: width, height, format (of the input), and reencoded_from when re-encoded.
    """
    if not data:
        raise Reject("empty", "zero-byte file")
    if data[:2] == b"\xff\xd8":
        h = parse_jpeg_header(data)
        _check_pixels(h.width, h.height, max_pixels)
        _check_complete(data, h)
        reason = gpu_unreadable_reason(h)
        if reason is None:
            return data, {"format": "jpeg", "width": h.width, "height": h.height}
        jpeg, width, height, _ = _decode_and_reencode(data, max_pixels)
        return jpeg, {"format": "jpeg", "width": width, "height": height, "reencoded_from": reason}
    jpeg, width, height, fmt = _decode_and_reencode(data, max_pixels)
    return jpeg, {"format": fmt, "width": width, "height": height, "reencoded_from": fmt}
