"""Benchmark: hub traffic of a K-task job on the hub's archive layout (`make bench-stage`).

Builds an ImageNet copy in the hub's `archives` layout (`data/train_images_<k>.tar.gz`, members
`<id>_<synset>.JPEG`) from the photos in --images, serves it from the stand-in hub on
127.0.0.1 (tests/fake_hub.py: the real huggingface_hub / HfFileSystem code path, no network),
and runs `shardify imagenet` three ways, counting the bytes the server sends:

- one task;
- K tasks sharing one --out, started together: what shardify does (each archive is streamed by
  one task, the others wait for it: shardify/stage_claims.py);
- K tasks each with its own --out: every task streams the whole split, which is the traffic of
  a K-task job before the tasks shared their staging (and of any tool that stages per node).

Each task runs as its own process with its own HF_TOKEN, so the server knows who read what.
The last line reads
`stage: hub bytes at K tasks / split: shared S; every task streaming it U; wall s: one 1, shared
W, every task V; files read by two tasks: N` (target: S = 1.00, N = 0).
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fake_hub import FakeHub, hub_env  # noqa: E402  (the stand-in hub lives with the tests)

SYNSETS = ["n01440764", "n01443537", "n01484850", "n01491361"]


def build_repo(images: Path, repo: Path, archives: int, per_archive: int) -> int:
    """The archives layout from the photos, cycled under distinct names; returns the bytes."""
    photos = [p.read_bytes() for p in sorted(images.iterdir()) if p.suffix.lower() in (".jpeg", ".jpg")]
    if not photos:
        sys.exit(f"no JPEG photos in {images}")
    (repo / "data").mkdir(parents=True)
    n = 0
    for k in range(archives):
        with tarfile.open(repo / "data" / f"train_images_{k}.tar.gz", "w:gz", compresslevel=1) as tar:
            for _ in range(per_archive):
                synset = SYNSETS[n % len(SYNSETS)]
                data = photos[n % len(photos)]
                info = tarfile.TarInfo(f"{synset}_{n:06d}_{synset}.JPEG")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                n += 1
    with tarfile.open(repo / "data" / "val_images.tar.gz", "w:gz") as tar:
        data = photos[0]
        info = tarfile.TarInfo(f"ILSVRC2012_val_00000001_{SYNSETS[0]}.JPEG")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return sum(p.stat().st_size for p in (repo / "data").iterdir())


def run_tasks(hub: FakeHub, work: Path, name: str, tasks: int, shared: bool) -> float:
    """Start `tasks` shardify processes at once; return the wall seconds until all are done."""
    procs = []
    start = time.monotonic()
    for r in range(tasks):
        out = work / name / ("out" if shared else f"out-{r}")
        cmd = [sys.executable, "-m", "shardify", "imagenet", "--split", "train", "--out", str(out),
               "--workers", "1", "--no-progress", "--samples-per-shard", "100"]
        if shared and tasks > 1:
            cmd += ["--num-nodes", str(tasks), "--node-rank", str(r)]
        env = {**hub_env(hub.url, work / name / f"home-{r}"), "HF_TOKEN": f"{name}-{r}", "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            sys.exit(f"{name}: shardify failed:\n{err}")
    return time.monotonic() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "bench-images")
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--archives", type=int, default=8)
    ap.add_argument("--per-archive", type=int, default=100)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-stage-") as tmp:
        work = Path(tmp)
        repo = work / "repo"
        build_repo(args.images, repo, args.archives, args.per_archive)
        train = {str(p.relative_to(repo)): p.stat().st_size for p in (repo / "data").glob("train_images_*")}
        split_bytes = sum(train.values())
        print(f"split: {len(train)} train archives, {split_bytes / 1e6:.1f} MB, "
              f"{args.archives * args.per_archive} photos; {args.tasks} tasks, 1 worker each")
        served, walls, shared_by = {}, {}, 0
        with FakeHub({"ILSVRC/imagenet-1k": repo}) as hub:
            for name, tasks, shared in (("one", 1, True), ("shared", args.tasks, True),
                                        ("every", args.tasks, False)):
                walls[name] = run_tasks(hub, work, name, tasks, shared)
                readers = defaultdict(set)  # the tokens are per run: f"{name}-{rank}"
                served[name] = 0
                for (rel, token), sent in hub.sent.items():
                    if rel in train and (token or "").startswith(f"Bearer {name}-"):
                        readers[rel].add(token)
                        served[name] += sent
                if name == "shared":
                    shared_by = sum(len(who) > 1 for who in readers.values())
                print(f"  {name:>6}: {tasks} task(s), hub bytes {served[name] / 1e6:.1f} MB = "
                      f"{served[name] / split_bytes:.2f} x the split, {walls[name]:.1f} s")
    print(f"stage: hub bytes at {args.tasks} tasks / split: shared {served['shared'] / split_bytes:.2f}; "
          f"every task streaming it {served['every'] / split_bytes:.2f}; wall s: one {walls['one']:.1f}, "
          f"shared {walls['shared']:.1f}, every task {walls['every']:.1f}; files read by two tasks: {shared_by}")


if __name__ == "__main__":
    main()
