"""The S-SMKE student's and teacher's views (data.teacher_view): drawn as the thesis's loader drew
them (student: RandomResizedCrop (0.9, 1.0) + flip 0.5; teacher: its own RandomResizedCrop
(0.9, 1.0) + flip 0.5 + colour jitter 0.4, ImageNet mean/std), independent of each other, cut
from one decode, computed as torchvision computes them, the same on the GPU-style path, and
the same after a resume."""

from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import ColorJitter, InterpolationMode, RandomResizedCrop

from tests.loader_fixtures import image_shards, tokenizer_path
from tests.test_loader_augment import crop_features, ks_critical, ks_stat
from tests.test_loader_gpu_path import META, CopySpy, meta_decoder
from trainer.data import AugmentConfig, DataConfig, build_loader
from trainer.data import decode as dec
from trainer.data import loader as loader_mod
from trainer.data.augment import Draws, draw_params
from trainer.data.stream import BatchStream

CPU = torch.device("cpu")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZES = [7, 6]  # samples per shard of the fixture


def student_aug(S: int = 32) -> AugmentConfig:
    return AugmentConfig(size=S, scale=(0.9, 1.0), hflip=0.5, color_jitter=0.0, interpolation="bicubic")


def teacher_aug(S: int = 32) -> AugmentConfig:
    return AugmentConfig(size=S, scale=(0.9, 1.0), hflip=0.5, color_jitter=0.4, interpolation="bicubic")


def test_both_views_are_drawn_as_specified_and_independently():
    n, H, W = 3000, 300, 400
    uids, sizes = list(range(n)), [(H, W)] * n
    s = draw_params(3, 1, [0] * n, uids, sizes, student_aug(), view=0)
    t = draw_params(3, 1, [0] * n, uids, sizes, teacher_aug(), view=1)
    # crop boxes: torchvision's RandomResizedCrop.get_params with scale (0.9, 1.0), both views
    torch.manual_seed(0)
    ref = [RandomResizedCrop.get_params(torch.empty(1, H, W), [0.9, 1.0], [3 / 4, 4 / 3]) for _ in range(n)]
    fr = crop_features(ref, H, W)
    for view in (s, t):
        fv = crop_features(view.box, H, W)
        for name in fr:
            assert ks_stat(fv[name], fr[name]) < ks_critical(n, n), name
        assert 0.45 < view.flip.mean() < 0.55  # RandomHorizontalFlip(p=0.5)
    # colour jitter: none for the student; for the teacher ColorJitter(0.4, 0.4, 0.4)'s factors
    assert s.jitter is None and t.jitter is not None and t.jitter.shape == (n, 3)
    torch.manual_seed(0)
    cj = ColorJitter(0.4, 0.4, 0.4)
    ref_f = np.array([[float(torch.empty(1).uniform_(*r)) for r in (cj.brightness, cj.contrast, cj.saturation)]
                      for _ in range(n)])
    for c in range(3):
        assert ks_stat(t.jitter[:, c], ref_f[:, c]) < ks_critical(n, n)
    # the two views are independent draws: different boxes, flips agreeing by chance only
    # (RandomResizedCrop falls back to the whole image when ten tries miss: at (0.9, 1.0) on a 4:3
    # image often; two independent views share a box about as often as both fall back)
    whole = np.array([0, 0, H, W])
    same = (s.box == t.box).all(1)
    p_s, p_t = (s.box == whole).all(1).mean(), (t.box == whole).all(1).mean()
    assert 0.05 < p_s < 0.5 and abs(same.mean() - p_s * p_t) < 0.03
    assert same[~(s.box == whole).all(1)].mean() < 0.01
    assert 0.45 < (s.flip == t.flip).mean() < 0.55
    assert abs(np.corrcoef(s.box[:, 2] * s.box[:, 3], t.box[:, 2] * t.box[:, 3])[0, 1]) < 0.1
    # view 0 is the stream single-view loaders always used (their runs resume unchanged)
    assert Draws(3, 1, 0, 5, view=0).base == Draws(3, 1, 0, 5).base != Draws(3, 1, 0, 5, view=1).base
    again = draw_params(3, 1, [0] * n, uids, sizes, teacher_aug(), view=1)
    assert (again.box == t.box).all() and (again.jitter == t.jitter).all()


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("views")
    return image_shards(str(root), SIZES)


