"""`shardify hf-images` (shardify/sources/hf_images.py) on directories laid out like the hub's
`uoft-cs/cifar10` and `uoft-cs/cifar100` repos, written by the `datasets` library itself (Image
and ClassLabel features in parquet): contract, rejects, resume, verify, and reading back with
webdataset."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from shardify.cli import main

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_cifar10(root: Path, n_train: int = 12, n_test: int = 5, bad: bool = True) -> Path:
    """plain_text/{train,test}-00000-of-00001.parquet with columns img {bytes, path} and label;
    with `bad`, the test split holds one undecodable image and one row without a label (-1)."""
    import datasets

    feats = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CIFAR10)})
    for split, n in (("train", n_train), ("test", n_test)):
        imgs = [{"bytes": _png(i + (0 if split == "train" else 1000)), "path": None} for i in range(n)]
        labels = [i % 10 for i in range(n)]
        if bad and split == "test":
            imgs[1] = {"bytes": b"not an image", "path": None}
            labels[2] = -1
        ds = datasets.Dataset.from_dict({"img": imgs, "label": labels}, features=feats)
        (root / "plain_text").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(root / "plain_text" / f"{split}-00000-of-00001.parquet"))
    return root


def make_cifar100(root: Path, n: int = 6) -> Path:
    import datasets

    fine, coarse = [f"fine{i}" for i in range(100)], [f"coarse{i}" for i in range(20)]
    feats = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=fine),
                               "coarse_label": datasets.ClassLabel(names=coarse)})
    for split in ("train", "test"):
        ds = datasets.Dataset.from_dict({"img": [{"bytes": _png(i), "path": None} for i in range(n)],
                                         "fine_label": [i * 7 for i in range(n)],
                                         "coarse_label": [i * 3 for i in range(n)]}, features=feats)
        (root / "cifar100").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(root / "cifar100" / f"{split}-00000-of-00001.parquet"))
    return root


def run(*args, code=0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def tree_bytes(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cifar10_contract_rejects_resume_and_verify(tmp_path):
    src = make_cifar10(tmp_path / "cifar10")
    out = tmp_path / "out"
    result = run("hf-images", "uoft-cs/cifar10", "--source", src, "--out", out, "--samples-per-shard", 4,
                 "--max-reject-rate", 0.5, "--no-progress")
    assert "train: inputs = written + rejected: 12 = 12 + 0" in result.output
    assert "test: inputs = written + rejected: 5 = 3 + 2" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"] == "cifar10" and manifest["classes"] == CIFAR10 == manifest["class_names"]
    assert manifest["source"]["id"] == "uoft-cs/cifar10" and set(manifest["splits"]) == {"train", "test"}
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert sorted((r["source"], r["reason"]) for r in rejects) == [
        ("plain_text/test-00000-of-00001.parquet#1", "unreadable"),
        ("plain_text/test-00000-of-00001.parquet#2", "no_label")]
    assert "OK" in run("verify", out, "--full", "--no-progress").output
    before = tree_bytes(out)
    assert "already complete" in run("hf-images", "uoft-cs/cifar10", "--source", src, "--out", out,
                                     "--samples-per-shard", 4, "--max-reject-rate", 0.5, "--no-progress").output
    assert tree_bytes(out) == before  # a finished job is left as it is

    wds = pytest.importorskip("webdataset")
    tars = [str(out / sh["name"]) for sh in manifest["splits"]["train"]["shards"]]
    samples = list(wds.WebDataset(tars, shardshuffle=False, empty_check=False))
    labels = sorted(int(s["cls"]) for s in samples)
    assert labels == sorted(i % 10 for i in range(12))
    with Image.open(io.BytesIO(samples[0]["jpg"])) as im:
        assert im.format == "JPEG" and im.size == (32, 32)
    assert samples[0]["__key__"].startswith("train-00000-of-00001_")


def test_cifar100_label_column_and_bad_columns(tmp_path):
    src = make_cifar100(tmp_path / "cifar100")
    out = tmp_path / "coarse"
    run("hf-images", "uoft-cs/cifar100", "--source", src, "--out", out, "--label-column", "coarse_label",
        "--split", "test", "--no-progress")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"] == "cifar100" and len(manifest["classes"]) == 20 and list(manifest["splits"]) == ["test"]
    result = run("hf-images", "uoft-cs/cifar100", "--source", src, "--out", tmp_path / "bad", "--no-progress", code=2)
    assert "no column 'label' (--label-column)" in result.output and "fine_label" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "bad" / "manifest.json").exists()
    result = run("hf-images", "uoft-cs/cifar100", "--source", src, "--out", tmp_path / "bad2", "--split", "validation",
                 "--no-progress", code=2)
    assert "no validation split in uoft-cs/cifar100 (has: train, test)" in result.output
