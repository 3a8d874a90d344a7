"""The URL fetcher against a misbehaving local server: every answer ends in bytes or a reason."""

from __future__ import annotations

import time

import pytest

import text_pair_fixtures as fx
from shardify.download import DownloadConfig, HostRateLimiter, check_image_bytes, fetch
from shardify.records import Item, Reject
from shardify.sources.pairs_urls import DownloadReader

pytestmark = pytest.mark.timeout(60)

CFG = DownloadConfig(timeout=1.0, retries=2, backoff=0.01, max_backoff=0.05, concurrency=8,
                     host_rate=0, max_bytes=2_000_000)


@pytest.fixture(scope="module")
def server():
    with fx.ImageServer(slow_s=3.0) as s:
        yield s


def reason(url, cfg=CFG):
    try:
        fetch(url, cfg)
    except Reject as rej:
        return rej.reason
    return "ok"


@pytest.mark.parametrize("path,want", [
    ("/good/1.jpg", "ok"), ("/redirect/2.jpg", "ok"), ("/404", "http_404"), ("/403", "http_403"),
    ("/500", "http_500"), ("/429", "http_429"), ("/loop-a", "redirect_loop"), ("/to-file", "bad_scheme"),
    ("/big.jpg", "too_large"), ("/big-stream.jpg", "too_large"), ("/gzip-bomb.jpg", "too_large"),
    ("/slow.jpg", "timeout"), ("/dribble.jpg", "timeout"), ("/reset.jpg", "connection"),
])
def test_fetch_outcomes(server, path, want):
    t0 = time.monotonic()
    assert reason(server.url + path) == want
    # Deadlines hold: at most (retries + 1) attempts of ~timeout each, plus small backoffs.
    assert time.monotonic() - t0 < (CFG.retries + 1) * 2 * CFG.timeout + 1


def test_retries_only_transient(server):
    fetch(server.url + "/flaky/7.jpg", CFG)
    assert server.hits["/flaky/7.jpg"] == 2  # 500, then 200
    before = server.hits.get("/404", 0)
    reason(server.url + "/404")
    assert server.hits["/404"] - before == 1  # never retried
    before = server.hits.get("/500", 0)
    reason(server.url + "/500")
    assert server.hits["/500"] - before == CFG.retries + 1


def test_bad_urls_without_network():
    assert reason("file:///etc/passwd") == "bad_scheme"
    assert reason("ftp://example.com/x.jpg") == "bad_scheme"
    assert reason("http:///nohost") == "bad_url"
    assert reason("http://127.0.0.1:1/refused.jpg", DownloadConfig(timeout=0.5, retries=0)) == "connection"


def test_check_image_bytes():
    check_image_bytes(fx.jpeg_bytes())
    check_image_bytes(fx.png_bytes())
    for data, want in ((b"", "empty"), (b"<!DOCTYPE html><p>", "not_image"), (b"{\"error\": 1}", "not_image")):
        with pytest.raises(Reject) as e:
            check_image_bytes(data)
        assert e.value.reason == want


def test_reader_yields_in_order_and_concurrently(server):
    items = [Item(key=f"k{i}", origin="t", loc=f"{server.url}/good/{i}.jpg") for i in range(20)]
    slow_at = (2, 7, 11, 16)
    for pos in slow_at:
        items.insert(pos, Item(key=f"slow{pos}", origin="t", loc=server.url + "/slow.jpg"))
    cfg = DownloadConfig(timeout=1.5, retries=0, concurrency=8, host_rate=0)
    reader = DownloadReader(cfg)
    t0 = time.monotonic()
    out = list(reader.read_many(items))
    elapsed = time.monotonic() - t0
    reader.close()
    assert [it.key for it, _ in out] == [it.key for it in items]
    for it, got in out:
        if it.key.startswith("slow"):
            assert isinstance(got, Reject) and got.reason == "timeout"
        else:
            assert isinstance(got, bytes), (it.key, got)
    assert elapsed < 4 * cfg.timeout  # the four slow ones waited in parallel, not one after another


def test_host_rate_limit():
    limiter = HostRateLimiter(rate=20)
    t0 = time.monotonic()
    for _ in range(6):
        limiter.wait("a.example")
    limiter.wait("b.example")  # another host is not held up
    assert 0.2 <= time.monotonic() - t0 < 1.0


def test_unknown_binary_formats_go_on_to_the_decoder():
    check_image_bytes(b"\x00\x00\x00\x1cftypavif" + bytes(range(256)))  # not refused here
