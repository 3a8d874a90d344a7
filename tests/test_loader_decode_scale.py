"""`augment.decode_scale`: the CPU path decodes at a DCT scale (dct) or at full scale (exact).

dct must decode the same crop box as exact (the loader's draws, mapped onto the smaller image),
with the right shapes and a bounded pixel difference; the key is checked by the typed config;
and `make bench-loader` runs end to end at a tiny size and prints its two summary lines.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.loader_fixtures import jpeg_bytes, write_shards
from tests.train_fixtures import REPO
from trainer.config import ConfigError, load_config
from trainer.data import AugmentConfig, DataConfig, build_loader
from trainer.data.decode import cpu_decode_crop, jpeg_size, reduction
from trainer.data.stream import BatchStream

S = 48
# photo-sized images, most crops of which are at least 2x the 48 px output (dct applies), one
# small and one grey image where it never does
SIZES = [(600, 800, False), (480, 640, False), (700, 500, True), (90, 120, False), (400, 420, False)]


def shards(root) -> str:
    def members(key, s, i):
        h, w, grey = SIZES[i]
        return {"jpg": jpeg_bytes(h, w, seed=10 + i, grey=grey), "cls": b"0"}
    return write_shards(str(root), [len(SIZES)], members)


def batches(root, decode_scale: str, epoch: int) -> list[dict]:
    cfg = DataConfig(manifests=[root], batch_size=len(SIZES), num_workers=0, decode_device="cpu",
                     shuffle_buffer=1, augment=AugmentConfig(size=S, decode_scale=decode_scale))
    ld = build_loader(cfg, 0, 1, torch.device("cpu"), "image")
    return list(BatchStream(ld.sources, cfg, "image", 0, 1, epoch, 0, gpu_decode=False))


@pytest.mark.parametrize("backend", ["region", "whole"], indirect=True)
def test_dct_decodes_the_same_crop_as_exact(tmp_path, backend):
    root = shards(tmp_path / "s")
    reduced = 0
    for epoch in range(3):
        dct, exact = batches(root, "dct", epoch), batches(root, "exact", epoch)
        assert len(dct) == len(exact) == 1
        a, b = dct[0], exact[0]
        assert a["key"] == b["key"] and torch.equal(a["box"], b["box"]) and torch.equal(a["flip"], b["flip"])
        assert a["image"].shape == b["image"].shape == (len(SIZES), 3, S, S)
        assert a["image"].dtype == b["image"].dtype == torch.uint8
        for k in range(len(SIZES)):
            box = a["box"][k].tolist()
            f = reduction(box[2], box[3], S)
            x, y = a["image"][k].to(torch.int16), b["image"][k].to(torch.int16)
            diff = (x - y).abs().float()
            if f == 1:  # nothing to reduce: the two settings are the same decode
                assert torch.equal(x, y)
                continue
            reduced += 1
            # the same box at a smaller scale: close everywhere, not the same pixels
            assert not torch.equal(x, y)
            assert diff.mean().item() < 4.0 and torch.quantile(diff.flatten(), 0.99).item() <= 24
            # a shifted box (by a tenth of the crop) is much further away: the box is the same
            i = int(a["key"][k].rsplit("_i", 1)[1])
            data = jpeg_bytes(*SIZES[i][:2], seed=10 + i, grey=SIZES[i][2])
            H, W = jpeg_size(data)
            top = min(box[0] + box[2] // 10, H - box[2])
            moved = cpu_decode_crop(data, H, W, (top, box[1], box[2], box[3]), bool(a["flip"][k]), S, reduce=False)
            if top != box[0]:
                assert (moved.to(torch.int16) - y).abs().float().mean().item() > diff.mean().item()
            # exact is the full-scale decode of that box
            assert torch.equal(cpu_decode_crop(data, H, W, box, bool(a["flip"][k]), S, reduce=False), b["image"][k])
    assert reduced >= 3  # the test saw the dct path at work


def test_decode_scale_is_a_checked_config_key():
    demo = os.path.join(REPO, "configs", "demo.yaml")
    assert load_config(demo).data.augment.decode_scale == AugmentConfig().decode_scale
    assert load_config(demo, ["data.augment.decode_scale=exact"]).data.augment.decode_scale == "exact"
    with pytest.raises(ConfigError) as e:
        load_config(demo, ["data.augment.decode_scale=fast"])
    assert "config key 'data.augment.decode_scale': 'fast' is not one of dct, exact" in str(e.value)


def test_default_decode_scale_is_what_the_docs_say():
    # docs/loader.md states the default and why (the measured pixel difference); keep them in step
    with open(os.path.join(REPO, "docs", "loader.md")) as f:
        text = f.read()
    assert f"`augment.decode_scale` (default `{AugmentConfig().decode_scale}`)" in text


@pytest.mark.slow
def test_bench_loader_runs_at_tiny_size(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for k, (h, w, grey) in enumerate(SIZES):
        (imgs / f"photo{k}.jpg").write_bytes(jpeg_bytes(h, w, seed=k, grey=grey))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "bench/bench_loader.py", "--images", str(imgs), "--out", str(tmp_path / "out"),
                        "--size", str(S), "--repeats", "1", "--diff-epochs", "1", "--no-dali"],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    num = r"\d+\.\d\d"
    assert re.fullmatch(rf"cpu loader \(decode_scale dct\) vs bare decode: {num}x; pixel difference to exact: "
                        rf"mean {num}, p99 \d+", lines[-2]), r.stdout
    assert re.fullmatch(rf"cpu loader vs DALI: not run \(--no-dali\); vs classic: {num}x; vs bare decode: {num}x",
                        lines[-1]), r.stdout
    m = re.search(r"decode_scale dct vs exact +all: mean ([\d.]+), p99 \d+; reduced-scale crops: mean ([\d.]+)",
                  r.stdout)
    assert m and float(m.group(2)) > 0, r.stdout  # the tiny set has crops that dct reduces
    assert np.isfinite(float(m.group(1)))
