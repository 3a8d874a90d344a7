"""Image augmentation maths shared by the GPU and CPU paths.

- Random parameters (crop box, flip, colour-jitter factors) are drawn per sample from a hash of
  (seed, epoch, source, sample uid): the same numbers in any process, on any path, after any
  resume. The crop sampler is torchvision's RandomResizedCrop.get_params algorithm (10 tries,
  then a centred crop at the clamped aspect ratio).
- The resize of a crop is antialiased bilinear (or bicubic) with torch/PIL's weights (a filter
  whose support grows with the downscale factor; plain interpolation when upscaling). `aa_weights` builds
  those weights as dense [S, L] matrices, so a whole batch of differently sized crops is resized
  with two batched matmuls (`resized_crops`), and a flip is just the output columns reversed.
  The CPU path computes the same function per image with torch's uint8 antialiased
  interpolation (`cpu_resized_crop`), so the two paths differ only by uint8 rounding.
- Colour jitter (brightness, contrast, saturation; fixed order, torchvision's formulas) and
  normalisation run batched on the device for both paths (`finish`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .order import _mix_int, mix64

# fixed draw indices, so that adding a parameter never shifts the others
_DRAW_CROP = 0  # 0..39: ten tries of (area, log-ratio, top, left)
_DRAW_FLIP = 40
_DRAW_JITTER = 41  # 41..43: brightness, contrast, saturation


class Draws:
    """Uniform [0, 1) numbers for one sample in one epoch, addressed by index. `view` picks an
    independent stream for a second augmented view of the same sample (the multimodal teacher's
    view is 1); view 0 is the stream every single-view loader has always used."""

    __slots__ = ("base",)

    def __init__(self, seed: int, epoch: int, source: int, uid: int, view: int = 0):
        self.base = mix64(3, seed, epoch, source, uid) if view == 0 else mix64(3, seed, epoch, source, uid, view)

    def u(self, k: int) -> float:
        return (_mix_int(self.base ^ (k + 1)) >> 11) * (1.0 / (1 << 53))


def sample_crop(d: Draws, H: int, W: int, scale: tuple[float, float], ratio: tuple[float, float]
                ) -> tuple[int, int, int, int]:
    """(top, left, height, width) with torchvision RandomResizedCrop.get_params' distribution."""
    area = H * W
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    for t in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * d.u(_DRAW_CROP + 4 * t))
        aspect = math.exp(lr0 + (lr1 - lr0) * d.u(_DRAW_CROP + 4 * t + 1))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= W and 0 < h <= H:
            i = int(d.u(_DRAW_CROP + 4 * t + 2) * (H - h + 1))
            j = int(d.u(_DRAW_CROP + 4 * t + 3) * (W - w + 1))
            return i, j, h, w
    in_ratio = W / H
    if in_ratio < min(ratio):
        w, h = W, int(round(W / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = H, int(round(H * max(ratio)))
    else:
        w, h = W, H
    return (H - h) // 2, (W - w) // 2, max(h, 1), max(w, 1)


@dataclass
class ImageParams:
    """Per-sample parameters of one batch; every path applies exactly these."""

    box: np.ndarray  # [B, 4] int64: top, left, height, width in original pixels
    flip: np.ndarray  # [B] bool
    jitter: np.ndarray | None  # [B, 3] float32 brightness, contrast, saturation factors; None: off


def draw_params(seed: int, epoch: int, sources, uids, sizes, aug, view: int = 0) -> ImageParams:
    """Parameters for a batch: sizes = [(H, W)]; aug = AugmentConfig; view: the draw stream
    (0: the student's / only view, 1: the multimodal teacher's own view)."""
    B = len(uids)
    box = np.zeros((B, 4), dtype=np.int64)
    flip = np.zeros(B, dtype=bool)
    jit = np.ones((B, 3), dtype=np.float32) if aug.train and aug.color_jitter > 0 else None
    for b in range(B):
        H, W = sizes[b]
        if not aug.train:  # validation: the whole image, resized to S x S
            box[b] = (0, 0, H, W)
            continue
        d = Draws(seed, epoch, int(sources[b]), int(uids[b]), view)
        box[b] = sample_crop(d, H, W, tuple(aug.scale), tuple(aug.ratio))
        flip[b] = d.u(_DRAW_FLIP) < aug.hflip
        if jit is not None:
            s = aug.color_jitter
            lo = max(0.0, 1.0 - s)
            for c in range(3):
                jit[b, c] = lo + (1.0 + s - lo) * d.u(_DRAW_JITTER + c)
    return ImageParams(box, flip, jit)


# ---------------------------------------------------------------------------------------------
# Resize maths


def _filter(x: torch.Tensor, mode: str) -> torch.Tensor:
    """The resize filter at distances x (overwrites x: the weights are large temporaries)."""
    x = x.abs_()
    if mode == "bilinear":
        return x.neg_().add_(1.0).clamp_(min=0.0)
    a = -0.5  # torch's antialiasing cubic (PIL's), not the a=-0.75 of plain bicubic
    return torch.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                       torch.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, torch.zeros_like(x)))


