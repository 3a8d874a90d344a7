"""Benchmark: `shardify pairs urls` against img2dataset on the same URL list, from a local server.

A loopback server (127.0.0.1 only, a bounded number of connections, shut down when the run
ends or after --max-seconds at the latest) serves the real JPEGs of --images under --urls URLs
spread over --hosts hosts. Each host is its own port on 127.0.0.1 under its own host name: a
different spelling of 127.0.0.1 (`127.1`, `2130706433`, `0x7f000001`, ...) that the system
resolver maps to 127.0.0.1, so that per-host rate limits see distinct hosts, as in a real list.
Hosts answer after 50 ms (even hosts) or 200 ms (odd ones); of the URLs, chosen by a fixed seed,
5% answer 404, 2% answer 500 the first time and 200 after, 1% answer only after 3 s.

Contenders, each as its own process, runs interleaved (the order alternates every repeat):
- `shardify pairs urls` with its default downloader options (--concurrency, --host-rate,
  --timeout, --retries, --lookahead-mb) and --workers W;
- the same with `--host-rate 0` (no per-host limit: what the downloader itself can do; the
  default limit stays on for politeness, and bounds the first figure on this 8-host list);
- img2dataset (installed by this script from PyPI into its own venv under bench_out/) with
  `--resize_mode no --skip_reencode True`, W processes x the same threads, timeout and retries,
  webdataset output, shards of the same size.

Every row must be accounted for in both: written + failed = --urls, read from the outputs (our
manifest and tars; img2dataset's per-shard stats and tars). Prints a row per run, the medians
and, last: `download vs img2dataset: T x images/s, C x CPU; with --host-rate 0: T0 x images/s,
C0 x CPU` (T: images written per second, ours with the defaults over theirs; C: CPU seconds per
image written, ours over theirs; T0 and C0 the same for ours with --host-rate 0; CPU from wait4
of each process tree).
"""

from __future__ import annotations

import argparse
import csv
import http.server
import json
import os
import random
import shutil
import socketserver
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

IMG2DATASET = "img2dataset==1.47.0"
# Spellings of 127.0.0.1 that the C resolver (inet_aton) accepts: one host name per host.
HOST_NAMES = ["127.0.0.1", "127.1", "127.0.1", "2130706433", "0x7f000001", "0x7f.1", "0177.0.0.1",
              "127.0.0.01", "127.00.0.1", "127.0.00.1", "0x7f.0.0.1", "127.0x0.0.1", "0177.1", "127.0.0.001",
              "127.000.0.1", "0x7f.0.1"]
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


