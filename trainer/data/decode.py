"""JPEG decoding: header sizes, the CPU path's crop-driven decode, and batched nvJPEG on the GPU.

CPU path (DataLoader workers): the crop decides the decode. With `augment.decode_scale: dct`
(`exact`, the default, turns it off), when the crop box is at least 2x (4x, 8x) the output size
on both sides, libjpeg-turbo decodes at 1/2 (1/4, 1/8) scale in the DCT domain, which skips most
of the IDCT and colour-conversion work, as Pillow's draft mode and FFCV do; `exact` always
decodes at full scale. Only these power-of-two scales are used: libjpeg-turbo's other M/8
scales have no SIMD IDCT and measured no faster than a full decode (docs/benchmarks.md). The
fast integer IDCT and fast upsampling are used throughout. Only the box's rows and columns are
decoded (libturbojpeg 3's cropping region, `tjregion.py`); where that library cannot be loaded,
simplejpeg decodes the whole image at the same scale, with a note in the log, and the pixels
are the same. The crop is then resized to S x S with the shared uint8 antialiased kernel.
Downscaled decoding is the one place where the CPU path departs from the exact maths: the box
is mapped to the nearest pixel of the smaller image (`decode_scale: exact` removes it; the GPU
path always decodes at full scale).

GPU path: workers ship the raw bytes; `decode_cuda` decodes the whole batch with nvJPEG
(`torchvision.io.decode_jpeg(list, device="cuda:N")`), grey images come out as RGB.

Both paths first run the same host-side check on every sample (`jpeg_size`: shardify's rule
for a stored `jpg`: header, end-of-image marker, a kind nvJPEG decodes), and both compare the
decoded size with the header's, so they refuse the same inputs except for damage inside the
entropy-coded data, which only a decoder sees (libjpeg in strict mode refuses it; nvJPEG may
or may not).

Streams (GPU): torchvision's nvJPEG wrapper allocates its outputs on the caller's current
stream but writes them from a private stream, without first waiting for the caller's stream.
The caching allocator hands out a block as soon as it was freed on its stream, so on a busy
stream the decoder can overwrite memory that queued kernels (the previous batch, the model's
activations) have still to read. `decode_cuda` therefore decodes with a dedicated decode
stream current, on which nothing else is ever queued: its blocks are only ever freed by decode
outputs, each marked with `record_stream` for the stream that uses it, so the allocator reuses
such a block only after that stream's work on it has finished. The caller's stream then waits
on the decode stream (an event, no host wait). This keeps the host and the compute stream free
to run ahead; synchronising the device before each decode would also be safe but would stall
the training step queued behind it.
"""

from __future__ import annotations

import logging
import re
import threading

import numpy as np
import torch

from shardify.jpeg import JpegError, check_stored_jpeg, parse_jpeg_header

from . import tjregion
from .augment import cpu_resized_crop

log = logging.getLogger(__name__)

# libjpeg-turbo's fast integer IDCT and upsampling: the exactness cost is about one grey level,
# the speed gain is what makes the CPU path keep up with a bare decode
FAST_DCT = True
# libturbojpeg 3 region decode when the library loads; False: whole-image simplejpeg decodes
REGION_DECODE = True
_noted = False

def jpeg_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the JPEG frame header, without decoding; ValueError unless it is a
    complete JPEG of a kind both decode paths read (see the module docstring).

    The check is shardify's (the module that decides what a shard's `jpg` may be)."""
    try:
        header = check_stored_jpeg(data)
    except JpegError as rej:
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
    """The CPU path for one image: crop-driven decode, crop, resize, flip -> [3, S, S] uint8.

    reduce: decode at a DCT scale where the crop allows (`augment.decode_scale: dct`); False
    decodes at full scale (`exact`, the config's default; the loader always passes the config's
    choice)."""
    i, j, h, w = (int(v) for v in box)
    f = reduction(h, w, S) if reduce else 1
    Hs, Ws = -(-H // f), -(-W // f)  # the scaled image's size (libjpeg rounds up)
    if f > 1:  # map the box onto the smaller image
        sy, sx = Hs / H, Ws / W
        i0, j0 = int(round(i * sy)), int(round(j * sx))
        i1 = min(Hs, max(i0 + 1, int(round((i + h) * sy))))
        j1 = min(Ws, max(j0 + 1, int(round((j + w) * sx))))
        i, j, h, w = i0, j0, i1 - i0, j1 - j0
    tj = region_decoder()
    if tj is not None:  # decode only the box's rows and (iMCU-aligned) columns
        if (i + h < Hs and not data.endswith(b"\xff\xd9")
                and data.rfind(b"\xff\xd9") < parse_jpeg_header(data).scan_offset):
            # the library stops reading at the box's last row, so it cannot see a file cut
            # short below it; shardify's test (entropy data never holds FF D9) can
            raise ValueError("Premature end of JPEG file (no end-of-image marker after the scan data)")
        arr, ya, xa = tj.decode(data, H, W, f, i, i + h, j, j + w, FAST_DCT)
        return cpu_resized_crop(arr, (i - ya, j - xa, h, w), flip, S, mode)
    arr = decode_rgb(data, H, W, f)
    if arr.shape[:2] != (Hs, Ws):
        raise ValueError(f"decoded size {arr.shape[:2]} differs from the expected {(Hs, Ws)}")
    return cpu_resized_crop(arr, (i, j, h, w), flip, S, mode)


def region_decoder() -> tjregion.RegionDecoder | None:
    """libturbojpeg 3's region decoder, or None (noted once in the log) to decode whole images."""
    if not REGION_DECODE:
        return None
    tj = tjregion.load()
    global _noted
    if tj is None and not _noted:
        _noted = True
        log.warning("CPU image path: %s; decoding whole images with simplejpeg", tjregion.why_not())
    return tj


