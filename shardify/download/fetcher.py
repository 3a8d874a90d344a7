"""The URL fetcher for URL-only image-text lists (CC3M/SBU URL lists, any csv/tsv/parquet).

One `fetch(url)` is one image: only http/https, redirects followed by hand (at most
`max_redirects`, never to another scheme, loops detected), a deadline per attempt that covers
connecting and the whole body (a server dribbling bytes cannot hold a thread), a maximum body
size (checked against Content-Length first, then while reading), `Accept-Encoding: identity`
and, if a server compresses anyway, decompression capped at the same size. Transient failures
(429, 5xx, timeouts, connection resets) are retried with exponential backoff (honouring a short
Retry-After); 4xx answers such as 404/403 are final. Every failure is a `Reject` whose reason is
the error kind (`http_404`, `timeout`, `connection`, `too_large`, ...), so it lands in
rejects.jsonl.

A fetch may be given a `hold` (shardify/download/order.py): every chunk of body read is
accounted to it first, so the bytes downloaded ahead of the writer stay within a bound. The
thread pool and the in-order hand-back live in order.py; the URL-list reader (one
per worker process, holding the rate limiter its threads share) in sources/pairs_urls.py. The
standard library is enough here (http.client), so there is no extra dependency; proxies from
the environment are not used.
"""

from __future__ import annotations

import http.client
import os
import random
import socket
import ssl
import threading
import time
import zlib
from dataclasses import asdict, dataclass
from urllib.parse import urljoin, urlsplit

from shardify import __version__
from shardify.format import ShardifyError
from shardify.records import Reject

# Every reason fetch() can give (retry.py decides which of them a rerun retries).
DOWNLOAD_REASONS_PREFIX = "http_"
DOWNLOAD_REASONS = {"timeout", "connection", "dns", "ssl", "too_large", "too_many_redirects",
                    "redirect_loop", "bad_redirect", "bad_scheme", "bad_url", "bad_response",
                    "download_error"}
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524}
_REDIRECTS = {301, 302, 303, 307, 308}
_READ_SIZE = 65536  # bytes asked of the socket per read


def is_download_reason(reason: str) -> bool:
    """True for the reasons fetch() gives (a URL that could not be downloaded)."""
    return reason in DOWNLOAD_REASONS or reason.startswith(DOWNLOAD_REASONS_PREFIX)


@dataclass
class DownloadConfig:
    """Limits of the downloader; each is a `shardify pairs` option (see docs/datasets/url-lists.md)."""

    timeout: float = 10.0  # seconds per attempt, connecting and reading the whole body
    retries: int = 3  # extra attempts after a transient failure (429, 5xx, timeout, reset)
    backoff: float = 1.0  # first wait before a retry, in seconds; doubles each retry (+ jitter)
    max_backoff: float = 30.0  # cap on one wait, including a server's Retry-After
    concurrency: int = 16  # parallel requests per worker process
    host_rate: float = 10.0  # requests per second to one host, per worker process; 0 = no limit
    max_bytes: int = 20_000_000  # largest body accepted (after any decompression)
    max_redirects: int = 5
    # Bytes a worker may hold downloaded ahead of the image its writer waits for: threads keep
    # fetching past one slow URL until this much waits in memory (the awaited image itself is
    # not counted, so one image larger than this still passes).
    lookahead_bytes: int = 256_000_000
    user_agent: str = f"shardify/{__version__} (image-text dataset downloader)"

    def to_dict(self) -> dict:
        return asdict(self)


def check_lookahead(lookahead_bytes: int, workers: int, total_memory: int | None = None) -> None:
    """Refuse a look-ahead that cannot be sensible: below 1 MB, or more, over all workers, than
    the machine's memory (`--lookahead-mb` x `--workers`)."""
    if lookahead_bytes < 1_000_000:
        raise ShardifyError(f"--lookahead-mb must be at least 1 (got {lookahead_bytes / 1e6:g} MB)")
    if total_memory is None:
        try:
            total_memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return  # unknown on this platform: nothing to check against
    if lookahead_bytes * workers > total_memory:
        raise ShardifyError(f"--lookahead-mb {lookahead_bytes // 1_000_000} x --workers {workers} = "
                            f"{lookahead_bytes * workers / 1e9:.1f} GB is more than this machine's memory "
                            f"({total_memory / 1e9:.1f} GB); lower --lookahead-mb")


