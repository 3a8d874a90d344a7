"""GPU checks of the image loader, one stage per call (scripts/gpu_check.sh runs them in order).

    python bench/gpu_loader.py prepare --out DIR [--images DIR] [--samples 8192]
    python bench/gpu_loader.py loader  --shards DIR [--seconds 8] [--workers N]
    python bench/gpu_loader.py compare --shards DIR
    python bench/gpu_loader.py memory  --shards DIR [--batches 40]

prepare  shards JPEGs the way shardify stores them (its per-image normalisation), repeated to
         --samples: the real photos of --images when the folder holds any, else generated
         photo-like JPEGs of ImageNet's usual sizes and subsampling (mostly 500x375 4:2:0).
loader   images/s at 224 px, bf16, batch 256, RandomResizedCrop + flip + jitter 0.4: the whole
         loader on the GPU path (nvJPEG, batched crops, device stage one batch ahead), its
         device stage alone (batches fetched beforehand: the GPU's ceiling), and the whole
         loader on the CPU path with the same workers. Needs simplejpeg for the CPU path only.
compare  the same samples, same crop parameters, through nvJPEG + the batched resize and
         through the CPU path: grey-level differences (max, p99.9, mean), and nvJPEG's raw
         decode against libjpeg with replicated and with smooth chroma upsampling.
memory   GPU memory over --batches batches of the GPU path: the floor of allocated memory must
         not rise after warm-up (64 MiB slack), nor reserved memory by more than 1 GiB.
Each stage ends with one `gpu-check: stage ...` line that the shell script collects.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import io
import os
import sys
import tarfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shardify.images import normalise_image  # noqa: E402
from shardify.manifest import simple_manifest  # noqa: E402
from shardify.records import Reject  # noqa: E402
from trainer.data import AugmentConfig, DataConfig, build_loader  # noqa: E402
from trainer.data.augment import cpu_resized_crop, resized_crops  # noqa: E402
from trainer.data.decode import decode_cuda  # noqa: E402
from trainer.data.loader import canonical_device  # noqa: E402
from trainer.data.stream import BatchStream  # noqa: E402

BATCH, SIZE = 256, 224
# ImageNet's most common sizes (w, h) and how often they occur among its photos, roughly
SIZES = [((500, 375), 6), ((500, 333), 2), ((375, 500), 2), ((500, 500), 1), ((500, 400), 1), ((640, 480), 1),
         ((333, 500), 1), ((800, 600), 1)]


def photo_jpeg(w: int, h: int, seed: int) -> bytes:
    """A photo-like JPEG: smooth shading, fine texture, hard colour edges; 4:2:0, quality 90
    (one in 10 grey, one in 10 4:4:4), the mix of a web photo collection."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a, b = rng.uniform(8, 40, 2)
    img = np.stack([128 + 100 * np.sin(xx / a + seed), 128 + 100 * np.cos(yy / b), (xx + 2 * yy) % 256], -1)
    img += rng.normal(0, 10, (h, w, 3))
    cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(30, 150)
    img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    kw = {"subsampling": 0 if seed % 10 == 5 else 2}
    if seed % 10 == 3:
        im, kw = im.convert("L"), {}
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def _sources(images: str, n: int) -> tuple[list[bytes], str]:
    files = sorted(glob.glob(os.path.join(images, "*"))) if images and os.path.isdir(images) else []
    blobs = []
    for f in files:
        try:
            blobs.append(normalise_image(open(f, "rb").read())[0])  # as shardify stores it
        except Reject:
            pass
    if blobs:
        return blobs, f"{len(blobs)} real photos from {images}"
    sizes = [s for s, k in SIZES for _ in range(k)]
    return [photo_jpeg(*sizes[k % len(sizes)], k) for k in range(n)], f"{n} generated photo-like JPEGs"


def prepare(args) -> None:
    t = time.perf_counter()
    blobs, origin = _sources(args.images, 128)
    os.makedirs(args.out, exist_ok=True)
    shards, per = [], 512
    for s in range(0, args.samples, per):
        name = f"train-{s // per:06d}.tar"
        with tarfile.open(os.path.join(args.out, name), "w", format=tarfile.USTAR_FORMAT) as tf:
            for k in range(s, min(args.samples, s + per)):
                for ext, data in (("jpg", blobs[k % len(blobs)]), ("cls", str(k % 1000).encode())):
                    ti = tarfile.TarInfo(f"s{k:07d}.{ext}")
                    ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
                    tf.addfile(ti, io.BytesIO(data))
        shards.append({"name": name, "samples": min(args.samples, s + per) - s})
    n = args.samples
    simple_manifest(args.out, "gpu_loader", ["cls", "jpg"], {"train": shards})
    mean_kb = sum(len(b) for b in blobs) / len(blobs) / 1024
    print(f"sharded {n} samples ({origin}, mean {mean_kb:.0f} KB) in {time.perf_counter() - t:.1f}s")
    print(f"gpu-check: prepare samples={n} source={'real' if 'real' in origin else 'generated'} mean_kb={mean_kb:.0f}")


