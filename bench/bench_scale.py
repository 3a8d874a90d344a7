"""Benchmark: shardify's memory and planning time as the input grows (`make bench-scale`).

Generates, under --tmp, URL-list parquet files of each --rows size and an ImageFolder tree of
--files small files (one tiny synthetic JPEG repeated under ImageNet synset folders), and runs
`shardify pairs urls` / `shardify imagenet` on them as a user does (the CLI, 2 workers). The URLs
point at a 127.0.0.1 port nobody listens on, so every download is refused at once: the run
plans the split and writes its first shards (all rejects) without any network. Once --shards
shards exist the run is interrupted (Ctrl-C, as a user would) and its files deleted.

While it runs, the resident memory of the whole process tree (the main process and every worker
or staging process, found through /proc) is sampled every 50 ms; the peak of the sum is
reported. RSS counts pages that forked processes share once per process, so the sum is an upper
bound; the detail lines add the peak summed PSS (shared pages divided among their sharers,
sampled every 250 ms), the memory the tree really holds. Planning time is taken between the
job's `listing inputs` and `-> N shards` lines, as wall time and as CPU time of the main
process (planning is one thread there): the `scale:` line gives CPU seconds, which a machine
shared with other jobs does not inflate (on an idle machine the two agree).

The last line reads
`scale: peak MiB at 2M / 20M rows: A / B; planning s per M rows: C / D; imagefolder 1.28M: E MiB`
(targets: B <= 1024, B/A <= 1.2, D/C <= 1.3). Smaller --rows/--files give a quick run.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _refused_port() -> int:
    """A local port with no listener: connections to it are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_url_list(path: Path, rows: int, port: int) -> None:
    """A parquet file of `rows` (url, caption) rows, written in row groups (bounded memory)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.exists():
        return
    tmp = path.with_suffix(".tmp")
    schema = pa.schema([("url", pa.string()), ("caption", pa.string())])
    with pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, rows, 1_000_000):
            ids = range(start, min(rows, start + 1_000_000))
            writer.write_table(pa.table({
                "url": [f"http://127.0.0.1:{port}/images/{i:09d}.jpg" for i in ids],
                "caption": [f"a photo of thing number {i} on a table, seen from the side" for i in ids],
            }, schema=schema))
    tmp.rename(path)


def make_imagefolder(root: Path, files: int) -> None:
    """train/<synset>/<synset>_<i>.JPEG for the first synsets, 1300 files each (ImageNet's most)."""
    from PIL import Image

    marker = root / f".complete-{files}"
    if marker.exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 80, 40)).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    synsets = [line.split("\t")[0] for line in
               (ROOT / "shardify" / "data" / "imagenet_classes.tsv").read_text().splitlines()
               if line and not line.startswith("#")]
    per = 1300
    for i in range(files):
        folder = root / "train" / synsets[i // per]
        path = folder / f"{synsets[i // per]}_{i:07d}.JPEG"
        if i % per == 0:
            folder.mkdir(parents=True, exist_ok=True)
            first = path
            first.write_bytes(jpeg)
        else:  # hard links to the folder's first file: quick to make (a file takes at most 65,000)
            os.link(first, path)
    marker.write_text("")


def _tree(pid: int) -> list[int]:
    """pid and all its descendants (through /proc/<pid>/task/<tid>/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return out


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kib(pid: int) -> int:
    """Proportional set size: shared pages divided among the processes sharing them."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl-C, as a user would; a kill if that does not end it within a minute."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_measured(args: list[str], out: Path, shards: int) -> tuple[float, float, float, float]:
    """Run a shardify command until `shards` shards exist in `out`; return (peak MiB of the
    process tree's summed RSS, the same for PSS, planning wall seconds, planning CPU seconds of
    the main process, where planning runs)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "shardify", *args, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marks: dict[str, float] = {}
    lines: list[str] = []

    def read_log() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "listing inputs" in line:
                marks.setdefault("listing", time.monotonic())
                marks.setdefault("listing_cpu", _cpu_s(proc.pid))
            elif " shards; this node writes" in line:
                marks.setdefault("planned", time.monotonic())
                marks.setdefault("planned_cpu", _cpu_s(proc.pid))

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    peak = peak_pss = 0
    next_pss = 0.0
    try:
        while proc.poll() is None:
            tree = _tree(proc.pid)
            peak = max(peak, sum(_rss_kib(p) for p in tree))
            if time.monotonic() >= next_pss:  # a page-table walk: less often
                peak_pss = max(peak_pss, sum(_pss_kib(p) for p in tree))
                next_pss = time.monotonic() + 0.25
            if "planned" in marks and len(list(out.glob("*.tar"))) >= shards:
                break
            time.sleep(0.05)
    finally:
        _stop(proc)
        reader.join(timeout=10)
    if "planned" not in marks:
        sys.exit("shardify ended before planning was done:\n" + "".join(lines[-20:]))
    return (peak / 1024, peak_pss / 1024, marks["planned"] - marks["listing"],
            marks["planned_cpu"] - marks["listing_cpu"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="2000000,20000000", help="two URL-list sizes, comma separated")
    ap.add_argument("--files", type=int, default=1_280_000, help="ImageFolder files (0: skip)")
    ap.add_argument("--shards", type=int, default=4, help="shards to write before stopping a run")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tmp", default=None, help="where to generate inputs and outputs (default: a new temp dir)")
    ap.add_argument("--keep-inputs", action="store_true", help="keep the generated inputs for the next run")
    args = ap.parse_args()
    sizes = [int(x) for x in args.rows.split(",")]
    tmp = Path(args.tmp) if args.tmp else Path(tempfile.mkdtemp(prefix="bench-scale-"))
    tmp.mkdir(parents=True, exist_ok=True)
    port = _refused_port()
    common = ["--workers", str(args.workers), "--samples-per-shard", "1000", "--no-progress"]
    peaks, per_m = [], []
    try:
        for rows in sizes:
            src = tmp / f"urls-{rows}"
            src.mkdir(exist_ok=True)
            t = time.monotonic()
            make_url_list(src / "train.parquet", rows, port)
            print(f"{rows} url rows generated in {time.monotonic() - t:.0f}s", flush=True)
            out = tmp / f"out-urls-{rows}"
            shutil.rmtree(out, ignore_errors=True)
            command = ["pairs", "urls", "--source", str(src), *common, "--retries", "0", "--timeout", "2",
                       "--host-rate", "0"]
            peak, pss, plan_s, plan_cpu = run_measured(command, out, args.shards)
            shutil.rmtree(out, ignore_errors=True)
            peaks.append(peak)
            per_m.append(plan_cpu / (rows / 1e6))
            print(f"urls {rows}: peak {peak:.0f} MiB (PSS {pss:.0f} MiB), planning {plan_s:.1f}s wall "
                  f"({plan_s / (rows / 1e6):.2f} s per M rows), {plan_cpu:.1f}s CPU ({per_m[-1]:.2f} s per M rows)",
                  flush=True)
        folder_peak = None
        if args.files:
            tree = tmp / f"imagefolder-{args.files}"
            t = time.monotonic()
            make_imagefolder(tree, args.files)
            print(f"{args.files} files generated in {time.monotonic() - t:.0f}s", flush=True)
            out = tmp / "out-imagefolder"
            shutil.rmtree(out, ignore_errors=True)
            command = ["imagenet", "--source", str(tree), "--split", "train", *common]
            folder_peak, pss, plan_s, plan_cpu = run_measured(command, out, args.shards)
            shutil.rmtree(out, ignore_errors=True)
            print(f"imagefolder {args.files}: peak {folder_peak:.0f} MiB (PSS {pss:.0f} MiB), "
                  f"planning {plan_s:.1f}s wall, {plan_cpu:.1f}s CPU", flush=True)
    finally:
        if not args.keep_inputs:
            shutil.rmtree(tmp, ignore_errors=True)

    def m(n: int) -> str:
        return f"{n / 1e6:g}M"

    print(f"ratios: B/A {peaks[-1] / peaks[0]:.2f}, D/C {per_m[-1] / per_m[0]:.2f}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    folder = f"; imagefolder {m(args.files)}: {folder_peak:.0f} MiB" if folder_peak is not None else ""
    print(f"scale: peak MiB at {m(sizes[0])} / {m(sizes[-1])} rows: {peaks[0]:.0f} / {peaks[-1]:.0f}; "
          f"planning s per M rows: {per_m[0]:.1f} / {per_m[-1]:.1f}{folder}")


if __name__ == "__main__":
    main()
