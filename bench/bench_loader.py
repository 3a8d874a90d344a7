"""CPU benchmark of the loader's image path: images/s on one core against the classic pipeline.

    python bench/bench_loader.py --images ../shared/bench-images

1. Shards the folder's JPEGs (a plain tar per shard plus manifest.json in the docs/format.md
   layout, written here so the benchmark needs nothing but this repository).
2. Measures images per CPU-second (process CPU time: the per-core rate, and what other jobs on
   a shared machine disturb least), in one process with one thread and no DataLoader workers,
   the same images each run, methods interleaved batch by batch, medians of 3 runs:
   - ours: the loader's CPU path for one epoch (shard read, crop-driven decode, crop, resize,
     flip; the uint8 batch is what a worker hands over, normalisation is device work);
   - ours, whole-image decode: the same with the fallback decoder (simplejpeg decodes the whole
     image at the DCT scale; what runs where libturbojpeg 3 cannot be loaded);
   - ours+norm: the same plus normalisation to float32 on the CPU (what device=cpu costs);
   - classic: the torchvision ImageNet recipe on the original files (PIL open,
     RandomResizedCrop, RandomHorizontalFlip, ToTensor, Normalize);
   - bare decode: a full-size libjpeg-turbo decode of the same bytes (simplejpeg, defaults),
     and the same with the fast IDCT/upsampling, for reference.
It also prints the process's resident memory after three further epochs of the loader.
The last line reads `cpu loader vs classic: Rx; vs bare decode: Dx` (rates, ours over theirs).
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import re
import statistics
import sys
import tarfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shardify.manifest import simple_manifest  # noqa: E402
from trainer.data import AugmentConfig, DataConfig, build_loader, tjregion  # noqa: E402
from trainer.data import decode as dec  # noqa: E402
from trainer.data.stream import BatchStream  # noqa: E402


def shard_folder(files: list[str], out: str, per_shard: int = 64, unique_keys: bool = False) -> str:
    """Plain ustar shards of {key}.jpg (+ {key}.cls = 0) and a manifest.json.

    unique_keys: suffix the position, for listings that repeat files."""
    os.makedirs(out, exist_ok=True)
    shards = []
    for s in range(0, len(files), per_shard):
        name = f"train-{s // per_shard:06d}.tar"
        chunk = files[s:s + per_shard]
        with tarfile.open(os.path.join(out, name), "w", format=tarfile.USTAR_FORMAT) as tf:
            for k, path in enumerate(chunk):
                key = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.splitext(os.path.basename(path))[0])
                if unique_keys:
                    key = f"{key}_{s + k:07d}"
                for ext, data in (("jpg", open(path, "rb").read()), ("cls", b"0")):
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
                    tf.addfile(ti, io.BytesIO(data))
        shards.append({"name": name, "samples": len(chunk)})
    simple_manifest(out, "bench_loader", ["cls", "jpg"], {"train": shards})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default="../shared/bench-images")
    ap.add_argument("--out", default="bench_out/loader")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    files = sorted(f for f in glob.glob(os.path.join(args.images, "*")) if f.lower().endswith((".jpg", ".jpeg")))
    if not files:
        sys.exit(f"no JPEG files in {args.images}")
    torch.set_num_threads(1)  # per-core figures
    shards = shard_folder(files, os.path.join(args.out, "shards"))
    n = len(files)
    aug = AugmentConfig(size=args.size)
    B = 25
    # shuffle_buffer=0: batches follow the sorted file list, so every method's chunk k holds the
    # same 25 images; timing chunk by chunk, methods interleaved, keeps what load drift CPU time
    # still feels (caches, turbo) from favouring one method
    cfg = DataConfig(manifests=[shards], batch_size=B, num_workers=0, decode_device="cpu", remainder="pad",
                     shuffle_buffer=0, augment=aug)
    loader = build_loader(cfg, 0, 1, torch.device("cpu"), "image")

    import simplejpeg
    from PIL import Image
    from torchvision import transforms as T

    classic_tf = T.Compose([T.RandomResizedCrop(args.size), T.RandomHorizontalFlip(), T.ToTensor(),
                            T.Normalize(aug.mean, aug.std)])
    blobs = [open(f, "rb").read() for f in files]
    chunks = [range(k, min(k + B, n)) for k in range(0, n, B)]

    def classic(c):
        for k in c:
            with open(files[k], "rb") as fh:
                img = Image.open(fh).convert("RGB")
            classic_tf(img)
        return len(c)

    def bare(c):
        for k in c:
            simplejpeg.decode_jpeg(blobs[k])
        return len(c)

    def bare_fast(c):
        for k in c:
            simplejpeg.decode_jpeg(blobs[k], fastdct=True, fastupsample=True)
        return len(c)

    def run_once(epoch: int) -> dict[str, float]:
        # ours: the worker's work (what the CPU path costs per core); ours+norm: the whole
        # loader with device=cpu, normalising to float32 here
        ours = iter(BatchStream(loader.sources, cfg, "image", 0, 1, epoch, 0, gpu_decode=False))
        whole = iter(BatchStream(loader.sources, cfg, "image", 0, 1, epoch, 0, gpu_decode=False))

        def whole_batch() -> int:
            dec.REGION_DECODE = False
            try:
                return next(whole)["image"].shape[0]
            finally:
                dec.REGION_DECODE = True
        loader.set_epoch(epoch)
        ours_norm = iter(loader)
        t = {k: 0.0 for k in ("ours", "ours, whole-image decode", "ours+norm", "classic", "bare decode",
                              "bare decode (fast idct)")}
        got = dict.fromkeys(t, 0)
        for c in chunks:
            for name, fn in (("ours", lambda: next(ours)["image"].shape[0]),
                             ("ours, whole-image decode", whole_batch),
                             ("ours+norm", lambda: next(ours_norm)["image"].shape[0]),
                             ("classic", lambda: classic(c)), ("bare decode", lambda: bare(c)),
                             ("bare decode (fast idct)", lambda: bare_fast(c))):
                t0 = time.process_time()
                got[name] += min(fn(), len(c))  # the loader pads the last batch; count real images
                t[name] += time.process_time() - t0
        assert all(v == n for v in got.values()), got
        return t

    run_once(99)  # warm-up: page cache, lazy imports
    times: dict[str, list[float]] = {}
    for r in range(args.repeats):
        for k, v in run_once(r).items():
            times.setdefault(k, []).append(v)
    # resident memory over three more epochs of the loader (the flatness check)
    rss = []
    for e in range(3):
        loader.set_epoch(100 + e)
        sum(b["image"].shape[0] for b in loader)
        with open("/proc/self/statm") as f:
            rss.append(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20)
    rate = {k: n / statistics.median(v) for k, v in times.items()}
    print(f"images: {n} from {args.images}, output {args.size}px, one thread, images per CPU-second, "
          f"medians of {args.repeats}")
    for k, v in rate.items():
        print(f"  {k:26s} {v:8.1f} images/s")
    print(f"  ours+norm vs classic: {rate['ours+norm'] / rate['classic']:.2f}x")
    tj = tjregion.load()
    print(f"  decoder: {'libturbojpeg 3 region decode, ' + tj.path if tj else 'whole-image simplejpeg: ' + tjregion.why_not()}; "
          f"region vs whole-image decode: {rate['ours'] / rate['ours, whole-image decode']:.2f}x")
    print(f"  resident memory after 3 more loader epochs: {', '.join(f'{m:.0f}' for m in rss)} MiB "
          f"({(rss[2] / rss[0] - 1) * 100:+.1f}% from the first)")
    print(f"cpu loader vs classic: {rate['ours'] / rate['classic']:.2f}x; "
          f"vs bare decode: {rate['ours'] / rate['bare decode']:.2f}x")


if __name__ == "__main__":
    main()
