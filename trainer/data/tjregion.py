"""Region decoding through libturbojpeg 3: only the rows and columns a crop keeps, at a DCT scale.

The CPU loader path crops every image, and a random-resized crop keeps about half of it on
average. The TurboJPEG 3 API decodes a region directly: `tj3SetScalingFactor` picks the DCT
scale, `tj3SetCroppingRegion` the region of the scaled image. Rows above the region are skipped
without IDCT, upsampling or colour conversion, rows below it likewise (their entropy-coded data is
still read to the end, so a truncated or corrupt file fails as it does in a full decode), and
columns outside it are left out of every step after entropy decoding.

The library is the libturbojpeg 3 that the `turbojpeg` wheel on PyPI ships inside itself (a
pybind11 package whose own Python API we do not use: we call the C API with ctypes). No
maintained Python binding exposes decode-time cropping: PyTurboJPEG offers lossless transform
crops, which re-encode the region before it is decoded. `TRAINER_LIBTURBOJPEG` names another
libturbojpeg >= 3.0 to use instead, or `off` to use the whole-image simplejpeg path.

`load()` returns None when no usable library is found; the caller then falls back.
"""

from __future__ import annotations

import ctypes
import os
import threading
from importlib import metadata

import numpy as np

# TurboJPEG 3 constants (turbojpeg.h of libjpeg-turbo 3.0, unchanged since)
TJINIT_DECOMPRESS = 1
TJPARAM_STOPONWARNING, TJPARAM_SUBSAMP, TJPARAM_JPEGWIDTH, TJPARAM_JPEGHEIGHT = 0, 4, 5, 6
TJPARAM_FASTUPSAMPLE, TJPARAM_FASTDCT = 9, 10
TJPF_RGB = 0
# iMCU width per chroma subsampling (TJSAMP_444, 422, 420, GRAY, 440, 411, 441)
MCU_WIDTH = (8, 16, 16, 8, 8, 32, 8)


class _Region(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("w", ctypes.c_int), ("h", ctypes.c_int)]


class _Scale(ctypes.Structure):
    _fields_ = [("num", ctypes.c_int), ("denom", ctypes.c_int)]


def library_path() -> str | None:
    """The libturbojpeg to load: TRAINER_LIBTURBOJPEG, else the one inside the `turbojpeg` wheel."""
    env = os.environ.get("TRAINER_LIBTURBOJPEG", "")
    if env:
        return None if env.lower() == "off" else env
    try:
        files = metadata.files("turbojpeg") or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name.startswith("libturbojpeg"):
            return str(f.locate())
    return None


