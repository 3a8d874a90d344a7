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
import struct
from dataclasses import dataclass

from shardify.records import Reject

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold
REENCODE_QUALITY = 95

# Start-of-frame markers, and which of them nvJPEG handles (Huffman baseline/extended/progressive).
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_GPU_SOF = {0xC0, 0xC1, 0xC2}


@dataclass
class JpegHeader:
    width: int
    height: int
    components: int
    sof: int  # the start-of-frame marker byte, e.g. 0xC0 baseline, 0xC2 progressive
    adobe_transform: int | None  # APP14 'Adobe' colour transform, None when absent
    scan_offset: int  # byte offset of the first start-of-scan marker


def parse_jpeg_header(data: bytes) -> JpegHeader:
    """Walk the JPEG markers up to the first scan; raise Reject when the header is broken."""
    if data[:2] != b"\xff\xd8":
        raise Reject("unreadable", "not a JPEG (no SOI marker)")
    pos, n = 2, len(data)
    frame = None
    adobe = None
    while True:
        # Markers may be preceded by any number of 0xFF fill bytes.
        while pos < n and data[pos] != 0xFF:
            pos += 1  # tolerate garbage between segments, as libjpeg does (with a warning)
        while pos < n and data[pos] == 0xFF:
            pos += 1
        if pos >= n:
            raise Reject("truncated", "file ends inside the JPEG header")
        marker = data[pos]
        pos += 1
        if marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker == 0x01:
            continue  # markers without a length field
        if marker == 0xD9:
            raise Reject("unreadable", "end-of-image marker before any scan")
        if pos + 2 > n:
            raise Reject("truncated", "file ends inside the JPEG header")
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2:
            raise Reject("unreadable", f"bad JPEG segment length {length}")
        seg = data[pos + 2 : pos + length]
        if pos + length > n:
            raise Reject("truncated", "file ends inside the JPEG header")
        if marker in _SOF_MARKERS:
            if len(seg) < 6:
                raise Reject("unreadable", "short JPEG frame header")
            _, height, width, comps = struct.unpack_from(">BHHB", seg, 0)
            frame = (width, height, comps, marker)
        elif marker == 0xEE and seg[:5] == b"Adobe" and len(seg) >= 12:
            adobe = seg[11]
        elif marker == 0xDA:
            if frame is None:
                raise Reject("unreadable", "JPEG scan before any frame header")
            width, height, comps, sof = frame
            return JpegHeader(width, height, comps, sof, adobe, pos - 2)
        pos += length


def _reencode_reason(h: JpegHeader) -> str | None:
    """Why a well-formed JPEG cannot go to the GPU decoder as is (None: it can)."""
    if h.components == 4:
        return "ycck-jpeg" if h.adobe_transform == 2 else "cmyk-jpeg"
    if h.components not in (1, 3):
        return f"jpeg-{h.components}-components"
    if h.sof not in _GPU_SOF:
        return f"jpeg-sof{h.sof - 0xC0}"
    if h.components == 3 and h.adobe_transform == 0:
        return "rgb-jpeg"  # RGB-coded (not YCbCr) JPEG: GPU decoders get the colours wrong
    if h.height == 0:
        return "jpeg-dnl"  # height given later in the stream; decoders differ
    return None


def _check_complete(data: bytes, h: JpegHeader) -> None:
    # The entropy-coded data never contains FF D9, so an EOI after the scan start is the
    # real end of the image; without one the file was cut short.
    if data.rfind(b"\xff\xd9") < h.scan_offset:
        raise Reject("truncated", "no end-of-image marker after the scan data")


def check_stored_jpeg(data: bytes) -> JpegHeader:
    """The header of a shard's `jpg`; Reject unless shardify would have stored it as it is.

    The loader runs this on every sample before either decode path, so the CPU and GPU paths
    refuse the same inputs: a broken header, a file cut short (no end-of-image marker after the
    scan; nvJPEG's hardware decoder may decode such a file into a partly blank image
    instead of failing, where libjpeg refuses it), and
    the kinds nvJPEG cannot decode (CMYK, RGB-coded, arithmetic or lossless JPEGs)."""
    h = parse_jpeg_header(data)
    _check_complete(data, h)
    reason = _reencode_reason(h)
    if reason is not None:
        raise Reject("unreadable", f"{reason}: shardify re-encodes such images; re-shard this source")
    return h


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
        reason = _reencode_reason(h)
        if reason is None:
            return data, {"format": "jpeg", "width": h.width, "height": h.height}
        jpeg, width, height, _ = _decode_and_reencode(data, max_pixels)
        return jpeg, {"format": "jpeg", "width": width, "height": height, "reencoded_from": reason}
    jpeg, width, height, fmt = _decode_and_reencode(data, max_pixels)
    return jpeg, {"format": fmt, "width": width, "height": height, "reencoded_from": fmt}
