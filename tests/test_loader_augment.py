"""Augmentation maths: crop sampler distribution, batched vs per-image resize, CPU path, jitter."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision.transforms import RandomResizedCrop

from loader_fixtures import jpeg_bytes
from trainer.data import AugmentConfig
from trainer.data import decode as dec
from trainer.data.augment import Draws, color_jitter, draw_params, finish, resized_crops, sample_crop
from trainer.data.decode import cpu_decode_crop, decode_rgb, jpeg_size, reduction


def ks_stat(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, "right") / len(a)
    cdf_b = np.searchsorted(b, grid, "right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def ks_critical(n, m, alpha=1e-3) -> float:
    return math.sqrt(-0.5 * math.log(alpha / 2)) * math.sqrt((n + m) / (n * m))


def crop_features(boxes, H, W):
    b = np.asarray(boxes, dtype=np.float64)
    i, j, h, w = b.T
    return {"area": h * w / (H * W), "log_ratio": np.log(w / h), "top": (i + 0.5) / (H - h + 1),
            "left": (j + 0.5) / (W - w + 1)}


@pytest.mark.parametrize("H,W,scale", [(300, 400, (0.08, 1.0)), (375, 500, (0.9, 1.0)), (40, 400, (0.08, 1.0))])
def test_crop_sampler_matches_torchvision_distribution(H, W, scale):
    n = 3000
    ratio = (3 / 4, 4 / 3)
    ours = [sample_crop(Draws(5, 2, 0, u), H, W, scale, ratio) for u in range(n)]
    torch.manual_seed(0)
    img = torch.empty(1, H, W)
    theirs = [RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)]
    fo, ft = crop_features(ours, H, W), crop_features(theirs, H, W)
    for name in fo:
        assert ks_stat(fo[name], ft[name]) < ks_critical(n, n), name
    for i, j, h, w in ours:
        assert 0 <= i and 0 <= j and 0 < h and 0 < w and i + h <= H and j + w <= W


def test_crop_sampler_detects_a_wrong_scale():
    # the statistical test above can fail: a sampler with another scale range is told apart
    n, H, W = 3000, 300, 400
    ours = [sample_crop(Draws(5, 2, 0, u), H, W, (0.2, 1.0), (3 / 4, 4 / 3)) for u in range(n)]
    torch.manual_seed(0)
    theirs = [RandomResizedCrop.get_params(torch.empty(1, H, W), [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)]
    assert ks_stat(crop_features(ours, H, W)["area"], crop_features(theirs, H, W)["area"]) > ks_critical(n, n)


def test_params_depend_on_seed_epoch_and_sample_only():
    aug = AugmentConfig(color_jitter=0.4)
    a = draw_params(1, 2, [0, 0, 1], [5, 6, 5], [(100, 120)] * 3, aug)
    b = draw_params(1, 2, [0, 0, 1], [5, 6, 5], [(100, 120)] * 3, aug)
    assert (a.box == b.box).all() and (a.flip == b.flip).all() and (a.jitter == b.jitter).all()
    c = draw_params(1, 3, [0], [5], [(100, 120)], aug)
    assert not (c.box[0] == a.box[0]).all()
    assert (a.jitter >= 0.6).all() and (a.jitter <= 1.4).all()
    flips = draw_params(0, 0, [0] * 2000, list(range(2000)), [(50, 50)] * 2000, AugmentConfig()).flip
    assert 0.45 < flips.mean() < 0.55
    val = draw_params(0, 0, [0], [1], [(50, 70)], AugmentConfig(train=False))
    assert val.box[0].tolist() == [0, 0, 50, 70] and not val.flip[0] and val.jitter is None


def reference_crop(img_chw: torch.Tensor, box, flip: bool, S: int, mode: str) -> torch.Tensor:
    """Per-image reference: crop, torch's antialiased resize in float, flip."""
    i, j, h, w = box
    x = img_chw[None, :, i:i + h, j:j + w].float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    y = F.interpolate(x, size=(S, S), mode=mode, antialias=True, align_corners=False)[0].clamp(0, 255)
    return y.flip(-1) if flip else y


def random_batch(seed: int, n: int, grey_every: int = 0):
    g = np.random.default_rng(seed)
    imgs, boxes = [], []
    for b in range(n):
        H, W = int(g.integers(5, 160)), int(g.integers(5, 160))
        c = 1 if grey_every and b % grey_every == 0 else 3
        imgs.append(torch.from_numpy(g.integers(0, 256, (c, H, W), dtype=np.uint8)))
        boxes.append(sample_crop(Draws(seed, 0, 0, b), H, W, (0.08, 1.0), (3 / 4, 4 / 3)))
    flips = torch.from_numpy(g.random(n) < 0.5)
    return imgs, torch.tensor(boxes), flips


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_batched_resize_matches_per_image_reference(mode):
    imgs, boxes, flips = random_batch(1, 12, grey_every=4)
    S = 40
    out = resized_crops(imgs, boxes, flips, S, mode, max_pixels=30000)  # several canvases
    assert out.shape == (12, 3, S, S)
    for b in range(12):
        ref = reference_crop(imgs[b], boxes[b].tolist(), bool(flips[b]), S, mode)
        assert (out[b] - ref).abs().max().item() < 1e-3


