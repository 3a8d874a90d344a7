"""The GPU image path on a CUDA device: nvJPEG against libjpeg within a derived bound, the
stream race, no host waits in the device stage, and the look-ahead loader's exact state.
Skipped with a visible reason when no GPU is present (the CPU tests cover the same code on
CPU and meta tensors: tests/test_loader_gpu_path.py).

The tolerance of nvJPEG against libjpeg-turbo (`fastdct=False, fastupsample=True`: the
accurate integer IDCT and chroma replication, which nvJPEG's default upsampling also does):
both IDCTs meet IEEE 1180 (peak error 1 against the exact transform), so Y, Cb and Cr each
differ by at most 2; R = Y + 1.402 Cr', G = Y - 0.344 Cb' - 0.714 Cr', B = Y + 1.772 Cb', so a
channel differs by at most 2 + 1.772 * 2 plus 1 for the two colour conversions' roundings:
6 grey levels. The per-pixel RMS bound (0.02 mean square error per IDCT, both conversions'
rounding) is about 0.6; one decoder truncating instead of rounding adds up to 0.5, so the mean
absolute difference stays under 1.1. Resizing is a weighted mean with weights summing to 1
(bilinear: all positive), so the bound carries over to crops, plus the CPU path's uint8
rounding (0.5): 7 and 1.6 grey levels. Against libjpeg's smooth ("fancy") chroma upsampling
there is no such bound: colour edges differ by tens of levels.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from loader_fixtures import image_shards
from trainer.data import AugmentConfig, DataConfig, build_loader
from trainer.data.augment import cpu_resized_crop, draw_params, finish, resized_crops
from trainer.data.decode import decode_cuda, jpeg_size
from trainer.data.loader import canonical_device

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

MAX_DECODE, MEAN_DECODE = 6.0, 1.1  # grey levels; derived in the module docstring
MAX_CROP, MEAN_CROP = 7.0, 1.6


def photo(h: int, w: int, seed: int, subsampling: int = 2, grey: bool = False, quality: int = 90) -> bytes:
    """A photo-like JPEG: smooth shading, texture and hard colour edges (chroma upsampling shows)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 90 * np.sin(xx / (17 + seed)), 128 + 90 * np.cos(yy / 23), (xx + yy) % 256], -1)
    img += rng.normal(0, 12, (h, w, 3))
    img[(xx // 40 + yy // 40) % 2 == 0] = [220, 30, 40]  # saturated red squares: colour edges
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if grey:
        im = im.convert("L")
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, **({} if grey else {"subsampling": subsampling}))
    return buf.getvalue()


def cpu_decode(data: bytes, fancy: bool) -> np.ndarray:
    simplejpeg = pytest.importorskip("simplejpeg", reason="needs simplejpeg (the CPU decoder) for the comparison")
    return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=not fancy)


def gpu_decode(datas: list[bytes], dev) -> list[torch.Tensor]:
    imgs, errs = decode_cuda([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas], dev)
    assert not any(errs), errs
    return imgs


SAMPLES = [photo(375, 500, 0), photo(333, 500, 1), photo(500, 375, 2, subsampling=1),
           photo(400, 400, 3, subsampling=0), photo(375, 500, 4, grey=True), photo(481, 640, 5, quality=75)]


def test_nvjpeg_matches_libjpeg_with_replicated_chroma_within_the_bound():
    dev = canonical_device("cuda")
    imgs = gpu_decode(SAMPLES, dev)
    for k, (data, img) in enumerate(zip(SAMPLES, imgs)):
        g = img.permute(1, 2, 0).cpu().numpy().astype(np.int16)
        rep = np.abs(g - cpu_decode(data, fancy=False))
        fancy = np.abs(g - cpu_decode(data, fancy=True))
        print(f"sample {k}: replicated chroma max {rep.max()} mean {rep.mean():.3f}; "
              f"smooth chroma max {fancy.max()} mean {fancy.mean():.3f}")
        assert rep.max() <= MAX_DECODE and rep.mean() <= MEAN_DECODE, k
        assert rep.mean() <= fancy.mean() + 1e-9, "libjpeg's smooth upsampling matched nvJPEG better"