class RegionDecoder:
    """ctypes bindings of the few tj3* calls we need; thread-safe (one decompressor per call)."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        vp, ci, cs = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
        for name, args, res in (
                ("tj3Init", [ci], vp), ("tj3Set", [vp, ci, ci], ci), ("tj3Get", [vp, ci], ci),
                ("tj3DecompressHeader", [vp, ctypes.c_char_p, cs], ci),
                ("tj3SetScalingFactor", [vp, _Scale], ci), ("tj3SetCroppingRegion", [vp, _Region], ci),
                ("tj3Decompress8", [vp, ctypes.c_char_p, cs, vp, ci, ci], ci),
                ("tj3GetErrorStr", [vp], ctypes.c_char_p), ("tj3Destroy", [vp], None)):
            fn = getattr(lib, name)  # AttributeError: not a TurboJPEG 3 library
            fn.argtypes, fn.restype = args, res
            setattr(self, name, fn)
        self.path = path
        self.tj3Destroy(self._handle())  # fail here, not on the first image, if it cannot decompress

    def _handle(self):
        h = self.tj3Init(TJINIT_DECOMPRESS)
        if not h:
            raise OSError(f"tj3Init failed in {self.path}")
        return h

    def _error(self, h) -> str:
        return self.tj3GetErrorStr(h).decode("utf-8", "replace").strip().replace("\n", " ")

    def decode(self, data: bytes, H: int, W: int, f: int, y0: int, y1: int, x0: int, x1: int,
               fast: bool) -> tuple[np.ndarray, int, int]:
        """(array, ya, xa): at least rows y0:y1 and columns x0:x1 of the image decoded at 1/f
        scale, as HWC uint8 RGB whose top-left pixel is (ya, xa) of the scaled image.

        Coordinates are in the scaled image (ceil(H/f) x ceil(W/f)). Usually ya = y0 and xa is
        x0 moved left to the scaled iMCU boundary the library requires. Raises ValueError on a
        broken JPEG or one whose size is not (H, W), like the simplejpeg path.
        """
        # A fresh handle per image (under a microsecond): libjpeg-turbo before 3.1.2 writes to
        # freed memory when one instance skips scanlines with merged upsampling after a decode
        # without it (4:2:0 at full scale after one at 1/2, seen here as garbage rows and crashes)
        h = self._handle()
        try:
            return self._decode(h, data, H, W, f, y0, y1, x0, x1, fast)
        finally:
            self.tj3Destroy(h)

    def _decode(self, h, data: bytes, H: int, W: int, f: int, y0: int, y1: int, x0: int, x1: int,
                fast: bool) -> tuple[np.ndarray, int, int]:
        if self.tj3DecompressHeader(h, data, len(data)) != 0:
            raise ValueError(self._error(h))
        if (self.tj3Get(h, TJPARAM_JPEGHEIGHT), self.tj3Get(h, TJPARAM_JPEGWIDTH)) != (H, W):
            raise ValueError(f"decoded size {(self.tj3Get(h, TJPARAM_JPEGHEIGHT), self.tj3Get(h, TJPARAM_JPEGWIDTH))} "
                             f"differs from the header's {(H, W)}")
        self.tj3Set(h, TJPARAM_STOPONWARNING, 1)  # a warning (truncated data) rejects, as strict=True does
        self.tj3Set(h, TJPARAM_FASTDCT, int(fast))
        self.tj3Set(h, TJPARAM_FASTUPSAMPLE, int(fast))
        if self.tj3SetScalingFactor(h, _Scale(1, f)) != 0:
            raise ValueError(self._error(h))
        sub = self.tj3Get(h, TJPARAM_SUBSAMP)
        Hs, Ws = -(-H // f), -(-W // f)
        if 0 <= sub < len(MCU_WIDTH):
            step = -(-MCU_WIDTH[sub] // f)
            xa = x0 - x0 % step
            if not fast:
                # fancy (smooth) chroma upsampling replicates samples at a cropped region's left
                # and right edges where a full decode has neighbours: the edge columns differ by
                # up to ~25 grey levels (measured). An iMCU of margin on each side keeps every
                # column the caller asked for equal to a full decode's.
                xa = max(0, xa - step) if x0 == xa else xa
                x1 = min(Ws, x1 + step)
            region = _Region(xa, y0, x1 - xa, y1 - y0)
        else:  # unknown sampling: the library refuses regions, decode the scaled image whole
            region, y0, y1, xa, x1 = _Region(0, 0, 0, 0), 0, Hs, 0, Ws
        if self.tj3SetCroppingRegion(h, region) != 0:
            raise ValueError(self._error(h))
        out = np.empty((y1 - y0, x1 - xa, 3), dtype=np.uint8)
        if self.tj3Decompress8(h, data, len(data), out.ctypes.data, 0, TJPF_RGB) != 0:
            raise ValueError(self._error(h))
        return out, y0, xa


_lock = threading.Lock()
_loaded: list = []  # [RegionDecoder | None, reason] once tried


def load() -> RegionDecoder | None:
    """The process's region decoder, or None (with the reason in `why_not()`) if unavailable."""
    if not _loaded:
        with _lock:
            if not _loaded:
                path = library_path()
                dec, why = None, "no libturbojpeg 3 found (install the `turbojpeg` wheel)"
                if path is not None:
                    try:
                        dec, why = RegionDecoder(path), ""
                    except (OSError, AttributeError) as e:
                        why = f"cannot use {path}: {e}"
                elif os.environ.get("TRAINER_LIBTURBOJPEG", "").lower() == "off":
                    why = "TRAINER_LIBTURBOJPEG=off"
                _loaded[:] = [dec, why]
    return _loaded[0]


def why_not() -> str:
    """Why `load()` returned None ('' when it did not)."""
    load()
    return _loaded[1]
