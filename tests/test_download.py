"""The URL fetcher against a misbehaving local server: every answer ends in bytes or a reason."""

from __future__ import annotations

import time

import pytest

import text_pair_fixtures as fx
from shardify.download.fetcher import DownloadConfig, HostRateLimiter, check_image_bytes, fetch
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


# ---------------------------------------------------------------- look-ahead past a slow URL
class GateServer:
    """127.0.0.1 server: /img/N-SIZE answers SIZE bytes (fixed per N) at once; /gate/N answers
    only once `gate` is set. `served` counts /img answers sent, under a condition to wait on."""

    def __init__(self):
        import http.server
        import threading

        self.gate = threading.Event()
        self.cond = threading.Condition()
        self.served = 0
        self.hosts: list[str] = []  # the Host header of every request, in arrival order
        self.in_flight = self.most_in_flight = 0
        self.delay = 0.0  # seconds each answer waits before it is sent
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                with server.cond:
                    server.hosts.append(self.headers.get("Host", "").split(":")[0])
                    server.in_flight += 1
                    server.most_in_flight = max(server.most_in_flight, server.in_flight)
                try:
                    self._answer()
                finally:
                    with server.cond:
                        server.in_flight -= 1

            def _answer(self):
                kind, name = self.path.strip("/").split("/")
                time.sleep(server.delay)
                if kind == "gate":
                    server.gate.wait(60)
                n, size = (int(x) for x in name.split("-"))
                body = GateServer.body(n, size)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    return
                if kind == "img":
                    with server.cond:
                        server.served += 1
                        server.cond.notify_all()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @staticmethod
    def body(n: int, size: int) -> bytes:
        import random

        return b"\xff\xd8\xff" + random.Random(n).randbytes(size - 3)

    def wait_served(self, count: int, timeout: float = 30.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.served >= count, timeout)

    def close(self):
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def gate_server():
    s = GateServer()
    yield s
    s.close()


def _read_in_background(reader, items):
    import threading

    out: list = []
    thread = threading.Thread(target=lambda: out.extend(reader.read_many(items)), daemon=True)
    thread.start()
    return thread, out


def _check(out, items, sizes):
    assert [it.key for it, _ in out] == [it.key for it in items]
    for (item, got), (n, size) in zip(out, sizes):
        assert got == GateServer.body(n, size), item.key


def test_one_slow_url_at_the_front_does_not_stall_the_others(gate_server):
    sizes = [(n, 5000 + 37 * n) for n in range(41)]
    items = [Item(key=f"k{n}", origin="t", loc=f"{gate_server.url}/{'gate' if n == 0 else 'img'}/{n}-{s}")
             for n, s in sizes]
    reader = DownloadReader(DownloadConfig(timeout=60, retries=0, concurrency=4, host_rate=0))
    thread, out = _read_in_background(reader, items)
    # Every URL behind the slow one is fetched while it is still pending (with a look-ahead of
    # 2 x concurrency only 7 of them would be).
    assert gate_server.wait_served(40), f"only {gate_server.served} of 40 fetched while the first was pending"
    assert out == []  # ... but nothing is handed back before the first
    gate_server.gate.set()
    thread.join(30)
    reader.close()
    _check(out, items, sizes)


def test_lookahead_bytes_stay_within_the_limit(gate_server):
    limit = 100_000
    sizes = [(n, 150_000 if n == 9 else 20_000) for n in range(30)]  # item 9 alone exceeds the limit
    items = [Item(key=f"k{n}", origin="t", loc=f"{gate_server.url}/{'gate' if n == 0 else 'img'}/{n}-{s}")
             for n, s in sizes]
    reader = DownloadReader(DownloadConfig(timeout=60, retries=0, concurrency=4, host_rate=0,
                                           lookahead_bytes=limit))
    thread, out = _read_in_background(reader, items)
    # While the first URL is pending, the others fill the window until nothing more fits.
    import time as _time

    for _ in range(3000):
        window = reader.fetcher.window
        if window is not None and window.held + 20_000 > limit:
            break
        _time.sleep(0.01)
    else:
        pytest.fail("the look-ahead never filled up")
    assert window.held <= limit
    assert gate_server.served < len(items) - 1  # the bound stopped the look-ahead
    gate_server.gate.set()
    thread.join(30)
    reader.close()
    _check(out, items, sizes)  # the item larger than the limit passed too
    assert 0 < window.peak <= limit
    assert window.held == 0 and window.waiting == 0