def cfg_for(shards, batch_size=4, teacher=True, **kw) -> DataConfig:
    return DataConfig(manifests=[shards], batch_size=batch_size, num_workers=0, shuffle_buffer=8,
                      tokenizer=tokenizer_path(), text_max_len=8, augment=student_aug(),
                      teacher_view=teacher, teacher_augment=teacher_aug(), **kw)


def jpegs(shards: str) -> dict[str, bytes]:
    out = {}
    for tar in sorted(Path(shards).glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".jpg"):
                    out[m.name[:-4]] = tf.extractfile(m).read()
    return out


def uid_of(key: str) -> int:
    """The sample's index in its source: keys are s{shard}_i{index} (loader_fixtures)."""
    shard, index = int(key[1:4]), int(key.split("_i")[1])
    return sum(SIZES[:shard]) + index


def torchvision_view(data: bytes, box, flip: bool, jitter, S: int) -> torch.Tensor:
    """The view with torchvision's own functions: crop + antialiased bicubic resize (uint8),
    flip, brightness / contrast / saturation, ImageNet normalisation."""
    img = TF.pil_to_tensor(Image.open(io.BytesIO(data)).convert("RGB"))
    i, j, h, w = (int(v) for v in box)
    x = TF.resized_crop(img, i, j, h, w, [S, S], interpolation=InterpolationMode.BICUBIC, antialias=True)
    if flip:
        x = TF.horizontal_flip(x)
    x = x.float() / 255
    if jitter is not None:
        x = TF.adjust_brightness(x, float(jitter[0]))
        x = TF.adjust_contrast(x, float(jitter[1]))
        x = TF.adjust_saturation(x, float(jitter[2]))
    return TF.normalize(x, list(MEAN), list(STD))


def test_loader_views_equal_torchvision_on_the_drawn_parameters(shards, monkeypatch):
    monkeypatch.setattr(dec, "FAST_DCT", False)  # libjpeg's exact IDCT, as PIL decodes
    cfg = cfg_for(shards)
    blobs = jpegs(shards)
    n = 0
    for batch in build_loader(cfg, 0, 1, CPU, "image_text"):
        assert batch["image"].shape == batch["image_teacher"].shape == (4, 3, 32, 32)
        for b, key in enumerate(batch["key"]):
            data = blobs[key]
            hw = [dec.jpeg_size(data)]
            s = draw_params(cfg.seed, 0, [0], [uid_of(key)], hw, student_aug(), view=0)
            t = draw_params(cfg.seed, 0, [0], [uid_of(key)], hw, teacher_aug(), view=1)
            want_s = torchvision_view(data, s.box[0], s.flip[0], None, 32)
            want_t = torchvision_view(data, t.box[0], t.flip[0], t.jitter[0], 32)
            torch.testing.assert_close(batch["image"][b], want_s, atol=2e-5, rtol=0)
            torch.testing.assert_close(batch["image_teacher"][b], want_t, atol=2e-5, rtol=0)
            assert (batch["image"][b] - batch["image_teacher"][b]).abs().mean() > 0.01  # two different views
            n += 1
    assert n == 12


def test_without_teacher_view_the_batch_is_unchanged(shards):
    a = next(iter(build_loader(cfg_for(shards, teacher=False), 0, 1, CPU, "image_text")))
    b = next(iter(build_loader(cfg_for(shards), 0, 1, CPU, "image_text")))
    assert "image_teacher" not in a
    assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])  # the student's draws did not move


