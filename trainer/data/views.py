"""Two augmented views of one image: the multimodal (S-SMKE) student's and its teacher's.

The thesis fed its BEiTv2 teacher a view of its own (RandomResizedCrop (0.9, 1.0), colour
jitter 0.4, flip 0.5) while the student saw another crop of the same image without jitter.
Here both views are cut from one decode of the image. Their random parameters come from the
same per-(seed, epoch, sample) hash as every other draw, one stream per view (`Draws(view=)`),
so a resumed run sees the same views as an uninterrupted one, on either decode path.

CPU path: the image is decoded once, at the larger of the two views' DCT scales (the smaller
divisor, so both crops keep at least their output size), then each view's box is mapped onto
that image, cropped, resized and flipped with the shared uint8 kernel. The GPU path decodes
once with nvJPEG and calls `resized_crops` once per view (loader.py).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .augment import cpu_resized_crop
from .decode import decode_rgb, reduction


def teacher_augment(cfg):
    """The teacher view's AugmentConfig: `data.teacher_augment`, with `data.augment.train` (the
    validation loader switches it off for the whole data config) deciding for both views."""
    return replace(cfg.teacher_augment, train=cfg.augment.train)


def check_teacher_view(cfg, kind: str) -> None:
    """ValueError, naming the key, for a teacher view the loader cannot cut."""
    if not cfg.teacher_view:
        return
    if kind != "image_text":
        raise ValueError(f"data.teacher_view: a teacher's own view is for image_text data, not {kind}")
    if cfg.teacher_augment.interpolation not in ("bilinear", "bicubic"):
        raise ValueError("data.teacher_augment.interpolation must be bilinear or bicubic, "
                         f"got {cfg.teacher_augment.interpolation!r}")


def scaled_box(box, H: int, W: int, f: int) -> tuple[int, int, int, int]:
    """A box of the H x W image on the image decoded at 1/f (libjpeg rounds the size up); the
    same mapping as the single-view `decode.cpu_decode_crop`."""
    i, j, h, w = (int(v) for v in box)
    if f == 1:
        return i, j, h, w
    Hs, Ws = -(-H // f), -(-W // f)
    sy, sx = Hs / H, Ws / W
    i0, j0 = int(round(i * sy)), int(round(j * sx))
    i1 = min(Hs, max(i0 + 1, int(round((i + h) * sy))))
    j1 = min(Ws, max(j0 + 1, int(round((j + w) * sx))))
    return i0, j0, i1 - i0, j1 - j0


def cpu_decode_views(data: bytes, H: int, W: int, views, reduce: bool = True) -> list[torch.Tensor]:
    """One decode, several views: views = [(box, flip, S, mode)] -> [[3, S, S] uint8] in order.

    Raises ValueError (or simplejpeg's error) on a broken JPEG, like the single-view path."""
    f = min(reduction(int(box[2]), int(box[3]), S) for box, _, S, _ in views) if reduce else 1
    arr = decode_rgb(data, H, W, f)
    if arr.shape[:2] != (-(-H // f), -(-W // f)):
        raise ValueError(f"decoded size {arr.shape[:2]} differs from the expected {(-(-H // f), -(-W // f))}")
    return [cpu_resized_crop(arr, scaled_box(box, H, W, f), bool(flip), S, mode) for box, flip, S, mode in views]