def _cfg(args, device: str, jitter: float = 0.4, dtype: str = "bfloat16") -> DataConfig:
    return DataConfig(manifests=[args.shards], batch_size=BATCH, num_workers=args.workers, remainder="drop",
                      shuffle_buffer=2000, output_dtype=dtype, decode_device=device,
                      augment=AugmentConfig(size=SIZE, color_jitter=jitter))


def rate(loader, seconds: float, device: torch.device) -> tuple[float, int]:
    """Steady-state images/s over about `seconds`; each epoch's start-up and first two batches
    are left out (a real epoch is hours long)."""
    if len(loader) <= 3:
        raise SystemExit("too few batches per epoch to measure; raise --samples")
    n, spent = 0, 0.0
    while spent < seconds:
        for k, b in enumerate(loader):
            if k == 2:
                torch.cuda.synchronize(device)
                t0, m = time.perf_counter(), 0
            elif k > 2:
                m += b["image"].shape[0]
        torch.cuda.synchronize(device)
        spent += time.perf_counter() - t0
        n += m
    return n / spent, n


def have_simplejpeg() -> bool:
    if importlib.util.find_spec("simplejpeg") is None:
        print("note: simplejpeg is not installed here (see docs/benchmarks.md, GPU check): CPU-path "
              "figures and comparisons skipped")
        return False
    return True


def loader_stage(args) -> None:
    dev = canonical_device("cuda")
    print(f"gpu: {torch.cuda.get_device_name(dev)}; cpu cores: {os.cpu_count()}; workers: {args.workers}; "
          f"batch {BATCH}, {SIZE} px, bf16, RandomResizedCrop(0.08-1) + flip + jitter 0.4")
    gpu_loader = build_loader(_cfg(args, "cuda"), 0, 1, dev, "image")
    r_gpu, n_gpu = rate(gpu_loader, args.seconds, dev)
    print(f"gpu path, whole loader (device stage one batch ahead): {r_gpu:9.0f} images/s ({n_gpu} images)")
    held = [b for _, b in zip(range(8), BatchStream(gpu_loader.sources, gpu_loader.cfg, "image", 0, 1, 0, 0, True))]
    for b in held[:2]:
        gpu_loader._device_stage(b)
    torch.cuda.synchronize(dev)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds / 2:
        for b in held:
            n += gpu_loader._device_stage(b)["image"].shape[0]
    torch.cuda.synchronize(dev)
    r_stage = n / (time.perf_counter() - t0)
    print(f"gpu device stage alone (decode + augment):            {r_stage:9.0f} images/s")
    r_cpu = float("nan")
    if have_simplejpeg():
        cpu_loader = build_loader(_cfg(args, "cpu"), 0, 1, dev, "image")
        r_cpu, n_cpu = rate(cpu_loader, args.seconds, dev)
        print(f"cpu path ({args.workers} workers), whole loader:              {r_cpu:9.0f} images/s ({n_cpu} images)")
    print(f"gpu path vs cpu path: {r_gpu / r_cpu:.2f}x; target 8000 images/s per GPU: "
          f"{'met' if r_gpu >= 8000 else 'NOT met'} ({r_gpu:.0f}); "
          f"goal 10000: {'met' if r_gpu >= 10000 else 'not met'}")
    print(f"gpu-check: loader gpu={r_gpu:.0f} stage={r_stage:.0f} cpu={r_cpu:.0f} "
          f"target8000={'met' if r_gpu >= 8000 else 'NOT-met'}")


def _stats(d: np.ndarray) -> str:
    return f"max {d.max():.1f} p99.9 {np.percentile(d, 99.9):.1f} mean {d.mean():.3f}"