def aa_weights(lengths: torch.Tensor, in_max: int, S: int, mode: str = "bilinear") -> torch.Tensor:
    """Antialiased resize weights [B, S, in_max] (float32) for resizing B spans of `lengths` to S.

    Matches torch.nn.functional.interpolate(mode=mode, antialias=True, align_corners=False)
    and PIL's BILINEAR/BICUBIC resize: output k has centre scale*(k+0.5); input t weighs
    filter((t + 0.5 - centre) / max(scale, 1)), the filter being the triangle (bilinear, radius
    1) or the a=-0.5 cubic (radius 2); weights are normalised over the inputs inside the span,
    and are exactly 0 outside it (the canvas padding they multiply may hold any finite value).
    Computed in float32 on the lengths' device, in place where possible (a float64 version
    needed about 0.7 GB of temporaries for a batch of 256): the distances are exact to about
    in_max * 6e-8 pixels, under 0.01 grey levels for ImageNet-sized crops.
    """
    if mode not in ("bilinear", "bicubic"):
        raise ValueError(f"augment.interpolation must be 'bilinear' or 'bicubic', got {mode!r}")
    dev = lengths.device
    L = lengths.to(torch.float32)[:, None, None]
    scale = L / S
    k = torch.arange(S, dtype=torch.float32, device=dev)[None, :, None].add_(0.5)
    t = torch.arange(in_max, dtype=torch.float32, device=dev)[None, None, :].add_(0.5)
    x = (t - scale * k).div_(scale.clamp(min=1.0))  # [B, S, in_max]
    w = _filter(x, mode).mul_(t < L)
    return w.div_(w.sum(-1, keepdim=True))


def to_device(x, device: torch.device) -> torch.Tensor:
    """A host array or CPU tensor on `device` without making the host wait for queued GPU work.

    A copy from pageable memory synchronises with the stream; from pinned memory it is queued
    (`non_blocking`), and torch keeps the pinned block alive until the copy has run. CPU and
    meta devices (tests) get the same non-blocking call."""
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    if device.type == "cpu" or t.device == device:
        return t
    if device.type == "cuda" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _pack(areas: np.ndarray, hw: np.ndarray, max_pixels: int) -> list[np.ndarray]:
    """Group samples into canvases of at most `max_pixels` (n * hmax * wmax), similar sizes together.

    Sorted by area, so one large crop does not make every small one in its canvas pay for its
    padding; a single crop larger than the limit gets a canvas of its own."""
    order = np.argsort(areas, kind="stable")
    groups, start, B = [], 0, len(order)
    while start < B:
        end, hmax, wmax = start, 0, 0
        while end < B:
            h2, w2 = max(hmax, int(hw[order[end], 0])), max(wmax, int(hw[order[end], 1]))
            if end > start and (end - start + 1) * h2 * w2 > max_pixels:
                break
            hmax, wmax, end = h2, w2, end + 1
        groups.append(order[start:end])
        start = end
    return groups


