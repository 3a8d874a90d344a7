"""Benchmark: shardify against GNU tar (the floor) and a bare webdataset.ShardWriter loop.

Replicates a folder of real JPEGs into an ImageFolder tree of at least --min-files files (about
1 GB for ImageNet-like photos), warms the page cache, then times, in the same run and
interleaved so that machine noise hits every contender alike (medians of --repeats; each ratio
is the median of its per-repeat ratios, its two contenders timed back to back):

- `shardify imagenet --source TREE --workers 1` and `--workers 2` (the CLI, as a user runs it;
  with 1 worker on a 2-core machine sha256 runs in a helper thread on the spare core, so the
  run is also timed with `--hash-thread off`, one core: the base of the 2-worker speedup)
- `tar cf` of the same tree (the work is I/O plus hashing: nothing can beat plain tar by much)
- a bare `webdataset.ShardWriter` loop over the same files: what a user writes by hand
- two `tar cf` over the two halves of the tree at once: how much two processes can gain on this
  machine at all when the work is moving bytes (memory bandwidth bounds it)

and prints the ratios. Every contender runs as its own process, so import costs count too.
The last line reads `shardify/tar time ratio: R1 (1 worker); 2-worker speedup: S2 of ceiling C2;
shardify/ShardWriter: W1`, with S2 = (1 worker, one core) / (2 workers) and C2 = (one tar) /
(two tars at once).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHARDWRITER_LOOP = r"""
import os, sys, webdataset as wds
src, out = sys.argv[1], sys.argv[2]
synsets = sorted(os.listdir(os.path.join(src, "train")))
with wds.ShardWriter(os.path.join(out, "train-%06d.tar"), maxcount=1000, verbose=0) as sink:
    for label, synset in enumerate(synsets):
        folder = os.path.join(src, "train", synset)
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), "rb") as f:
                sink.write({"__key__": name.rsplit(".", 1)[0], "jpg": f.read(), "cls": str(label).encode()})
"""


def replicate(images: Path, tree: Path, min_files: int) -> tuple[int, int]:
    """An ImageFolder tree train/<synset>/<synset>_<copy>.JPEG with at least min_files files."""
    if not images.is_dir():
        sys.exit(f"no image folder at {images} (give one with --images, or IMAGES=dir for make)")
    originals = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
    if not originals:
        sys.exit(f"no JPEGs in {images}")
    copies = -(-min_files // len(originals))
    marker = tree / f".complete-{len(originals)}x{copies}"
    if not marker.exists():
        shutil.rmtree(tree, ignore_errors=True)
        for i, path in enumerate(originals):
            synset = path.name.split("_")[0]
            folder = tree / "train" / synset
            folder.mkdir(parents=True, exist_ok=True)
            data = path.read_bytes()
            for c in range(copies):
                (folder / f"{synset}_{i:04d}{c:04d}.JPEG").write_bytes(data)
        marker.touch()
    files = [p for p in (tree / "train").rglob("*.JPEG")]
    return len(files), sum(p.stat().st_size for p in files)


def timed_pair(cmds: list[list[str]], out: Path) -> float:
    """Two commands at once (two tars over halves of the tree): the machine's parallel I/O ceiling."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    os.sync()
    time.sleep(1)  # as in timed(): the kernel settles after freeing the previous output
    start = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL) for c in cmds]
    for p in procs:
        if p.wait() != 0:
            sys.exit(f"{p.args} failed")
    elapsed = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return elapsed