def compare_stage(args) -> None:
    if not have_simplejpeg():
        print("gpu-check: compare skipped=no-simplejpeg")
        return
    import simplejpeg

    dev = canonical_device("cuda")
    cfg = _cfg(args, "cuda", jitter=0.0, dtype="float32")
    ld = build_loader(cfg, 0, 1, dev, "image")
    path_d, matched_d, rep_d, fancy_d = [], [], [], []
    gpu_stream = BatchStream(ld.sources, cfg, "image", 0, 1, 0, 0, True)
    cpu_stream = BatchStream(ld.sources, cfg, "image", 0, 1, 0, 0, False)  # same samples, same parameters
    for _, wb, cb in zip(range(2), gpu_stream, cpu_stream):
        assert wb["key"] == cb["key"] and ("box" not in cb or torch.equal(wb["box"], cb["box"]))
        offs = wb["jpeg_offsets"].tolist()
        blobs = [wb["jpeg"][offs[b]:offs[b + 1]] for b in range(len(offs) - 1)]
        sizes = wb["hw"].tolist()
        imgs, errs = decode_cuda(blobs, dev, sizes)
        assert not any(errs), [e for e in errs if e][:3]
        gpu = resized_crops(imgs, wb["box"], wb["flip"], SIZE).cpu().numpy()
        for b, blob in enumerate(blobs):
            data = blob.numpy().tobytes()
            box, flip = tuple(int(v) for v in wb["box"][b]), bool(wb["flip"][b])
            # the CPU path as the loader's workers run it
            cpu = cb["image"][b].numpy().astype(np.float32)
            path_d.append(np.abs(gpu[b] - cpu).ravel())
            # libjpeg set up to match nvJPEG: accurate IDCT, replicated chroma, full-size decode
            rep = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=True)
            ref = cpu_resized_crop(rep, box, flip, SIZE).numpy().astype(np.float32)
            matched_d.append(np.abs(gpu[b] - ref).ravel())
            if b < 64:
                nv = imgs[b].permute(1, 2, 0).cpu().numpy().astype(np.int16)
                fancy = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False)
                rep_d.append(np.abs(nv - rep).ravel())
                fancy_d.append(np.abs(nv - fancy).ravel())
    path_d, matched_d = np.concatenate(path_d), np.concatenate(matched_d)
    rep_d, fancy_d = np.concatenate(rep_d), np.concatenate(fancy_d)
    print(f"raw decode, nvJPEG vs libjpeg accurate IDCT + replicated chroma: {_stats(rep_d)}")
    print(f"raw decode, nvJPEG vs libjpeg accurate IDCT + smooth chroma:     {_stats(fancy_d)}")
    print(f"224 px crops, GPU path vs matched CPU reference:                  {_stats(matched_d)}")
    print(f"224 px crops, GPU path vs the loader's CPU path (its own decoder settings):   {_stats(path_d)}")
    print("bounds (tests/test_loader_cuda.py): raw decode max 6 mean 1.1; crops max 7 mean 1.6 grey levels")
    ok = rep_d.max() <= 6 and rep_d.mean() <= 1.1 and matched_d.max() <= 7 and matched_d.mean() <= 1.6
    print(f"gpu-check: compare decode_max={rep_d.max():.0f} decode_mean={rep_d.mean():.2f} "
          f"fancy_mean={fancy_d.mean():.2f} crop_max={matched_d.max():.1f} crop_mean={matched_d.mean():.2f} "
          f"cpu_path_mean={path_d.mean():.2f} within_bounds={'yes' if ok else 'NO'}")


def memory_stage(args) -> None:
    dev = canonical_device("cuda")
    ld = build_loader(_cfg(args, "cuda"), 0, 1, dev, "image")
    alloc, reserved = [], []
    torch.cuda.reset_peak_memory_stats(dev)
    while len(alloc) < args.batches:
        for _batch in ld:  # held until the next one arrives, as a training loop holds it
            torch.cuda.synchronize(dev)
            alloc.append(torch.cuda.memory_allocated(dev))
            reserved.append(torch.cuda.memory_reserved(dev))
            if len(alloc) >= args.batches:
                break
    mb = 2 ** 20
    # the look-ahead thread may be in the middle of the next batch when a sample is taken, so
    # single samples swing by a canvas or two; a leak shows as a rising floor
    warm = max(5, len(alloc) // 4)
    k = max(3, (len(alloc) - warm) // 3)
    grow_a = (min(alloc[-k:]) - min(alloc[warm:warm + k])) / mb
    grow_r = (reserved[-1] - reserved[warm]) / mb
    peak = torch.cuda.max_memory_allocated(dev) / mb
    flat = grow_a <= 64 and grow_r <= 1024
    print(f"memory over {len(alloc)} batches: allocated floor {min(alloc[warm:warm + k]) / mb:.0f} -> "
          f"{min(alloc[-k:]) / mb:.0f} MiB (growth {grow_a:.0f} MiB), reserved {reserved[warm] / mb:.0f} -> "
          f"{reserved[-1] / mb:.0f} MiB, peak allocated {peak:.0f} MiB")
    print(f"gpu-check: memory batches={len(alloc)} peak_mib={peak:.0f} growth_mib={grow_a:.0f} "
          f"reserved_growth_mib={grow_r:.0f} flat={'yes' if flat else 'NO'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", required=True)
    p.add_argument("--images", default="")
    p.add_argument("--samples", type=int, default=8192)
    for name in ("loader", "compare", "memory"):
        p = sub.add_parser(name)
        p.add_argument("--shards", required=True)
        p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
        p.add_argument("--seconds", type=float, default=8.0)
        p.add_argument("--batches", type=int, default=40)
    args = ap.parse_args()
    if args.stage != "prepare" and not torch.cuda.is_available():
        sys.exit("no CUDA device: this stage measures the GPU path")
    {"prepare": prepare, "loader": loader_stage, "compare": compare_stage, "memory": memory_stage}[args.stage](args)


if __name__ == "__main__":
    main()
