"""The hub code path of openwebtext and pairs, against the fake hub on 127.0.0.1: shards
streamed from the hub are byte-identical to those written from the same files as --source."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import text_pair_fixtures as fx
from fake_hub import FAKE_SHA, FakeHub, hub_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _both(tmp_path, repo_id, repo, cmd, args, extra_hub=()):
    """Run `shardify CMD ARGS` from the fake hub and from --source; compare the shards."""
    common = [*cmd, *args, "--samples-per-shard", "3", "--no-progress", "--max-reject-rate", "0.5"]
    with FakeHub({repo_id: repo}) as hub:
        proc = subprocess.run([sys.executable, "-m", "shardify", *common, "--out", str(tmp_path / "hub"), *extra_hub],
                              env=hub_env(hub.url, tmp_path / "home"), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    local = subprocess.run([sys.executable, "-m", "shardify", *common, "--out", str(tmp_path / "local"),
                            "--source", str(repo)], capture_output=True, text=True, timeout=180)
    assert local.returncode == 0, local.stderr + local.stdout
    hub_m = json.loads((tmp_path / "hub" / "manifest.json").read_text())
    local_m = json.loads((tmp_path / "local" / "manifest.json").read_text())
    assert hub_m["source"]["revision"] == FAKE_SHA and hub_m["source"]["id"] == repo_id
    for split, info in local_m["splits"].items():
        assert [s["sha256"] for s in hub_m["splits"][split]["shards"]] == [s["sha256"] for s in info["shards"]]
    return hub_m


def test_openwebtext_slices_from_hub(tmp_path):
    fx.make_owt_slices(tmp_path / "repo", slices=(0, 1), members=2, docs=3)
    m = _both(tmp_path, "Skylion007/openwebtext", tmp_path / "repo",
              ["openwebtext"],
              ["--split", "train", "--split-slices", "train=0-1"])
    assert m["source"]["layout"] == "slices" and m["splits"]["train"]["inputs"] == 14


def test_cc3m_wds_from_hub_is_staged(tmp_path):
    fx.make_wds_mirror(tmp_path / "repo", "cc3m", "train", shards=2, per_shard=3)
    m = _both(tmp_path, "pixparse/cc3m-wds", tmp_path / "repo", ["pairs", "cc3m"], ["--split", "train"])
    assert m["splits"]["train"]["samples"] == 6


def test_coco_from_a_hub_repo_in_the_same_layout(tmp_path):
    fx.make_coco_karpathy(tmp_path / "repo")
    m = _both(tmp_path, "someone/coco-karpathy", tmp_path / "repo", ["pairs", "coco-karpathy"],
              ["--split", "test"],
              extra_hub=["--repo", "someone/coco-karpathy"])
    assert m["splits"]["test"]["samples"] == 4


def test_openwebtext_parquet_from_hub(tmp_path):
    fx.make_owt_parquet(tmp_path / "repo", files=3, docs=4)
    m = _both(tmp_path, "Skylion007/openwebtext", tmp_path / "repo", ["openwebtext"],
              ["--split", "validation", "--slices", "2"])
    assert m["source"]["layout"] == "parquet" and m["splits"]["validation"]["samples"] == 4
    assert m["slice_files"]["2"] == "plain_text/train-00002-of-00003.parquet"


def test_flickr30k_from_hub(tmp_path):
    fx.make_flickr30k(tmp_path / "repo")
    m = _both(tmp_path, "nlphuji/flickr30k", tmp_path / "repo", ["pairs", "flickr30k"], ["--split", "test"])
    assert m["splits"]["test"]["samples"] == 5