def test_gpu_crops_match_the_cpu_reference_on_the_same_parameters():
    dev = canonical_device("cuda")
    S = 224
    sizes = [jpeg_size(d) for d in SAMPLES]
    par = draw_params(0, 0, [0] * len(SAMPLES), list(range(len(SAMPLES))), sizes, AugmentConfig(size=S))
    got = resized_crops(gpu_decode(SAMPLES, dev), par.box, par.flip, S).cpu()
    for b, data in enumerate(SAMPLES):
        ref = cpu_resized_crop(cpu_decode(data, fancy=False), tuple(par.box[b]), bool(par.flip[b]), S).float()
        d = (got[b] - ref).abs()
        assert d.max().item() <= MAX_CROP and d.mean().item() <= MEAN_CROP, (b, d.max().item(), d.mean().item())


def test_resize_and_normalise_queue_work_without_host_waits():
    dev = canonical_device("cuda")
    imgs = gpu_decode(SAMPLES, dev)
    sizes = [jpeg_size(d) for d in SAMPLES]
    aug = AugmentConfig(size=224, color_jitter=0.4)
    par = draw_params(0, 0, [0] * len(SAMPLES), list(range(len(SAMPLES))), sizes, aug)
    torch.cuda.synchronize(dev)
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call below raises
    try:
        x = resized_crops(imgs, par.box, par.flip, 224)
        y = finish(x, torch.from_numpy(par.jitter), aug, torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert y.shape == (len(SAMPLES), 3, 224, 224) and torch.isfinite(y.float()).all()


def test_decode_never_overwrites_memory_that_queued_kernels_still_read():
    """The stream race: blocks freed on the caller's stream while kernels there still read them
    must not be handed to the decoder. Fill, queue a long kernel and reductions, free, decode,
    then check the reductions (the scheme of the upstream report)."""
    dev = canonical_device("cuda")
    datas = [photo(768, 1024, k) for k in range(4)]
    n = 3 * 768 * 1024
    wrong = 0
    for _ in range(10):
        xs = [torch.full((n,), k + 1, dtype=torch.uint8, device=dev) for k in range(8)]
        torch.cuda.synchronize(dev)
        torch.cuda._sleep(50_000_000)  # keeps the stream busy while the decode runs
        sums = [x.sum(dtype=torch.int64) for x in xs]
        del xs  # freed while the reductions are still queued
        imgs = gpu_decode(datas, dev)
        torch.cuda.synchronize(dev)
        wrong += sum(int(s) != (k + 1) * n for k, s in enumerate(sums))
        del imgs
    assert wrong == 0


def test_cuda_loader_with_lookahead_matches_inline_and_keeps_exact_state(tmp_path):
    d = image_shards(str(tmp_path / "img"), [9, 4, 6])
    cfg = DataConfig(manifests=[d], batch_size=4, num_workers=0, shuffle_buffer=5, decode_device="cuda",
                     augment=AugmentConfig(size=32, color_jitter=0.4), remainder="pad")
    runs = []
    for ahead in (0, 1):
        ld = build_loader(cfg, 0, 1, torch.device("cuda"), "image")
        assert ld.device.index is not None and ld.lookahead == 1
        ld.lookahead = ahead
        out = []
        for batch in ld:
            out.append((batch["key"], batch["image"].float().cpu(), ld.state_dict()))
        runs.append(out)
    assert len(runs[0]) == len(runs[1])
    for (k0, x0, s0), (k1, x1, s1) in zip(*runs):
        assert k0 == k1 and s0 == s1 and torch.allclose(x0, x1, atol=1e-5)