# nvJPEG statuses that mean "this input is bad" (torchvision ends its message with ': N'):
# INVALID_PARAMETER, BAD_JPEG, JPEG_NOT_SUPPORTED, INCOMPLETE_BITSTREAM. Every other failure
# (allocator, execution, internal, a CUDA error) is the device's, and must not pass for a
# corrupt sample: it would be hidden, and replacing samples cannot cure it.
_NVJPEG_DATA_STATUS = {2, 3, 4, 10}
_DEVICE_WORDS = re.compile(r"out of memory|CUDA error|cudaError|CUBLAS|synchroni[sz]e|allocat", re.IGNORECASE)
_STATUS = re.compile(r"(?:Failed to [a-z ]+|status)[:=]\s*(\d+)")

_streams: dict = {}
_streams_lock = threading.Lock()


def is_device_failure(e: BaseException) -> bool:
    """True when a decode error is the device's (re-raised), False when it is the input's."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    msg = _first_line(e)  # later lines may hold a C++ backtrace with source paths
    if _DEVICE_WORDS.search(msg):  # before statuses: 'Failed to synchronize CUDA stream: 2' is CUDA's 2
        return True
    return any(int(st) not in _NVJPEG_DATA_STATUS for st in _STATUS.findall(msg))


def decode_stream(device: torch.device):
    """The dedicated nvJPEG stream of `device` (one per device and process; see the module doc)."""
    with _streams_lock:
        if device not in _streams:
            _streams[device] = torch.cuda.Stream(device)
        return _streams[device]


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def decode_cuda(datas: list[torch.Tensor], device: torch.device, sizes=None
                ) -> tuple[list[torch.Tensor | None], list[str]]:
    """nvJPEG-decode a batch of 1-D uint8 CPU tensors to [3, H, W] uint8 on `device`.

    Returns (images, errors): a broken JPEG gives None and its error text, so the caller can
    replace it. The whole batch goes to nvJPEG in one call; when that call fails, the batch is
    split in halves until the bad inputs are isolated (k bad images cost about 2k log2(B)
    calls, not B single decodes). Device failures (out of memory, CUDA errors) are raised.
    `sizes` [(H, W)]: the headers' sizes; an image decoded to another size is an error, as
    on the CPU path. On CUDA the images are ready for the caller's current stream (see the
    module docstring); on the CPU (tests) the same logic runs with torchvision's CPU decoder.
    """
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    n = len(datas)
    imgs: list = [None] * n
    errs = [""] * n

    def run(idx: list[int]) -> None:
        try:
            out = decode_jpeg([datas[i] for i in idx], mode=ImageReadMode.RGB, device=device)
        except RuntimeError as e:
            if is_device_failure(e):
                raise
            if len(idx) == 1:
                errs[idx[0]] = f"nvjpeg: {_first_line(e)}"
                return
            mid = len(idx) // 2
            run(idx[:mid])
            run(idx[mid:])
            return
        for i, im in zip(idx, out):
            imgs[i] = im

    # torchvision 0.29 flags its image IO as deprecated in favour of torchcodec on every call;
    # decode_jpeg(device="cuda") is still the batched nvJPEG entry point we want. A filter for
    # that one message (catch_warnings would not be thread-safe: this runs in the loader's thread)
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                            category=DeprecationWarning)
    if n and device.type == "cuda":
        side = decode_stream(device)
        user = torch.cuda.current_stream(device)
        with torch.cuda.stream(side):
            run(list(range(n)))
        user.wait_stream(side)
        for im in imgs:
            if im is not None:
                im.record_stream(user)
    elif n:
        run(list(range(n)))
    if sizes is not None:
        for b, im in enumerate(imgs):
            if im is not None and tuple(im.shape[-2:]) != tuple(sizes[b]):
                imgs[b] = None
                errs[b] = f"decoded size {tuple(im.shape[-2:])} differs from the header's {tuple(sizes[b])}"
    return imgs, errs
