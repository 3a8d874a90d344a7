"""GPU benchmark of the loader: decode + augment images/s on one GPU, GPU path against CPU path.

    python bench/gpu_loader.py --images ../shared/bench-images      # about 1-2 minutes

Prepared to run once on a GPU machine. It shards the folder's JPEGs repeated to --samples
samples (or synthetic 500x375 photos-like JPEGs when the folder is missing), then measures for
--seconds of steady state each:
1. gpu path: the whole loader, decode_device=cuda: workers read raw bytes and draw the crop
   parameters, the GPU decodes with nvJPEG and crops/resizes/flips/normalises in batched ops;
2. gpu device stage alone: the same GPU work on batches already fetched (the GPU's ceiling,
   independent of how many CPU workers feed it);
3. cpu path: the whole loader, decode_device=cpu, one worker per core (decode, crop, resize in
   the workers, normalisation on the GPU).
Output 224 px, bf16, batch 256. The target is 8,000 images/s per GPU for (1).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_loader import shard_folder  # noqa: E402
from trainer.data import AugmentConfig, DataConfig, build_loader  # noqa: E402
from trainer.data.stream import BatchStream  # noqa: E402


def synthetic_jpegs(out: str, n: int = 64) -> list[str]:
    import numpy as np
    from PIL import Image

    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(0)
    files = []
    for k in range(n):
        yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
        img = np.stack([xx / 2, yy / 1.5, (xx + yy) / 3.5], -1) + rng.normal(0, 30, (375, 500, 3))
        p = os.path.join(out, f"synthetic_{k:03d}.jpg")
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p, quality=90)
        files.append(p)
    return files


def rate(loader, seconds: float, device: torch.device) -> tuple[float, int]:
    """Steady-state images/s of `loader` over about `seconds` of measured time.

    Each epoch starts fresh DataLoader workers; their start-up and the first two batches of
    every epoch are left out (a real epoch is hours long), the rest is timed.
    """
    n, spent = 0, 0.0
    while spent < seconds:
        for k, b in enumerate(loader):
            if k == 2:
                torch.cuda.synchronize(device)
                t0, m = time.perf_counter(), 0
            elif k > 2:
                m += b["image"].shape[0]
        torch.cuda.synchronize(device)
        if len(loader) > 3:
            spent += time.perf_counter() - t0
            n += m
        else:
            raise SystemExit("too few batches per epoch to measure; raise --samples")
    return n / spent, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default="../shared/bench-images")
    ap.add_argument("--samples", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark measures the GPU path")
    dev = torch.device("cuda")
    tmp = tempfile.mkdtemp(prefix="gpu_loader_")
    files = sorted(f for f in glob.glob(os.path.join(args.images, "*")) if f.lower().endswith((".jpg", ".jpeg")))
    origin = args.images
    if not files:
        files, origin = synthetic_jpegs(os.path.join(tmp, "synthetic")), "synthetic 500x375 JPEGs"
    reps = -(-args.samples // len(files))
    listing = [f for _ in range(reps) for f in files][: args.samples]
    t = time.perf_counter()
    shards = shard_folder(listing, os.path.join(tmp, "shards"), per_shard=512, unique_keys=True)
    print(f"sharded {len(listing)} samples ({len(files)} distinct from {origin}) in {time.perf_counter() - t:.1f}s")
    print(f"gpu: {torch.cuda.get_device_name(dev)}; cpu cores: {os.cpu_count()}; workers: {args.workers}; "
          f"batch {args.batch}, 224 px, bf16, RandomResizedCrop(0.08-1) + flip + jitter 0.4")
    aug = AugmentConfig(size=224, color_jitter=0.4)
    base = dict(manifests=[shards], batch_size=args.batch, num_workers=args.workers, remainder="drop",
                shuffle_buffer=2000, output_dtype="bfloat16", augment=aug)

    gpu_loader = build_loader(DataConfig(**base, decode_device="cuda"), 0, 1, dev, "image")
    r_gpu, n_gpu = rate(gpu_loader, args.seconds, dev)
    print(f"gpu path (nvJPEG + batched augment), whole loader: {r_gpu:9.0f} images/s  ({n_gpu} images)")

    # the device stage alone, on worker batches fetched beforehand
    cfg = DataConfig(**base, decode_device="cuda")
    held = [b for _, b in zip(range(8), BatchStream(gpu_loader.sources, cfg, "image", 0, 1, 0, 0, True))]
    for b in held[:2]:
        gpu_loader._device_stage(b)
    torch.cuda.synchronize(dev)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds / 2:
        for b in held:
            n += gpu_loader._device_stage(b)["image"].shape[0]
    torch.cuda.synchronize(dev)
    r_stage = n / (time.perf_counter() - t0)
    print(f"gpu device stage alone (decode + augment):        {r_stage:9.0f} images/s")

    cpu_loader = build_loader(DataConfig(**base, decode_device="cpu"), 0, 1, dev, "image")
    r_cpu, n_cpu = rate(cpu_loader, args.seconds, dev)
    print(f"cpu path ({args.workers} workers), whole loader:            {r_cpu:9.0f} images/s  ({n_cpu} images)")
    print(f"gpu path vs cpu path: {r_gpu / r_cpu:.2f}x; target 8000 images/s per GPU: "
          f"{'met' if r_gpu >= 8000 else 'NOT met'} ({r_gpu:.0f})")


if __name__ == "__main__":
    main()
