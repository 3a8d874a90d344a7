"""URL lists end to end against a misbehaving local server: every URL written or rejected with
its reason; --retry-failed rewrites only the shards with download failures."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import text_pair_fixtures as fx
from shardify.cli import main
from shardify.download.fetcher import DownloadConfig
from shardify.download.retry import download_summary
from shardify.job import JobOptions
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
    # 12 download failures, of which the two bad_scheme ones (file: URLs) are not retryable
    assert "; 10 download failures can be retried with --retry-failed" in r.output
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
    assert manifest["source"]["revision"] == "0" * 40
    assert manifest["url_list_files"]["train"][0].startswith("unlabeled/")
    assert "downloaded and written 5 of 5 URLs (100.0%)" in download_summary(tmp_path / "out")


def test_prepare_retry_touches_only_this_nodes_failed_shards(tmp_path):
    from shardify import state
    from shardify.download.retry import prepare_retry

    for index, reason in enumerate(["http_404", "timeout", "placeholder", "http_500", "bad_scheme"]):
        name = f"train-{index:06d}"
        (tmp_path / f"{name}.tar").write_bytes(b"x")
        state.write_json_atomic(state.state_dir(tmp_path) / "shards" / f"{name}.json",
                                {"name": f"{name}.tar", "index": index, "rejects": [{"reason": reason}]})
    (tmp_path / "manifest.json").write_text("{}")
    assert prepare_retry(tmp_path, num_nodes=2, node_rank=0) == ["train-000000.tar"]  # 2: placeholder
    assert (tmp_path / "train-000001.tar").exists() and (tmp_path / "train-000002.tar").exists()
    assert not (tmp_path / "manifest.json").exists()
    assert prepare_retry(tmp_path, num_nodes=2, node_rank=1) == ["train-000001.tar", "train-000003.tar"]
    # 4: bad_scheme (a file: or ftp: URL) gives the same answer on every run: never retried
    assert prepare_retry(tmp_path, num_nodes=1, node_rank=0) == []
    assert (tmp_path / "train-000004.tar").exists()


@pytest.mark.slow  # four jobs of 27 URLs
def test_shards_are_byte_identical_whatever_the_concurrency_and_lookahead(server, tmp_path):
    paths = ["/good/1.jpg", "/404", "/png/3.png", "/redirect/4.jpg", "/html.jpg", "/tiny.jpg", "/good/7.jpg",
             "/to-file", "/403"] * 3
    rows = [{"url": server.url + p, "caption": f"c{i}"} for i, p in enumerate(paths)]
    fx.write_url_list(tmp_path / "list.csv", rows)
    outs = []
    for i, extra in enumerate((["--concurrency", "1", "--lookahead-mb", "1"], [], ["--concurrency", "5"], [])):
        out = tmp_path / f"out{i}"
        r = _cli(["pairs", "urls", "--source", str(tmp_path / "list.csv"), "--out", str(out),
                  "--samples-per-shard", "10", "--workers", "2", "--no-progress", "--timeout", "5",
                  "--retries", "0", "--host-rate", "0", *extra])
        assert r.exit_code == 0, r.output
        outs.append(out)
    names = sorted(p.name for p in outs[0].iterdir() if p.suffix in (".tar", ".idx", ".jsonl"))
    assert len([n for n in names if n.endswith(".tar")]) == 3
    for out in outs[1:]:
        assert sorted(p.name for p in out.iterdir() if p.suffix in (".tar", ".idx", ".jsonl")) == names
        for n in names:
            assert (out / n).read_bytes() == (outs[0] / n).read_bytes(), n
    totals = json.loads((outs[0] / "manifest.json").read_text())["totals"]
    assert (totals["samples"], totals["rejected"]) == (12, 15)  # good, png, redirect, good: 4 x 3


def test_image_bytes_checked_once_per_sample(server, tmp_path, monkeypatch):
    import shardify.sources.pairs as pairs
    from shardify.sources.pairs_urls import UrlListSource

    calls = []
    real = pairs.check_image_bytes
    monkeypatch.setattr(pairs, "check_image_bytes", lambda data: calls.append(len(data)) or real(data))
    (tmp_path / "src").mkdir()  # the output may not sit inside the source
    fx.write_url_list(tmp_path / "src" / "list.csv",
                      [{"url": f"{server.url}/good/{i}.jpg", "caption": "c"} for i in range(3)])
    src = UrlListSource(local_location(str(tmp_path / "src")),
                        download=DownloadConfig(timeout=2, retries=0, host_rate=0))
    from shardify.job import run_job

    manifest = run_job(src, tmp_path / "out", ["train"], JobOptions(progress=False), log=lambda m: None)
    assert manifest["totals"]["samples"] == 3
    assert len(calls) == 3


def test_lookahead_option_is_checked(tmp_path):
    fx.write_url_list(tmp_path / "list.csv", [{"url": "http://127.0.0.1:1/x.jpg", "caption": "c"}])
    base = ["pairs", "urls", "--source", str(tmp_path / "list.csv"), "--no-progress"]
    r = CliRunner().invoke(main, base + ["--out", str(tmp_path / "a"), "--lookahead-mb", "0"])
    assert r.exit_code == 2 and "--lookahead-mb" in r.output
    r = CliRunner().invoke(main, base + ["--out", str(tmp_path / "b"), "--lookahead-mb", "900000000",
                                         "--workers", "4"])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: --lookahead-mb 900000000 x --workers 4") and "memory" in r.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # a refused command writes nothing


@pytest.mark.parametrize("name", ["list.parquet", "list.jsonl"])
def test_a_damaged_url_list_is_one_line_naming_it(tmp_path, name):
    src = tmp_path / "src" / name
    fx.write_url_list(src, [{"url": f"http://127.0.0.1:1/{i}.jpg", "caption": "c"} for i in range(50)])
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])  # cut in the middle
    r = CliRunner().invoke(main, ["pairs", "urls", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
                                  "--no-progress"])
    assert r.exit_code == 2, r.output
    errors = [x for x in r.output.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and name in errors[0] and "cannot read this url list" in errors[0], r.output
    assert "Traceback" not in r.output and r.output.strip().splitlines()[-1] == errors[0]