# ---------------------------------------------------------------- the loopback server
class _BoundedServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """A threading server that serves at most `max_connections` connections at once."""

    daemon_threads = True
    max_connections = 128

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(self.max_connections)

    def process_request(self, request, client_address):
        self._slots.acquire()
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class LoopbackImageHosts:
    """`hosts` servers on 127.0.0.1; URL i is /img/i.jpg on host i % hosts, showing image i % len(images)."""

    def __init__(self, images: list[bytes], n_urls: int, hosts: int, seed: int, max_seconds: float):
        if hosts > len(HOST_NAMES):
            sys.exit(f"--hosts is at most {len(HOST_NAMES)}")
        self.images = images
        rng = random.Random(seed)
        self.kind = {}
        for i in rng.sample(range(n_urls), k=n_urls * 8 // 100):  # 5% 404, 2% flaky, 1% late
            self.kind[i] = "404" if len(self.kind) < n_urls * 5 // 100 else (
                "flaky" if len(self.kind) < n_urls * 7 // 100 else "late")
        self.requests = 0
        self._lock = threading.Lock()
        self._flaky_seen: set[int] = set()
        self._stop = threading.Event()
        self.servers, self.urls = [], []
        for h in range(hosts):
            srv = _BoundedServer(("127.0.0.1", 0), self._handler(0.05 if h % 2 == 0 else 0.2))
            threading.Thread(target=srv.serve_forever, daemon=True).start()
            self.servers.append(srv)
        self.urls = [f"http://{HOST_NAMES[i % hosts]}:{self.servers[i % hosts].server_address[1]}/img/{i}.jpg"
                     for i in range(n_urls)]
        # Stops by itself even if this script is stuck or killed half-way.
        self._watchdog = threading.Timer(max_seconds, self.close)
        self._watchdog.daemon = True
        self._watchdog.start()

    def expected(self) -> tuple[int, int]:
        """(rows that can be written, rows that must fail)."""
        failed = sum(1 for k in self.kind.values() if k == "404")
        return len(self.urls) - failed, failed

    def reset(self) -> None:
        """Before each run: the flaky URLs fail once again."""
        with self._lock:
            self._flaky_seen.clear()

    def _handler(self, latency: float):
        hosts = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                with hosts._lock:
                    hosts.requests += 1
                try:
                    i = int(self.path.rsplit("/", 1)[-1].split(".")[0])
                except ValueError:
                    i = -1
                kind = hosts.kind.get(i)
                if hosts._stop.wait(3.0 if kind == "late" else latency):
                    return
                if not 0 <= i < len(hosts.urls) or kind == "404":
                    return self._send(404, b"not found", "text/plain")
                if kind == "flaky":
                    with hosts._lock:
                        first = i not in hosts._flaky_seen
                        hosts._flaky_seen.add(i)
                    if first:
                        return self._send(500, b"try again", "text/plain")
                self._send(200, hosts.images[i % len(hosts.images)], "image/jpeg")

            def _send(self, status, body, ctype):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        return Handler

    def close(self) -> None:
        self._stop.set()
        for srv in self.servers:
            srv.shutdown()
            srv.server_close()
        self.servers = []
        self._watchdog.cancel()


# ---------------------------------------------------------------- contenders
def install_img2dataset(venv: Path) -> Path:
    exe = venv / "bin" / "img2dataset"
    if not exe.exists():
        print(f"installing {IMG2DATASET} into {venv} (once)", flush=True)
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", IMG2DATASET], check=True)
    return exe


def run_measured(cmd: list[str], log: Path, env: dict) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system of the process and the children it waited for)."""
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in (0, 1):  # shardify exits 1 when rejects exceed --max-reject-rate
        sys.exit(f"{cmd[0]} failed ({proc.returncode}); see {log}")
    return wall, usage.ru_utime + usage.ru_stime


def tar_images(folder: Path) -> int:
    n = 0
    for path in folder.glob("*.tar"):
        with tarfile.open(path) as tar:
            n += sum(1 for m in tar.getmembers() if m.name.endswith(".jpg"))
    return n


def account_shardify(out: Path) -> tuple[int, int]:
    totals = json.loads((out / "manifest.json").read_text())["totals"]
    written = tar_images(out)
    if written != totals["samples"] or totals["samples"] + totals["rejected"] != totals["inputs"]:
        sys.exit(f"shardify's output does not reconcile: {totals}, {written} images in tars")
    return written, totals["rejected"]


def account_img2dataset(out: Path) -> tuple[int, int]:
    written = failed = count = 0
    for path in out.glob("*_stats.json"):
        stats = json.loads(path.read_text())
        count += stats["count"]
        written += stats["successes"]
        failed += stats["failed_to_download"] + stats["failed_to_resize"]
    if tar_images(out) != written or written + failed != count:
        sys.exit(f"img2dataset's output does not reconcile: {written} + {failed} != {count}")
    return written, failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default="../shared/bench-images")
    ap.add_argument("--work", default="bench_out/download")
    ap.add_argument("--venv", default="bench_out/img2dataset-venv", help="img2dataset's own venv (made once)")
    ap.add_argument("--urls", type=int, default=2000)
    ap.add_argument("--hosts", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2, help="processes of both tools")
    ap.add_argument("--threads", type=int, default=16, help="threads per process (our --concurrency default)")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--retries", type=int, default=3)
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=1800, help="the server stops itself after this")
    args = ap.parse_args()

    from shardify.download.fetcher import DownloadConfig

    defaults = DownloadConfig()
    if (args.threads, args.timeout, args.retries) != (defaults.concurrency, defaults.timeout, defaults.retries):
        print("note: --threads/--timeout/--retries differ from shardify's defaults; passing them to both")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    img2dataset = install_img2dataset(Path(args.venv))
    originals = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
    if not originals:
        sys.exit(f"no JPEGs in {args.images}")
    images = [p.read_bytes() for p in originals]

    hosts = LoopbackImageHosts(images, args.urls, args.hosts, args.seed, args.max_seconds)
    try:
        url_list = work / "urls.csv"
        with open(url_list, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["url", "caption"])
            w.writerows([u, f"photo {i}"] for i, u in enumerate(hosts.urls))
        can_write, must_fail = hosts.expected()
        print(f"{args.urls} URLs over {args.hosts} hosts, {len(images)} JPEGs "
              f"({sum(map(len, images)) / len(images) / 1e3:.1f} KB mean); expected {can_write} written, "
              f"{must_fail} failed; {args.workers} processes x {args.threads} threads; cpus {os.cpu_count()}; "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
        base_env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS and k != "PYTHONPATH"}
        envs = {"shardify": {**base_env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                             "PYTHONPATH": os.getcwd()},  # this checkout's shardify
                "img2dataset": base_env}

        def ours(out: Path, extra: tuple[str, ...] = ()) -> list[str]:
            cmd = [sys.executable, "-m", "shardify", "pairs", "urls", "--source", str(url_list), "--out", str(out),
                   "--workers", str(args.workers), "--samples-per-shard", str(args.samples_per_shard),
                   "--no-progress"]
            if (args.threads, args.timeout, args.retries) != (defaults.concurrency, defaults.timeout,
                                                              defaults.retries):
                cmd += ["--concurrency", str(args.threads), "--timeout", str(args.timeout),
                        "--retries", str(args.retries)]
            return cmd + list(extra)

        def theirs(out: Path) -> list[str]:
            return [str(img2dataset), "--url_list", str(url_list), "--input_format", "csv", "--url_col", "url",
                    "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(out),
                    "--processes_count", str(args.workers), "--thread_count", str(args.threads),
                    "--timeout", str(int(args.timeout)), "--retries", str(args.retries), "--resize_mode", "no",
                    "--skip_reencode", "True", "--number_sample_per_shard", str(args.samples_per_shard),
                    "--enable_wandb", "False"]

        contenders = {"shardify": (ours, account_shardify),
                      "shardify-rate0": (lambda out: ours(out, ("--host-rate", "0")), account_shardify),
                      "img2dataset": (theirs, account_img2dataset)}
        envs["shardify-rate0"] = envs["shardify"]
        rows: dict[str, list[tuple[float, float, int]]] = {name: [] for name in contenders}
        print(f"{'run':>3} {'tool':<14} {'wall s':>7} {'images/s':>9} {'CPU s':>6} {'CPU ms/img':>10} "
              f"{'written':>7} {'failed':>6} {'total':>5} {'requests':>8}")
        for rep in range(args.repeats):
            names = list(contenders) if rep % 2 == 0 else list(reversed(contenders))
            for name in names:
                command, account = contenders[name]
                out = work / f"out-{name}"
                shutil.rmtree(out, ignore_errors=True)
                hosts.reset()
                before = hosts.requests
                wall, cpu = run_measured(command(out), work / f"{name}-{rep}.log", envs[name])
                written, failed = account(out)
                if written + failed != args.urls:
                    sys.exit(f"{name}: {written} written + {failed} failed != {args.urls} rows")
                rows[name].append((wall, cpu, written))
                print(f"{rep:>3} {name:<14} {wall:>7.2f} {written / wall:>9.1f} {cpu:>6.2f} "
                      f"{1e3 * cpu / max(written, 1):>10.2f} {written:>7} {failed:>6} {written + failed:>5} "
                      f"{hosts.requests - before:>8}", flush=True)
    finally:
        hosts.close()

    def median_rate(name):
        return statistics.median(w / t for t, _, w in rows[name])

    def median_cpu(name):
        return statistics.median(c / max(w, 1) for _, c, w in rows[name])

    for name in rows:
        print(f"median {name}: {median_rate(name):.1f} images/s, {1e3 * median_cpu(name):.2f} CPU ms/image")
    t = median_rate("shardify") / median_rate("img2dataset")
    c = median_cpu("shardify") / median_cpu("img2dataset")
    t0 = median_rate("shardify-rate0") / median_rate("img2dataset")
    c0 = median_cpu("shardify-rate0") / median_cpu("img2dataset")
    print(f"download vs img2dataset: {t:.2f} x images/s, {c:.2f} x CPU; "
          f"with --host-rate 0: {t0:.2f} x images/s, {c0:.2f} x CPU")


if __name__ == "__main__":
    main()