class NoHold:
    """The hold of a fetch outside a look-ahead window: nothing to account, no request slots;
    a request waits only for its host's rate."""

    def take(self, nbytes: int) -> float:
        return 0.0

    def drop(self) -> None:
        pass

    def begin(self, host: str, limiter: HostRateLimiter) -> tuple[bool, float]:
        start = time.monotonic()
        limiter.wait(host)
        return False, time.monotonic() - start

    def end(self, slot: bool) -> None:
        pass


class _Transient(Exception):
    def __init__(self, reason: str, detail: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.detail, self.retry_after = reason, detail, retry_after


class HostRateLimiter:
    """At most `rate` request starts per second per host."""

    def __init__(self, rate: float):
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self._next: dict[str, float] = {}
        self._lock = threading.Lock()

    def turn(self, host: str) -> float:
        """Reserve the host's next turn, however far ahead; the seconds until it comes."""
        if not self.interval:
            return 0.0
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next.get(host, now))
            self._next[host] = slot + self.interval
        return slot - now

    def wait(self, host: str) -> None:
        """Reserve the host's next turn and sleep until it."""
        delay = self.turn(host)
        if delay > 0:
            time.sleep(delay)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: ignore it, use our own backoff


def _read_body(resp: http.client.HTTPResponse, conn, deadline: float, limit: int, hold) -> bytes:
    length = resp.getheader("Content-Length")
    if length and length.isdigit() and int(length) > limit:
        raise Reject("too_large", f"Content-Length {length} is above --max-bytes {limit}")
    encoding = (resp.getheader("Content-Encoding") or "identity").strip().lower()
    if encoding not in ("identity", "gzip", "deflate", "x-gzip"):
        raise Reject("bad_response", f"unsupported Content-Encoding {encoding}")
    inflater = None
    if encoding != "identity":
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if "gzip" in encoding else zlib.MAX_WBITS)
    chunks, size, raw = [], 0, 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Transient("timeout", "body not complete within the timeout")
        if conn.sock is not None:
            conn.sock.settimeout(remaining)
        chunk = resp.read1(_READ_SIZE)
        if not chunk:
            break
        raw += len(chunk)
        if inflater is not None:
            # Decompress at most what the limit still allows: a gzip bomb stops here.
            chunk = inflater.decompress(chunk, limit + 1 - size)
            if inflater.unconsumed_tail:
                raise Reject("too_large", f"decompressed body is above --max-bytes {limit}")
        size += len(chunk)
        if size > limit or raw > limit:
            raise Reject("too_large", f"body is above --max-bytes {limit}")
        # Waiting for room in the look-ahead window is not the server's fault: not on the clock.
        deadline += hold.take(len(chunk))
        chunks.append(chunk)
    if resp.length:  # http.client counts down Content-Length; bytes missing = cut short
        raise _Transient("connection", f"connection closed with {resp.length} bytes missing")
    return b"".join(chunks)


