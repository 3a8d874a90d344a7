"""The GPU check's stages (bench/gpu_loader.py) run end to end on the CPU, with the CUDA calls
they make for timing and memory stood in for: GPU time is scarce, so the script must not fail
on a typo the first time it meets a GPU. The CUDA-only parts (streams, nvJPEG) are covered by
tests/test_loader_cuda.py on a GPU machine."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from loader_fixtures import jpeg_bytes
from trainer.data import loader as loader_mod

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def gl(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_loader_bench", REPO / "bench" / "gpu_loader.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "BATCH", 4)
    monkeypatch.setattr(mod, "SIZE", 32)
    monkeypatch.setattr(mod, "canonical_device", lambda d: torch.device("cpu"))
    monkeypatch.setattr(loader_mod, "_use_gpu", lambda decode_device, device: decode_device == "cuda")
    counters = {"alloc": 0}

    def allocated(dev=None):
        counters["alloc"] += 1
        return 100 << 20

    fakes = dict(is_available=lambda: True, synchronize=lambda dev=None: None,
                 get_device_name=lambda dev=None: "cpu stand-in", memory_allocated=allocated,
                 memory_reserved=lambda dev=None: 200 << 20, max_memory_allocated=lambda dev=None: 300 << 20,
                 reset_peak_memory_stats=lambda dev=None: None)
    for name, fn in fakes.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    return mod, counters


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_gpu_check_stages_run_on_cpu(gl, tmp_path, capsys, monkeypatch):
    mod, counters = gl
    pytest.importorskip("simplejpeg", reason="needs simplejpeg (the CPU path)")
    photos = tmp_path / "photos"
    photos.mkdir()
    for k in range(5):
        (photos / f"p{k}.jpg").write_bytes(jpeg_bytes(40 + 7 * k, 60 - 3 * k, k, grey=k == 2))
    (photos / "not_an_image.jpg").write_bytes(b"junk")  # refused like shardify would, not fatal
    shards = str(tmp_path / "shards")

    def run(*argv):
        monkeypatch.setattr(sys, "argv", ["gpu_loader.py", *argv])
        mod.main()
        return capsys.readouterr().out

    out = run("prepare", "--out", shards, "--images", str(photos), "--samples", "40")
    assert "gpu-check: prepare samples=40 source=real" in out and os.path.exists(os.path.join(shards, "manifest.json"))
    out = run("loader", "--shards", shards, "--workers", "0", "--seconds", "0.01")
    assert "gpu-check: loader gpu=" in out and "cpu=nan" not in out
    out = run("compare", "--shards", shards, "--workers", "0")
    line = [x for x in out.splitlines() if x.startswith("gpu-check: compare")][0]
    # on the CPU both "decoders" are libjpeg: the raw decodes agree to the IDCT/upsampling setting
    assert "decode_max=" in line and "crop_mean=" in line
    out = run("memory", "--shards", shards, "--workers", "0", "--batches", "12")
    assert "gpu-check: memory batches=12" in out and "flat=yes" in out and counters["alloc"] == 12
    # the check can fail: memory that grows by a batch's worth each step is reported
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev=None: _growing(counters))
    out = run("memory", "--shards", shards, "--workers", "0", "--batches", "12")
    assert "flat=NO" in out


def _growing(counters) -> int:
    counters["n"] = counters.get("n", 0) + 1
    return (100 << 20) * counters["n"]


def test_generated_photos_have_imagenet_like_sizes_and_subsampling():
    spec = importlib.util.spec_from_file_location("gpu_loader_bench2", REPO / "bench" / "gpu_loader.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from shardify.jpeg import check_stored_jpeg

    blobs, origin = mod._sources("", 12)
    assert "generated" in origin and len(blobs) == 12
    heads = [check_stored_jpeg(b) for b in blobs]
    assert (heads[0].width, heads[0].height) == (500, 375)
    assert {h.components for h in heads} == {1, 3}