def test_reader_output_is_the_in_order_result_and_the_same_on_rerun(server):
    paths = ["/good/1.jpg", "/404", "/png/3.png", "/redirect/4.jpg", "/html.jpg", "/to-file", "/tiny.jpg",
             "/403", "/good/9.jpg"] * 4
    items = [Item(key=f"k{i}", origin="t", loc=server.url + p) for i, p in enumerate(paths)]
    items.append(Item(key="nourl", origin="t", loc="", meta={"reject": "no_url", "detail": "empty url"}))
    cfg = DownloadConfig(timeout=2, retries=0, host_rate=0)

    def outcome(got):
        return got if isinstance(got, bytes) else (got.reason, got.detail)

    in_order = []
    for item in items:  # the reference: one URL after the other
        try:
            in_order.append(DownloadReader(cfg).read(item))
        except Reject as rej:
            in_order.append((rej.reason, rej.detail))
    for concurrency, lookahead in ((8, 256_000_000), (3, 1_000), (1, 1)):
        reader = DownloadReader(DownloadConfig(timeout=2, retries=0, host_rate=0, concurrency=concurrency,
                                               lookahead_bytes=lookahead))
        got = [outcome(g) for _, g in reader.read_many(items)]
        reader.close()
        assert got == in_order, (concurrency, lookahead)


def test_a_writer_that_stops_early_releases_the_threads(gate_server):
    sizes = [(n, 20_000) for n in range(12)]
    items = [Item(key=f"k{n}", origin="t", loc=f"{gate_server.url}/img/{n}-{s}") for n, s in sizes]
    reader = DownloadReader(DownloadConfig(timeout=60, retries=0, concurrency=4, host_rate=0,
                                           lookahead_bytes=30_000))
    it = reader.read_many(items)
    first = next(it)
    assert first[1] == GateServer.body(0, 20_000)
    del it  # the writer failed: threads waiting for room must end, close() must not hang
    reader.close()
    assert reader.fetcher.window.closed


def test_urls_of_a_host_waiting_for_its_turn_do_not_hold_up_other_hosts(gate_server):
    """Eight URLs on one host, then eight on another, 5 requests a second per host and 2
    request slots: the second host's URLs go while the first host's wait for their turns (a
    thread per URL that slept for its turn inside a slot made them wait behind all eight)."""
    port = gate_server.url.rsplit(":", 1)[1]
    items = [Item(key=f"k{n}", origin="t", loc=f"http://{'127.0.0.1' if n < 8 else 'localhost'}:{port}/img/{n}-500")
             for n in range(16)]
    reader = DownloadReader(DownloadConfig(timeout=30, retries=0, concurrency=2, host_rate=5))
    out = list(reader.read_many(items))
    reader.close()
    _check(out, items, [(n, 500) for n in range(16)])
    # the first host's turns come at 0, 0.2, 0.4 ... s: the other host's first URL goes at once
    # (it went after the first host's seventh when threads slept for turns in their slots)
    assert gate_server.hosts.index("localhost") <= 2, gate_server.hosts


def test_at_most_concurrency_requests_plus_the_head_s_are_in_flight(gate_server):
    gate_server.delay = 0.05
    items = [Item(key=f"k{n}", origin="t", loc=f"{gate_server.url}/img/{n}-1000") for n in range(30)]
    reader = DownloadReader(DownloadConfig(timeout=30, retries=0, concurrency=3, host_rate=0))
    out = list(reader.read_many(items))
    reader.close()
    _check(out, items, [(n, 1000) for n in range(30)])
    assert 2 <= gate_server.most_in_flight <= 3 + 1


def test_waiting_for_the_host_s_turn_is_not_on_the_timeout_clock(gate_server):
    """Ten URLs on one host at 4 requests a second: the last waits over 2 s for its turn, far
    beyond the 0.5 s timeout, and is still fetched (the clock starts when it may send)."""
    items = [Item(key=f"k{n}", origin="t", loc=f"{gate_server.url}/img/{n}-500") for n in range(10)]
    reader = DownloadReader(DownloadConfig(timeout=0.5, retries=0, concurrency=8, host_rate=4))
    out = list(reader.read_many(items))
    reader.close()
    _check(out, items, [(n, 500) for n in range(10)])


def test_bad_scheme_is_final(server):
    before = server.hits.get("/to-file", 0)
    assert reason(server.url + "/to-file") == "bad_scheme"
    assert server.hits["/to-file"] - before == 1  # not retried
    from shardify.download.retry import is_retryable

    assert not is_retryable("bad_scheme") and not is_retryable("bad_url")
    assert is_retryable("http_500") and is_retryable("timeout") and not is_retryable("not_image")


def test_lookahead_is_checked_for_sense():
    from shardify.download.fetcher import check_lookahead
    from shardify.format import ShardifyError

    check_lookahead(256_000_000, workers=8, total_memory=16_000_000_000)
    with pytest.raises(ShardifyError, match="at least 1"):
        check_lookahead(10, workers=1, total_memory=16_000_000_000)
    with pytest.raises(ShardifyError, match=r"--lookahead-mb 4000 x --workers 8 = 32.0 GB"):
        check_lookahead(4_000_000_000, workers=8, total_memory=16_000_000_000)
