"""URL lists end to end against a misbehaving local server: every URL written or rejected with
its reason; --retry-failed rewrites only the shards with download failures."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import text_pair_fixtures as fx
from shardify.cli import main
from shardify.download import DownloadConfig
from shardify.job import JobOptions
from shardify.download_retry import download_summary
from shardify.storage import Location, local_location
from shardify.verify import verify
from test_owt import read_wds, rejects

pytestmark = pytest.mark.timeout(120)

# path on the test server -> the outcome the row must end in
CASES = {
    "/good/1.jpg": "ok", "/good/2.jpg": "ok", "/good/3.jpg": "ok", "/png/4.png": "ok",
    "/redirect/5.jpg": "ok", "/flaky/6.jpg": "http_500", "/tiny.jpg": "placeholder",
    "/html.jpg": "not_image", "/bomb.png": "too_many_pixels", "/404": "http_404", "/403": "http_403",
    "/500": "http_500", "/slow.jpg": "timeout", "/dribble.jpg": "timeout", "/loop-a": "redirect_loop",
    "/to-file": "bad_scheme", "/big.jpg": "too_large", "/gzip-bomb.jpg": "too_large",
    "/reset.jpg": "connection",
}


@pytest.fixture(scope="module")
def server():
    with fx.ImageServer(slow_s=3.0) as s:
        yield s


def _rows(server):
    rows = [{"URL": server.url + p, "TEXT": f"caption for {p}"} for p in CASES]
    rows.append({"URL": "", "TEXT": "no url"})
    rows.append({"URL": "file:///etc/passwd", "TEXT": "local file"})
    return rows


def _cli(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_url_list_every_url_accounted_for_then_retry(server, tmp_path):
    fx.write_url_list(tmp_path / "list.csv", _rows(server))
    out = tmp_path / "out"
    base = ["pairs", "urls", "--source", str(tmp_path / "list.csv"), "--out", str(out), "--url-col", "URL",
            "--caption-col", "TEXT", "--samples-per-shard", "4", "--workers", "2", "--no-progress",
            "--timeout", "2", "--retries", "0", "--backoff", "0.01", "--host-rate", "0", "--concurrency", "4",
            "--max-bytes", "2000000", "--max-pixels", "50000000"]
    r = _cli(base)
    assert r.exit_code == 0, r.output
    assert "downloaded and written 5 of 21 URLs" in r.output and "top errors:" in r.output
    assert verify(out) == []

    got = read_wds(out, "train")
    by_url = {json.loads(s["json"])["url"]: s for s in got.values()}
    reasons = {}
    for rej in rejects(out):
        row = int(rej["source"].rsplit("#", 1)[1])
        reasons[row] = rej["reason"]
    rows = _rows(server)
    for i, (path, want) in enumerate(CASES.items()):
        if want == "ok":
            s = by_url[server.url + path]
            assert s["txt"].decode() == f"caption for {path}"
            assert json.loads(s["json"])["image_id"] == f"list-{i}"
        else:
            assert reasons[i] == want, (path, reasons.get(i))
    assert reasons[len(CASES)] == "no_url" and reasons[len(CASES) + 1] == "bad_scheme"
    assert len(got) + len(reasons) == len(rows)

    # Rerun with --retry-failed: only shards with download failures are rewritten, and the
    # flaky URL (500 the first time) now succeeds.
    stats_dir = out / ".shardify" / "shards"
    before = {p.name: json.loads(p.read_text()) for p in stats_dir.glob("*.json")}
    clean = [n for n, st in before.items()
             if not any(r["reason"] in ("http_500", "timeout", "http_404", "http_403", "redirect_loop",
                                        "too_large", "connection") for r in st["rejects"])]
    mtimes = {n: (out / (before[n]["name"])).stat().st_mtime_ns for n in clean}
    r = _cli(base + ["--retry-failed"])
    assert r.exit_code == 0, r.output
    assert "--retry-failed: rewriting" in r.output
    for n in clean:
        assert (out / before[n]["name"]).stat().st_mtime_ns == mtimes[n]
    got = read_wds(out, "train")
    assert server.url + "/flaky/6.jpg" in {json.loads(s["json"])["url"] for s in got.values()}
    assert len(got) == 6
    assert verify(out) == []


@pytest.mark.parametrize("suffix", [".parquet", ".tsv", ".jsonl"])
def test_list_formats_and_hub_style_location(server, tmp_path, suffix):
    rows = [{"image_url": f"{server.url}/good/{i}.jpg", "caption": f"c{i}"} for i in range(5)]
    fx.write_url_list(tmp_path / "src" / "unlabeled" / f"train-00000-of-00001{suffix}", rows)
    fx.write_url_list(tmp_path / "src" / "labeled" / f"train-00000-of-00001{suffix}", rows[:1])
    from shardify.sources.pairs_urls import ConceptualCaptionsSource

    loc = local_location(str(tmp_path / "src"))
    # The hub path: the same code on a Location without a local path.
    hub_like = Location(loc.fs, loc.root, loc.files, repo_id="google-research-datasets/conceptual_captions",
                        revision="0" * 40)
    src = ConceptualCaptionsSource(hub_like, download=DownloadConfig(timeout=2, retries=0, host_rate=0))
    assert src.splits() == ["train"]
    from shardify.job import run_job

    manifest = run_job(src, tmp_path / "out", ["train"], JobOptions(progress=False), log=lambda m: None)
    assert manifest["splits"]["train"]["samples"] == 5
    assert manifest["source"]["revision"] == "0" * 40 and manifest["url_list_files"]["train"][0].startswith("unlabeled/")
    assert "downloaded and written 5 of 5 URLs (100.0%)" in download_summary(tmp_path / "out")


def test_prepare_retry_touches_only_this_nodes_failed_shards(tmp_path):
    from shardify import state
    from shardify.download_retry import prepare_retry

    for index, reason in enumerate(["http_404", "timeout", "placeholder", "http_500"]):
        name = f"train-{index:06d}"
        (tmp_path / f"{name}.tar").write_bytes(b"x")
        state.write_json_atomic(state.state_dir(tmp_path) / "shards" / f"{name}.json",
                                {"name": f"{name}.tar", "index": index, "rejects": [{"reason": reason}]})
    (tmp_path / "manifest.json").write_text("{}")
    assert prepare_retry(tmp_path, num_nodes=2, node_rank=0) == ["train-000000.tar"]  # 2: placeholder
    assert (tmp_path / "train-000001.tar").exists() and (tmp_path / "train-000002.tar").exists()
    assert not (tmp_path / "manifest.json").exists()
    assert prepare_retry(tmp_path, num_nodes=2, node_rank=1) == ["train-000001.tar", "train-000003.tar"]