def test_validation_turns_both_views_into_the_plain_resize(shards):
    from dataclasses import replace

    cfg = cfg_for(shards)
    cfg = replace(cfg, augment=replace(cfg.augment, train=False))  # what the trainer's validation loader does
    batch = next(iter(build_loader(cfg, 0, 1, CPU, "image_text")))
    torch.testing.assert_close(batch["image"], batch["image_teacher"])  # same resize, same normalisation


def test_teacher_view_is_refused_for_other_kinds(shards):
    with pytest.raises(ValueError, match="data.teacher_view"):
        build_loader(cfg_for(shards), 0, 1, CPU, "image")


def test_resume_gives_the_same_views(shards):
    cfg = cfg_for(shards, batch_size=3)
    full = [(b["key"], b["image_teacher"]) for b in build_loader(cfg, 0, 1, CPU, "image_text")]
    ld = build_loader(cfg, 0, 1, CPU, "image_text")
    it = iter(ld)
    next(it)
    state = ld.state_dict()
    it.close()
    resumed = build_loader(cfg, 0, 1, CPU, "image_text")
    resumed.load_state_dict(state)
    rest = [(b["key"], b["image_teacher"]) for b in resumed]
    assert len(rest) == len(full) - 1
    for (ka, xa), (kb, xb) in zip(full[1:], rest, strict=True):
        assert ka == kb and torch.equal(xa, xb)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_gpu_style_path_cuts_the_same_two_views(shards, monkeypatch):
    """The GPU path's maths (one decode, resized_crops per view) run on the CPU with torchvision's
    decoder: the same views as the CPU path up to uint8 rounding."""
    monkeypatch.setattr(dec, "FAST_DCT", False)
    cfg = cfg_for(shards)
    ld = build_loader(cfg, 0, 1, CPU, "image_text")
    cpu_batches = list(BatchStream(ld.sources, cfg, "image_text", 0, 1, 0, 0, False))
    gpu_batches = list(BatchStream(ld.sources, cfg, "image_text", 0, 1, 0, 0, True))
    assert len(cpu_batches) == len(gpu_batches) == 3
    for wc, wg in zip(cpu_batches, gpu_batches, strict=True):
        assert torch.equal(wc["box_teacher"], wg["box_teacher"])
        assert torch.equal(wc["jitter_teacher"], wg["jitter_teacher"])
        ld.gpu_decode = False
        oc = ld._device_stage(wc)
        ld.gpu_decode = True
        og = ld._device_stage(wg)
        for k in ("image", "image_teacher"):
            diff = (oc[k] - og[k]).abs() * 255 * max(STD)  # in grey levels
            # bicubic on noisy upscaled crops: the uint8 kernel rounds between its two passes
            assert diff.max().item() <= 6.0 and diff.mean().item() < 0.6, k


def test_gpu_style_teacher_view_never_reads_back(shards, monkeypatch):
    """The teacher view adds no device read-back and no blocking copy (see test_loader_gpu_path)."""
    cfg = cfg_for(shards)
    ld = build_loader(cfg, 0, 1, CPU, "image_text")
    ld.device, ld.gpu_decode = META, True
    monkeypatch.setattr(loader_mod, "decode_cuda", meta_decoder)
    spy = CopySpy(monkeypatch)
    for wb in BatchStream(ld.sources, cfg, "image_text", 0, 1, 0, 0, True):
        out = ld._device_stage(wb)
        assert out["image_teacher"].device == META and out["image_teacher"].shape == (4, 3, 32, 32)
    assert spy.calls and all(spy.calls)


def test_the_student_never_gets_jitter_and_the_teacher_always_does():
    t = draw_params(0, 0, [0] * 50, list(range(50)), [(64, 64)] * 50, teacher_aug(), view=1)
    assert ((t.jitter >= 0.6) & (t.jitter <= 1.4)).all() and (np.abs(t.jitter - 1) > 1e-3).mean() > 0.9
    assert math.isclose(float(np.ptp(t.jitter[:, 0])), 0.8, abs_tol=0.15)  # spread over [0.6, 1.4]
