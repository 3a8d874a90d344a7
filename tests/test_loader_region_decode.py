"""The CPU image path's region decode (libturbojpeg 3) against whole-image decodes (simplejpeg).

Both backends must give the same pixels for the same crop: the region decode returns exactly
the rows and columns a full decode at the same DCT scale has there (tolerance 0: with fast
upsampling the library's cropped output is already identical; with smooth upsampling its edge
columns differ, so the decoder keeps an iMCU of margin, and these tests check that margin works).
"""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image

from loader_fixtures import image_shards, jpeg_bytes
from trainer.data import AugmentConfig, DataConfig, build_loader, tjregion
from trainer.data import decode as dec
from trainer.data.augment import Draws, sample_crop
from trainer.data.decode import cpu_decode_crop, jpeg_size, reduction

TJ = tjregion.load()
needs_tj = pytest.mark.skipif(TJ is None, reason=f"region decoder unavailable: {tjregion.why_not()}")


def photo(h: int, w: int, seed: int, subsampling: int = 2, grey: bool = False, progressive: bool = False) -> bytes:
    """A JPEG with edges and texture (so upsampling differences would show), given chroma
    subsampling (PIL: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0)."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 7 + yy * 3) % 256, ((xx // 9 + yy // 5) % 2) * 200 + 20, g.integers(0, 256, (h, w))], -1)
    im = Image.fromarray(img.astype(np.uint8))
    buf = io.BytesIO()
    if grey:
        im.convert("L").save(buf, format="JPEG", quality=85, progressive=progressive)
    else:
        im.save(buf, format="JPEG", quality=85, subsampling=subsampling, progressive=progressive)
    return buf.getvalue()


KINDS = [dict(subsampling=2), dict(subsampling=1), dict(subsampling=0), dict(grey=True),
         dict(subsampling=2, progressive=True)]


@needs_tj
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("kind", range(len(KINDS)))
def test_region_equals_the_same_rows_and_columns_of_a_full_decode(kind, fast):
    H, W = 203, 317  # not multiples of any iMCU size
    data = photo(H, W, kind, **KINDS[kind])
    g = np.random.default_rng(kind)
    for f in (1, 2, 4, 8):
        full = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=fast, fastupsample=fast,
                                      min_height=-(-H // f), min_width=-(-W // f))
        Hs, Ws = full.shape[:2]
        assert (Hs, Ws) == (-(-H // f), -(-W // f))
        boxes = [(0, Hs, 0, Ws), (Hs - 1, Hs, Ws - 1, Ws), (0, 1, 0, 1)]
        for _ in range(12):
            y0, x0 = int(g.integers(0, Hs)), int(g.integers(0, Ws))
            boxes.append((y0, int(g.integers(y0 + 1, Hs + 1)), x0, int(g.integers(x0 + 1, Ws + 1))))
        for y0, y1, x0, x1 in boxes:
            arr, ya, xa = TJ.decode(data, H, W, f, y0, y1, x0, x1, fast)
            assert ya <= y0 and xa <= x0 and ya + arr.shape[0] >= y1 and xa + arr.shape[1] >= x1
            if fast:  # nothing decoded but the box's rows and the columns from its iMCU on
                assert ya == y0 and arr.shape[0] == y1 - y0 and xa + arr.shape[1] == x1
                if x0 > 0 and y1 - y0 < Hs:
                    assert arr.size < full.size
            got = arr[y0 - ya:y1 - ya, x0 - xa:x1 - xa]
            np.testing.assert_array_equal(got, full[y0:y1, x0:x1], err_msg=f"f={f} box={(y0, y1, x0, x1)}")


@needs_tj
def test_unknown_subsampling_decodes_the_scaled_image_whole(monkeypatch):
    monkeypatch.setattr(tjregion, "MCU_WIDTH", ())  # every image's sampling is then "unknown"
    H, W = 90, 130
    data = photo(H, W, 5)
    arr, ya, xa = TJ.decode(data, H, W, 2, 10, 20, 30, 40, True)
    assert (ya, xa) == (0, 0) and arr.shape == (45, 65, 3)
    full = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=True, min_height=45, min_width=65)
    np.testing.assert_array_equal(arr, full)


@needs_tj
@pytest.mark.parametrize("fast", [True, False])
def test_both_backends_give_identical_crops(monkeypatch, fast):
    """Same crop parameters and maths: the region backend's output equals the whole-image one."""
    monkeypatch.setattr(dec, "FAST_DCT", fast)
    S = 24
    n = 0
    for k, kind in enumerate(KINDS):
        H, W = 150 + 31 * k, 260 - 23 * k
        data = photo(H, W, 10 + k, **kind)
        for u in range(10):
            box = sample_crop(Draws(k, 1, 0, u), H, W, (0.08, 1.0), (3 / 4, 4 / 3))
            flip = u % 2 == 0
            monkeypatch.setattr(dec, "REGION_DECODE", True)
            a = cpu_decode_crop(data, H, W, box, flip, S, "bicubic" if u % 3 == 0 else "bilinear")
            monkeypatch.setattr(dec, "REGION_DECODE", False)
            b = cpu_decode_crop(data, H, W, box, flip, S, "bicubic" if u % 3 == 0 else "bilinear")
            assert torch.equal(a, b), (kind, box)
            n += reduction(box[2], box[3], S) > 1
    assert n > 5  # the DCT-scaled paths were exercised, not only full-scale decodes


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("backend", ["region", "whole"], indirect=True)
def test_broken_jpegs_are_rejected_by_both_backends(backend, progressive):
    H, W = 96, 128
    data = photo(H, W, 3, progressive=progressive)
    box, S = (0, 0, 20, 30), 16  # a region at the top: the damage lies in rows it skips
    cpu_decode_crop(data, H, W, box, False, S)  # the intact file decodes
    truncated = [data[: len(data) // 2], data[:-40], data[:-2]]
    for bad in truncated:
        with pytest.raises(ValueError, match="truncated"):
            jpeg_size(bad)  # the loader's host-side check refuses it first...
        with pytest.raises(ValueError):  # ...and the decode path on its own does too
            cpu_decode_crop(bad, H, W, box, False, S)
    with pytest.raises(ValueError):  # header says one size, frame another
        cpu_decode_crop(data, H + 8, W, box, False, S)


@needs_tj
def test_backends_agree_on_which_damaged_files_decode(monkeypatch):
    """Bytes overwritten inside the entropy-coded data: both reject or both accept."""
    H, W = 64, 80
    data = photo(H, W, 4)
    sos = data.index(b"\xff\xda")
    g = np.random.default_rng(0)
    verdicts = []
    for t in range(40):
        bad = bytearray(data)
        p = int(g.integers(sos + 20, len(data) - 2))
        bad[p:p + 3] = bytes(g.integers(0, 256, 3, dtype=np.uint8))
        out = []
        for region in (True, False):
            monkeypatch.setattr(dec, "REGION_DECODE", region)
            try:
                cpu_decode_crop(bytes(bad), H, W, (0, 0, H, W), False, 16, reduce=False)
                out.append("ok")
            except ValueError:
                out.append("rejected")
        verdicts.append(out)
        assert out[0] == out[1], (t, p, out)
    assert ["rejected", "rejected"] in verdicts  # the damage did break some files


def _reset(monkeypatch, env: str | None):
    monkeypatch.setattr(tjregion, "_loaded", [])
    monkeypatch.setattr(dec, "_noted", False)
    if env is None:
        monkeypatch.delenv("TRAINER_LIBTURBOJPEG", raising=False)
    else:
        monkeypatch.setenv("TRAINER_LIBTURBOJPEG", env)


@pytest.mark.parametrize("env", ["/nonexistent/libturbojpeg.so.0", "off"])
def test_unloadable_library_falls_back_with_one_note(monkeypatch, caplog, env):
    _reset(monkeypatch, env)
    H, W = 70, 90
    data = jpeg_bytes(H, W, 1)
    with caplog.at_level(logging.WARNING, logger="trainer.data.decode"):
        outs = [cpu_decode_crop(data, H, W, (5, 6, 40, 50), k % 2 == 1, 16) for k in range(3)]
    assert tjregion.load() is None and env in tjregion.why_not()
    notes = [r for r in caplog.records if "simplejpeg" in r.getMessage()]
    assert len(notes) == 1, caplog.text
    monkeypatch.setattr(dec, "REGION_DECODE", False)
    assert torch.equal(outs[0], cpu_decode_crop(data, H, W, (5, 6, 40, 50), False, 16))


def test_a_library_without_the_turbojpeg3_api_is_refused(monkeypatch):
    import ctypes.util

    libc = ctypes.util.find_library("c")
    _reset(monkeypatch, libc)
    assert tjregion.load() is None and "tj3Init" in tjregion.why_not()


@needs_tj
def test_the_bundled_library_is_found_without_configuration(monkeypatch):
    _reset(monkeypatch, None)
    assert tjregion.library_path() and tjregion.load() is not None and tjregion.why_not() == ""


def test_loader_batches_are_identical_with_either_backend(tmp_path, monkeypatch):
    if TJ is None:
        pytest.skip(f"region decoder unavailable: {tjregion.why_not()}")
    shards = image_shards(str(tmp_path / "img"), [7, 5])
    cfg = DataConfig(manifests=[shards], batch_size=4, num_workers=0, shuffle_buffer=0,
                     augment=AugmentConfig(size=16))
    calls = []
    real = TJ.decode
    monkeypatch.setattr(TJ, "decode", lambda *a: calls.append(a[4]) or real(*a))  # a[4]: the scale
    runs, used = [], []
    for region in (True, False):
        monkeypatch.setattr(dec, "REGION_DECODE", region)
        runs.append(list(build_loader(cfg, 0, 1, torch.device("cpu"), "image")))
        used.append(len(calls))
    assert used == [12, 12]  # every image of the first run through the region decoder, none after
    assert len(runs[0]) == len(runs[1]) == 3
    for a, b in zip(*runs):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])