@pytest.mark.parametrize("backend", ["region", "whole"], indirect=True)
def test_cpu_path_matches_reference_on_the_same_pixels(backend):
    S = 32
    for seed, (H, W, grey) in enumerate([(47, 61, False), (33, 90, True), (120, 17, False), (64, 64, False)]):
        data = jpeg_bytes(H, W, seed, grey=grey)
        assert jpeg_size(data) == (H, W)
        arr = decode_rgb(data, H, W)
        assert arr.shape == (H, W, 3)
        if grey:
            assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
        for k in range(5):
            box = sample_crop(Draws(seed, 0, 0, k), H, W, (0.08, 1.0), (3 / 4, 4 / 3))
            flip = k % 2 == 1
            got = cpu_decode_crop(data, H, W, box, flip, S)
            assert got.dtype == torch.uint8 and got.shape == (3, S, S)
            ref = reference_crop(torch.from_numpy(arr).permute(2, 0, 1), box, flip, S, "bilinear")
            diff = (got.float() - ref).abs()
            assert diff.max().item() <= 1.0 and diff.mean().item() < 0.5


@pytest.mark.parametrize("backend", ["region", "whole"], indirect=True)
def test_reduced_decode_stays_close_to_full_decode(backend):
    H, W, S = 600, 800, 112
    data = jpeg_bytes(H, W, 3)
    box = (10, 30, 560, 700)
    assert reduction(560, 700, S) == 4
    full = cpu_decode_crop(data, H, W, box, False, S, reduce=False).float()
    small = cpu_decode_crop(data, H, W, box, False, S, reduce=True).float()
    assert (full - small).abs().mean().item() < 4.0
    assert reduction(300, 500, 224) == 1 and reduction(448, 900, 224) == 2


def test_jpeg_size_rejects_garbage():
    with pytest.raises(ValueError):
        jpeg_size(b"not a jpeg at all")
    data = jpeg_bytes(30, 40, 0)
    with pytest.raises(ValueError):
        jpeg_size(data[:20])


def test_color_jitter_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 9, 11, generator=g)
    f = torch.tensor([[1.3, 0.7, 1.2], [0.6, 1.4, 0.0], [1.0, 1.0, 1.0], [0.9, 1.2, 1.35]])
    got = color_jitter(x, f)
    for b in range(4):
        y = TF.adjust_brightness(x[b], float(f[b, 0]))
        y = TF.adjust_contrast(y, float(f[b, 1]))
        y = TF.adjust_saturation(y, float(f[b, 2]))
        assert (got[b] - y).abs().max().item() < 1e-5


def test_finish_normalises_and_casts():
    aug = AugmentConfig()
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    y = finish(x, None, aug, torch.bfloat16)
    assert y.dtype == torch.bfloat16
    want = (1 - torch.tensor(aug.mean)) / torch.tensor(aug.std)
    assert torch.allclose(y[0, :, 0, 0].float(), want, atol=1e-2)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_cpu_and_gpu_style_paths_agree_on_real_decodes(monkeypatch):
    """Same bytes and parameters through both paths (GPU maths run on the CPU): near-identical."""
    from torchvision.io import ImageReadMode, decode_jpeg

    monkeypatch.setattr(dec, "FAST_DCT", False)  # same IDCT as torchvision's CPU decoder
    S = 48
    datas = [jpeg_bytes(40 + 9 * k, 70 - 5 * k, k, grey=(k == 2)) for k in range(6)]
    sizes = [jpeg_size(d) for d in datas]
    par = draw_params(0, 0, [0] * 6, list(range(6)), sizes, AugmentConfig(size=S))
    cpu = torch.stack([cpu_decode_crop(d, *sz, par.box[b], bool(par.flip[b]), S) for b, (d, sz) in
                       enumerate(zip(datas, sizes))])
    imgs = [decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8), mode=ImageReadMode.RGB) for d in datas]
    gpu = resized_crops(imgs, torch.from_numpy(par.box), torch.from_numpy(par.flip), S)
    diff = (cpu.float() - gpu).abs()
    assert diff.max().item() <= 3.0 and diff.mean().item() < 0.6


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_device_decoder_batches_then_isolates_broken_images():
    """decode_cuda's logic (batched call, per-image fallback) with torchvision's CPU decoder."""
    from trainer.data.decode import decode_cuda

    datas = [torch.frombuffer(bytearray(jpeg_bytes(30 + k, 41, k, grey=(k == 1))), dtype=torch.uint8)
             for k in range(4)]
    imgs, errs = decode_cuda(datas, torch.device("cpu"))
    assert errs == [""] * 4 and [tuple(i.shape) for i in imgs] == [(3, 30 + k, 41) for k in range(4)]
    good = datas[2].numpy().tobytes()
    datas[2] = torch.frombuffer(bytearray(good[: len(good) // 2]), dtype=torch.uint8)
    imgs, errs = decode_cuda(datas, torch.device("cpu"))
    assert imgs[2] is None and errs[2] and all(imgs[k] is not None and not errs[k] for k in (0, 1, 3))