def _fetch_once(url: str, cfg: DownloadConfig, limiter: HostRateLimiter, hold) -> bytes:
    seen = set()
    current = url
    deadline = time.monotonic() + cfg.timeout
    for _ in range(cfg.max_redirects + 1):
        if current in seen:
            raise Reject("redirect_loop", f"redirected back to {current}")
        seen.add(current)
        try:
            parts = urlsplit(current)
            port = parts.port
        except ValueError as exc:
            raise Reject("bad_url", str(exc)) from None
        if parts.scheme not in ("http", "https"):
            raise Reject("bad_scheme", f"only http and https are fetched, not {parts.scheme or 'none'!r}")
        if not parts.hostname:
            raise Reject("bad_url", "no host in the URL")
        # Waiting for the host's turn or for a free request slot is not the server's fault either
        slot, waited = hold.begin(parts.hostname, limiter)
        deadline += waited
        conn = None
        try:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Transient("timeout", "no answer within the timeout")
            if parts.scheme == "https":
                conn = http.client.HTTPSConnection(parts.hostname, port, timeout=remaining,
                                                   context=ssl.create_default_context())
            else:
                conn = http.client.HTTPConnection(parts.hostname, port, timeout=remaining)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("GET", path, headers={"User-Agent": cfg.user_agent, "Accept": "image/*,*/*;q=0.5",
                                               "Accept-Encoding": "identity", "Connection": "close"})
            resp = conn.getresponse()
            status = resp.status
            if status in _REDIRECTS:
                target = resp.getheader("Location")
                if not target:
                    raise Reject("bad_redirect", f"HTTP {status} without a Location header")
                current = urljoin(current, target.strip())
                continue
            if status == 200:
                return _read_body(resp, conn, deadline, cfg.max_bytes, hold)
            if status in _TRANSIENT_STATUS or status >= 500:
                raise _Transient(f"http_{status}", f"HTTP {status} {resp.reason}",
                                 _retry_after(resp.getheader("Retry-After")))
            raise Reject(f"http_{status}", f"HTTP {status} {resp.reason}")
        except TimeoutError as exc:
            raise _Transient("timeout", f"no answer within the timeout ({exc or 'timed out'})") from None
        except socket.gaierror as exc:
            raise Reject("dns", f"cannot resolve {parts.hostname}: {exc}") from None
        except ssl.SSLError as exc:
            raise Reject("ssl", f"{type(exc).__name__}: {exc}") from None
        except (ConnectionError, http.client.RemoteDisconnected, http.client.IncompleteRead) as exc:
            raise _Transient("connection", f"{type(exc).__name__}: {exc}") from None
        except http.client.HTTPException as exc:
            raise Reject("bad_response", f"{type(exc).__name__}: {exc}") from None
        except OSError as exc:  # unreachable network, refused at the socket level, ...
            raise _Transient("connection", f"{type(exc).__name__}: {exc}") from None
        finally:
            if conn is not None:
                conn.close()
            hold.end(slot)
    raise Reject("too_many_redirects", f"more than {cfg.max_redirects} redirects")


def fetch(url: str, cfg: DownloadConfig, limiter: HostRateLimiter | None = None,
          sleep=time.sleep, hold=None) -> bytes:
    """The body of `url`, or raise Reject with the reason it could not be fetched.

    `hold` (take/drop) is told of every chunk read; a failed attempt drops what it took.
    """
    limiter = limiter or HostRateLimiter(cfg.host_rate)
    hold = hold or NoHold()
    attempt = 0
    while True:
        try:
            return _fetch_once(url, cfg, limiter, hold)
        except Reject:
            hold.drop()
            raise
        except _Transient as t:
            hold.drop()
            if attempt >= cfg.retries:
                raise Reject(t.reason, f"{t.detail} (after {attempt + 1} attempts)") from None
            wait = cfg.backoff * (2 ** attempt) * (1 + 0.5 * random.random())
            if t.retry_after is not None:
                wait = max(wait, t.retry_after)
            sleep(min(wait, cfg.max_backoff))
            attempt += 1


_MAGIC = ((b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
          (b"BM", "bmp"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"))


def sniff_image(data: bytes) -> str | None:
    """The image format the first bytes announce, or None (HTML, JSON, text, ...)."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _looks_like_text(head: bytes) -> bool:
    if b"\0" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = head.decode("utf-8", "ignore")
        if len(text) < len(head) * 0.9:
            return False
    printable = sum(ch.isprintable() or ch.isspace() for ch in text)
    return printable >= 0.95 * max(1, len(text))


def check_image_bytes(data: bytes) -> None:
    """Reject bodies that are not images: error pages served with 200, HTML named .jpg, JSON.

    Bytes in an image format we do not sniff (AVIF, ICO, ...) pass on to the decoder, which
    rejects them as `unreadable` if Pillow cannot read them either.
    """
    if not data:
        raise Reject("empty", "zero-byte body")
    if sniff_image(data) is not None:
        return
    head = data[:512]
    if head.lstrip().startswith(b"<") or _looks_like_text(head):
        kind = "html page" if head.lstrip().lower().startswith((b"<!doctype", b"<html", b"<head", b"<body")) \
            else "text"
        raise Reject("not_image", f"{kind}, not an image (starts with {data[:16]!r})")