@needs_tj
def test_damage_below_the_crop_is_not_read(monkeypatch):
    """What the region decode gives up (docs/loader.md): entropy data below the box's last row is
    never read, so damage there (the end-of-image marker intact) leaves the crop's pixels as
    they are, while the whole-image decode refuses the file."""
    H, W = 160, 96
    data = photo(H, W, 6)
    g = np.random.default_rng(1)
    for _ in range(50):
        bad = bytearray(data)
        p = int(g.integers(len(data) - 200, len(data) - 10))
        bad[p:p + 4] = bytes(g.integers(0, 256, 4, dtype=np.uint8))
        try:
            simplejpeg.decode_jpeg(bytes(bad), colorspace="RGB", strict=True)
        except ValueError:
            break
    else:
        pytest.fail("no damage the whole-image decoder refuses")
    box = (0, 0, 40, 60)  # the top quarter
    monkeypatch.setattr(dec, "REGION_DECODE", True)
    assert torch.equal(cpu_decode_crop(bytes(bad), H, W, box, False, 16), cpu_decode_crop(data, H, W, box, False, 16))
    monkeypatch.setattr(dec, "REGION_DECODE", False)
    with pytest.raises(ValueError):
        cpu_decode_crop(bytes(bad), H, W, box, False, 16)


@needs_tj
def test_the_restart_marker_experiment_cuts_files_that_decode_to_the_same_pixels(tmp_path):
    """bench/restart_markers.py (docs/benchmarks.md): its scan cut must give the pixels of the
    whole file (it asserts that on every photo), also where later markers are renumbered."""
    import subprocess
    import sys
    from pathlib import Path

    for k, (h, w) in enumerate([(300, 410), (517, 333), (260, 260)]):
        (tmp_path / f"p{k}.jpg").write_bytes(photo(h, w, seed=k))
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(repo / "bench" / "restart_markers.py"), "--images", str(tmp_path),
                        "--repeats", "1", "--every", "1", "3"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert [line.split(":")[0] for line in r.stdout.splitlines() if line.startswith("restart markers")] == [
        "restart markers every 1 rows", "restart markers every 3 rows"]