def timed(cmd: list[str], out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    os.sync()  # the previous contender's writeback must not steal this one's CPU
    # nor the freeing of its deleted output (measured: a run started at once after deleting
    # 1.1 GB took up to 25% longer, in system time)
    time.sleep(1)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default="../shared/bench-images")
    ap.add_argument("--work", default="bench_out/shardify")
    ap.add_argument("--min-files", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    if not Path(args.images).is_dir():
        sys.exit(f"error: --images {args.images}: no such folder "
                 "(give a folder of JPEGs: make bench-shardify IMAGES=DIR)")

    work = Path(args.work)
    tree = work / "imagefolder"
    n_files, n_bytes = replicate(Path(args.images), tree, args.min_files)
    for path in (tree / "train").rglob("*.JPEG"):  # warm the page cache for everybody
        path.read_bytes()
    print(f"input: {n_files} JPEGs, {n_bytes / 1e9:.2f} GB in {tree}; cpus: {os.cpu_count()}")
    # Bytecode as an installed package has it: with PYTHONDONTWRITEBYTECODE=1 (set on some
    # machines, this one included) every run would compile shardify's modules from source again
    import compileall

    compileall.compile_dir(str(Path(__file__).resolve().parents[1] / "shardify"), quiet=1)

    py = sys.executable
    shardify = [py, "-m", "shardify", "imagenet", "--source", str(tree), "--split", "train",
                "--no-progress", "--overwrite"]
    contenders = {
        "shardify-1": (shardify + ["--workers", "1", "--out"], work / "o-s1"),
        "shardify-1-own-core": (shardify + ["--workers", "1", "--hash-thread", "off", "--out"], work / "o-s1c"),
        "shardify-2": (shardify + ["--workers", "2", "--out"], work / "o-s2"),
        "tar": (["tar", "cf", str(work / "o-tar" / "all.tar"), "-C", str(tree), "train"], work / "o-tar"),
        "shardwriter": ([py, "-c", SHARDWRITER_LOOP, str(tree)], work / "o-sw"),
    }
    synsets = sorted(p.name for p in (tree / "train").iterdir())
    halves = [synsets[: len(synsets) // 2], synsets[len(synsets) // 2 :]]
    tar_pair = [["tar", "cf", str(work / "o-tar2" / f"half{i}.tar"), "-C", str(tree / "train"), *h]
                for i, h in enumerate(halves)]
    contenders["tar-2-at-once"] = (None, work / "o-tar2")
    times: dict[str, list[float]] = {name: [] for name in contenders}
    # the contenders of each ratio run next to each other, their order reversed every other
    # repeat, and the ratios are medians of per-repeat ratios: this machine's speed drifts by
    # up to a third within a minute (a one-core run took 1.50-2.05 s in one run of this script)
    groups = [("shardify-1-own-core", "shardify-2"), ("tar-2-at-once", "tar", "shardify-1", "shardwriter")]
    for rep in range(args.repeats):
        for group in groups:
            for name in (group if rep % 2 == 0 else group[::-1]):
                cmd, out = contenders[name]
                if name == "tar-2-at-once":
                    times[name].append(timed_pair(tar_pair, out))
                else:
                    times[name].append(timed(cmd + [str(out)] if name != "tar" else cmd, out))
        print(f"repeat {rep + 1}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()))
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in med.items():
        print(f"{name:<20} median {t:.2f}s  {n_files / t:,.0f} files/s  {n_bytes / t / 1e6:,.0f} MB/s")

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    c2 = ratio("tar", "tar-2-at-once")
    print(f"parallel ceiling of this machine: two tars over halves at once are {c2:.2f}x faster than one tar over all")
    print(f"with the spare core (--hash-thread auto): 1 worker {med['shardify-1']:.2f}s, "
          f"2 workers {med['shardify-2']:.2f}s ({med['shardify-1'] / med['shardify-2']:.2f}x)")
    r1 = ratio("shardify-1", "tar")
    # the 1-worker run on one core (--hash-thread off) is the base: with the spare core hashing
    # for it, one worker already uses both cores and "2 workers" would gain nothing to compare
    s2 = ratio("shardify-1-own-core", "shardify-2")
    w1 = ratio("shardify-1", "shardwriter")
    print(f"shardify/tar time ratio: {r1:.2f} (1 worker); 2-worker speedup: {s2:.2f} of ceiling {c2:.2f}; "
          f"shardify/ShardWriter: {w1:.2f}")


if __name__ == "__main__":
    main()
