"""The hub code path for real: resolve a revision, stream archives/parquet through HfFileSystem.

A fake hub on 127.0.0.1 serves generated ImageNet copies in the hub layouts; the shards must
equal those written from the same files as a local --source, apart from the recorded provenance.
"""

import json
import subprocess
import sys

import pytest

import imagenet_fixtures as fx
from fake_hub import FAKE_SHA, FakeHub, hub_env


@pytest.mark.parametrize("layout", ["archives", "parquet", "wds"])
def test_shard_from_the_hub_equals_local(tmp_path, layout):
    repo = fx.LAYOUT_WRITERS[layout](tmp_path / "repo")
    common = ["--samples-per-shard", "5", "--max-reject-rate", "0.5", "--no-progress"]
    with FakeHub({"ILSVRC/imagenet-1k": repo}) as hub:
        # two workers: the train archives/files are staged in parallel forked processes
        proc = subprocess.run([sys.executable, "-m", "shardify", "imagenet", "--out", str(tmp_path / "hub"),
                               "--workers", "2", *common],
                              env=hub_env(hub.url, tmp_path / "home"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    local = subprocess.run([sys.executable, "-m", "shardify", "imagenet", "--source", str(repo),
                            "--out", str(tmp_path / "local"), *common], capture_output=True, text=True, timeout=120)
    assert local.returncode == 0, local.stderr
    hub_manifest = json.loads((tmp_path / "hub" / "manifest.json").read_text())
    local_manifest = json.loads((tmp_path / "local" / "manifest.json").read_text())
    assert hub_manifest["source"]["revision"] == FAKE_SHA
    assert hub_manifest["source"]["id"] == "ILSVRC/imagenet-1k" and hub_manifest["source"]["layout"] == layout
    assert hub_manifest["source"]["local_path"] is None
    for split in ("train", "validation"):
        hub_shards = [(s["name"], s["samples"], s["first_key"]) for s in hub_manifest["splits"][split]["shards"]]
        local_shards = [(s["name"], s["samples"], s["first_key"]) for s in local_manifest["splits"][split]["shards"]]
        assert hub_shards == local_shards
    assert hub_manifest["totals"] == local_manifest["totals"]