def resized_crops(images: list[torch.Tensor], box, flip, S: int, mode: str = "bilinear",
                  max_pixels: int = 1 << 24) -> torch.Tensor:
    """Crop, resize to S x S and flip a batch of [C, H, W] uint8 images of any sizes (C = 1 or 3).

    box [B, 4] (top, left, height, width) and flip [B] are host arrays or CPU tensors: the host
    plans the work from them, so nothing is ever read back from the device. Returns float32
    [B, 3, S, S] clamped to 0..255 (the uint8 path's range), on the images' device, with no
    host wait for queued GPU work (all copies are pinned and non-blocking).

    The images are joined into one flat buffer (a few copy kernels for the whole batch); each
    canvas of similar-sized crops is then one row gather from it: canvas row (k, y, c) is the
    wmax bytes starting at that crop's row y in channel c, so columns past the crop's width hold its
    neighbours' bytes and rows past its height repeat its last row. Those get weight 0 from
    `aa_weights`, so no zero fill is needed. A canvas holds at most `max_pixels` crop pixels
    (n * hmax * wmax; uint8, plus one float32 copy for the matmuls: about 260 MB at the default),
    and is resized with two batched matmuls.
    """
    B = len(images)
    box = np.asarray(box.numpy() if isinstance(box, torch.Tensor) else box, dtype=np.int64).reshape(B, 4)
    flip = np.asarray(flip.numpy() if isinstance(flip, torch.Tensor) else flip, dtype=bool).reshape(B)
    dev = images[0].device if B else torch.device("cpu")
    out = torch.empty((B, 3, S, S), dtype=torch.float32, device=dev)
    if B == 0:
        return out
    # host-side geometry of every image in the flat buffer (shapes are host metadata)
    C = np.array([im.shape[0] for im in images], dtype=np.int64)
    H = np.array([im.shape[1] for im in images], dtype=np.int64)
    W = np.array([im.shape[2] for im in images], dtype=np.int64)
    sizes = C * H * W
    base = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    cstride = np.where(C == 1, 0, H * W)  # grey images broadcast their one channel to three
    wpad = int(box[:, 3].max())
    flat = torch.cat([im.reshape(-1) for im in images] + [images[0].new_zeros(wpad)])
    for idx in _pack(box[:, 2] * box[:, 3], box[:, 2:], max_pixels):
        n = len(idx)
        hmax, wmax = int(box[idx, 2].max()), int(box[idx, 3].max())
        i, j, h = box[idx, 0], box[idx, 1], box[idx, 2]
        y = np.minimum(np.arange(hmax)[None, :], (h - 1)[:, None])  # [n, hmax]
        # rows in (crop, y, channel) order: the canvas is [n, hmax, 3 * wmax], so both resize
        # steps are plain batched matmuls (no broadcast copies of the weights per channel)
        rows = (base[idx, None, None] + cstride[idx, None, None] * np.arange(3)[None, None, :]
                + (i[:, None, None] + y[:, :, None]) * W[idx, None, None] + j[:, None, None])
        # every row start r reads flat[r:r + wmax]; the wpad zeros keep the last ones in bounds
        view = flat.as_strided((flat.numel() - wmax + 1, wmax), (1, 1))
        canvas = view.index_select(0, to_device(rows.reshape(-1), dev)).view(n, hmax, 3 * wmax)
        small = np.stack([box[idx, 2], box[idx, 3], flip[idx].astype(np.int64), idx]).astype(np.int64)
        small_d = to_device(small, dev)  # one copy for the canvas' lengths, flips and slots
        wy = aa_weights(small_d[0], hmax, S, mode)
        wx = aa_weights(small_d[1], wmax, S, mode)
        wx = torch.where(small_d[2].bool().view(n, 1, 1), wx.flip(1), wx)  # a flip reverses the output columns
        x = torch.bmm(wy, canvas.to(torch.float32))  # [n, S, 3 * wmax]
        del canvas
        res = torch.bmm(x.view(n, S * 3, wmax), wx.transpose(1, 2))  # [n, S * 3, S]
        out.index_copy_(0, small_d[3], res.view(n, S, 3, S).permute(0, 2, 1, 3))
    return out.clamp_(0.0, 255.0)  # bicubic overshoots; the uint8 path saturates the same way


def cpu_resized_crop(arr: np.ndarray, box: tuple[int, int, int, int], flip: bool, S: int,
                     mode: str = "bilinear") -> torch.Tensor:
    """One HWC uint8 RGB image -> [3, S, S] uint8: crop, resize, flip."""
    i, j, h, w = box
    # Copy the crop into its own contiguous HWC block: read as NCHW it is then a dense
    # channels-last tensor, for which torch's vectorised uint8 antialias kernel runs about 1.6x
    # faster than on a strided view into the whole image (measured: 0.20 vs 0.33 ms for a
    # 300 px crop to 224), copy included.
    x = torch.from_numpy(np.ascontiguousarray(arr[i:i + h, j:j + w])).permute(2, 0, 1)[None]
    y = F.interpolate(x, size=(S, S), mode=mode, antialias=True, align_corners=False)[0]
    return y.flip(-1) if flip else y


# ---------------------------------------------------------------------------------------------
# Colour and normalisation (device side, batched, both paths)


def _grey(x: torch.Tensor) -> torch.Tensor:
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Brightness, contrast, saturation on [B, 3, H, W] floats in [0, 1] (torchvision formulas).

    inplace: work on x itself (`finish` does, on its own float copy). factors [B, 3] is on x's
    device already or a host tensor (then copied without a host wait)."""
    x = x if inplace else x.clone()
    f = to_device(factors, x.device).to(torch.float32)
    b, c, s = (f[:, k].view(-1, 1, 1, 1) for k in range(3))
    x.mul_(b).clamp_(0, 1)
    m = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
    x.mul_(c).add_((1 - c) * m).clamp_(0, 1)
    g = _grey(x)
    x.mul_(s).add_(g.mul_(1 - s)).clamp_(0, 1)
    return x


def finish(x255: torch.Tensor, jitter: torch.Tensor | None, aug, dtype: torch.dtype) -> torch.Tensor:
    """[B, 3, S, S] in 0..255 (uint8 or float) -> jittered, normalised `dtype`.

    A float32 input is worked on in place (the GPU path hands over its own buffer); a uint8 one
    is converted once. Peak extra memory: one [B, 1, S, S] grey plane, not a copy per step."""
    x = x255 if x255.dtype == torch.float32 else x255.to(torch.float32)
    x.mul_(1.0 / 255.0)
    if jitter is not None:
        x = color_jitter(x, jitter, inplace=True)
    mean = to_device(torch.tensor(aug.mean, dtype=torch.float32), x.device).view(1, 3, 1, 1)
    std = to_device(torch.tensor(aug.std, dtype=torch.float32), x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std).to(dtype)
