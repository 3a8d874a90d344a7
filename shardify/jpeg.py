"""`jpg` members of the shard contract (docs/format.md): the JPEG header walk both sides run.

shardify decides from the header alone (no decode) whether an image is stored as it is or
re-encoded (shardify/images.py), and `shardify verify` checks stored images the same way; the
trainer's loader runs `check_stored_jpeg` on every sample before either decode path, so the CPU
and GPU paths refuse the same inputs. Standard library only.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from shardify.format import ShardifyError


class JpegError(ShardifyError):
    """A `jpg` payload whose header is broken; `reason` is the reject reason (truncated, unreadable)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


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
    """Walk the JPEG markers up to the first scan; raise JpegError when the header is broken."""
    if data[:2] != b"\xff\xd8":
        raise JpegError("unreadable", "not a JPEG (no SOI marker)")
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
            raise JpegError("truncated", "file ends inside the JPEG header")
        marker = data[pos]
        pos += 1
        if marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker == 0x01:
            continue  # markers without a length field
        if marker == 0xD9:
            raise JpegError("unreadable", "end-of-image marker before any scan")
        if pos + 2 > n:
            raise JpegError("truncated", "file ends inside the JPEG header")
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2:
            raise JpegError("unreadable", f"bad JPEG segment length {length}")
        seg = data[pos + 2: pos + length]
        if pos + length > n:
            raise JpegError("truncated", "file ends inside the JPEG header")
        if marker in _SOF_MARKERS:
            if len(seg) < 6:
                raise JpegError("unreadable", "short JPEG frame header")
            _, height, width, comps = struct.unpack_from(">BHHB", seg, 0)
            frame = (width, height, comps, marker)
        elif marker == 0xEE and seg[:5] == b"Adobe" and len(seg) >= 12:
            adobe = seg[11]
        elif marker == 0xDA:
            if frame is None:
                raise JpegError("unreadable", "JPEG scan before any frame header")
            width, height, comps, sof = frame
            return JpegHeader(width, height, comps, sof, adobe, pos - 2)
        pos += length


def gpu_unreadable_reason(h: JpegHeader) -> str | None:
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


def check_complete(data: bytes, h: JpegHeader) -> None:
    """JpegError("truncated") when the file was cut short. The entropy-coded data never
    contains FF D9, so an EOI after the scan start is the real end of the image."""
    if data.rfind(b"\xff\xd9") < h.scan_offset:
        raise JpegError("truncated", "no end-of-image marker after the scan data")


def check_stored_jpeg(data: bytes) -> JpegHeader:
    """The header of a shard's `jpg`; JpegError unless shardify would have stored it as it is.

    The loader runs this on every sample before either decode path, so the CPU and GPU paths
    refuse the same inputs: a broken header, a file cut short (no end-of-image marker after the
    scan; nvJPEG's hardware decoder may decode such a file into a partly blank image instead of
    failing, where libjpeg refuses it), and the kinds nvJPEG cannot decode (CMYK, RGB-coded,
    arithmetic or lossless JPEGs)."""
    h = parse_jpeg_header(data)
    check_complete(data, h)
    reason = gpu_unreadable_reason(h)
    if reason is not None:
        raise JpegError("unreadable", f"{reason}: shardify re-encodes such images; re-shard this source")
    return h
