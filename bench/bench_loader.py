"""CPU benchmark of the loader's image path: images/s on one core against DALI's CPU pipeline.

    python bench/bench_loader.py --images ../shared/bench-images

1. Shards the folder's JPEGs (a plain tar per shard plus manifest.json in the docs/format.md
   layout, written here so the benchmark needs nothing but this repository).
2. Installs NVIDIA DALI (`nvidia-dali-cuda120`, whose CPU operators run without a GPU) from PyPI
   into its own venv under bench_out/ (once), and starts `bench/dali_peer.py` in it.
3. Measures images per CPU-second (process CPU time: the per-core rate, and what other jobs on
   a shared machine disturb least), in one process with one thread and no DataLoader workers,
   the same images each run, methods interleaved batch by batch, medians of 3 runs:
   - ours: the loader's CPU path for one epoch with the default config (shard read, crop-driven
     decode, crop, resize, flip; the uint8 batch is what a worker hands over, normalisation is
     device work), and the same with the other `augment.decode_scale` (dct or exact);
   - ours, whole-image decode: the same with the fallback decoder (simplejpeg decodes the whole
     image at the DCT scale; what runs where libturbojpeg 3 cannot be loaded);
   - ours+norm: the same plus normalisation to float32 on the CPU (what device=cpu costs);
   - DALI CPU: `fn.readers.file` -> `fn.decoders.image_random_crop(device="cpu")` ->
     `fn.resize(antialias)` -> `fn.flip`, one thread, the same files and batch size, its own
     process (its CPU time is measured there, around each batch; see dali_peer.py);
   - classic: the torchvision ImageNet recipe on the original files (PIL open,
     RandomResizedCrop, RandomHorizontalFlip, ToTensor, Normalize);
   - bare decode: a full-size libjpeg-turbo decode of the same bytes (simplejpeg, defaults),
     and the same with the fast IDCT/upsampling, for reference.
4. Compares pixels, on the same crops (the loader's draws) over --diff-epochs epochs: decode_scale
   dct against exact, and, for scale, what two interpolations already differ by (our bilinear
   against our bicubic; PIL's antialiased bilinear against torch's on the same decoded crop),
   over all images and over the crops that dct decodes at a reduced scale.
It also prints the process's resident memory after three further epochs of the loader.
The last two lines read
`cpu loader (decode_scale dct) vs bare decode: D2; pixel difference to exact: mean M, p99 P` and
`cpu loader vs DALI: Xx; vs classic: Rx; vs bare decode: Dx` (rates, ours over theirs; pixel
differences in grey levels of the uint8 output).
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import re
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shardify.manifest import simple_manifest  # noqa: E402
from trainer.data import AugmentConfig, DataConfig, build_loader, tjregion  # noqa: E402
from trainer.data import decode as dec  # noqa: E402
from trainer.data.stream import BatchStream  # noqa: E402

DALI = "nvidia-dali-cuda120==2.4.0"


def key_of(path: str) -> str:
    """The sample key shard_folder gives a file: its name without extension, made tar-safe."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", os.path.splitext(os.path.basename(path))[0])


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
                key = key_of(path)
                if unique_keys:
                    key = f"{key}_{s + k:07d}"
                for ext, data in (("jpg", open(path, "rb").read()), ("cls", b"0")):
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
                    tf.addfile(ti, io.BytesIO(data))
        shards.append({"name": name, "samples": len(chunk)})
    simple_manifest(out, "bench_loader", ["cls", "jpg"], {"train": shards})
    return out


def install_dali(venv: Path) -> Path:
    """DALI's own venv (made once, like bench_download.py's img2dataset venv); its python."""
    py = venv / "bin" / "python"
    if not (py.exists() and subprocess.run([str(py), "-c", "import nvidia.dali"], capture_output=True).returncode == 0):
        print(f"installing {DALI} into {venv} (once)", flush=True)
        base = getattr(sys, "_base_executable", sys.executable)
        try:
            subprocess.run([base, "-m", "venv", str(venv)], check=True)
            subprocess.run([str(venv / "bin" / "pip"), "install", "-q", DALI], check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            sys.exit(f"cannot install {DALI} into {venv} ({e}); --no-dali leaves DALI out")
    return py


class DaliPeer:
    """bench/dali_peer.py in DALI's venv: one `run` per batch, its CPU seconds back."""

    def __init__(self, python: Path, files: list[str], size: int, batch: int):
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dali_peer.py")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.proc = subprocess.Popen([str(python), script, "--size", str(size), "--batch", str(batch), *files],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        first = self.proc.stdout.readline().split()
        if first[:1] != ["ready"]:
            self.close()
            sys.exit(f"DALI peer did not start (exit {self.proc.returncode}); see its output above")
        self.version = first[1]

    def batch(self) -> tuple[float, int]:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline().split()
        if len(line) != 2:
            self.close()
            sys.exit(f"DALI peer failed (exit {self.proc.returncode})")
        return float(line[0]), int(line[1])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def pixel_differences(loader, cfg, epochs: int) -> dict[str, np.ndarray]:
    """|a - b| of uint8 outputs on the same crops, decode_scale dct against exact, and two
    differences the loader already accepts for scale: bilinear against bicubic (the
    `augment.interpolation` choice) and the fast IDCT/upsampling against the accurate ones.

    Keys: 'dct', 'interp', 'idct' (flat arrays over all pixels of all images), and the same with
    ' reduced' for the crops that dct decodes at a reduced scale."""
    S = cfg.augment.size
    cfgs = {name: replace(cfg, augment=replace(cfg.augment, **kw)) for name, kw in (
        ("dct", {"decode_scale": "dct"}), ("exact", {"decode_scale": "exact"}), ("accurate", {"decode_scale": "exact"}),
        ("bicubic", {"decode_scale": "exact", "interpolation": "bicubic"}))}
    parts: dict[str, list[np.ndarray]] = {}

    def add(name: str, diff: torch.Tensor, reduced: np.ndarray) -> None:
        d = diff.abs().to(torch.uint8).numpy()
        parts.setdefault(name, []).append(d.reshape(-1))
        parts.setdefault(name + " reduced", []).append(d[reduced].reshape(-1))

    def batches(name: str, epoch: int):
        it = iter(BatchStream(loader.sources, cfgs[name], "image", 0, 1, epoch, 0, gpu_decode=False))
        while True:
            dec.FAST_DCT = name != "accurate"
            try:
                yield next(it)
            except StopIteration:
                return
            finally:
                dec.FAST_DCT = True

    for epoch in range(200, 200 + epochs):
        for got in zip(*(batches(k, epoch) for k in cfgs)):
            got = dict(zip(cfgs, got))
            real = ~got["exact"]["is_pad"].numpy()
            box = got["exact"]["box"].numpy()[real]
            reduced = np.array([dec.reduction(int(b[2]), int(b[3]), S) > 1 for b in box], dtype=bool)
            exact = got["exact"]["image"][real].to(torch.int16)
            for name, other in (("dct", "dct"), ("interp", "bicubic"), ("idct", "accurate")):
                add(name, got[other]["image"][real].to(torch.int16) - exact, reduced)
    return {k: np.concatenate(v) for k, v in parts.items()}


def describe(d: np.ndarray) -> str:
    return f"mean {d.mean():.2f}, p99 {np.percentile(d, 99):.0f}" if d.size else "no pixels"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default="../shared/bench-images")
    ap.add_argument("--out", default="bench_out/loader")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--diff-epochs", type=int, default=4, help="epochs of crops for the pixel comparisons")
    ap.add_argument("--dali-venv", default="bench_out/dali-venv", help="DALI's own venv (made once)")
    ap.add_argument("--no-dali", action="store_true", help="leave DALI out (no install; for tests)")
    args = ap.parse_args()
    files = sorted(f for f in glob.glob(os.path.join(args.images, "*")) if f.lower().endswith((".jpg", ".jpeg")))
    if not files:
        sys.exit(f"no JPEG files in {args.images}")
    torch.set_num_threads(1)  # per-core figures
    shards = shard_folder(files, os.path.join(args.out, "shards"))
    n = len(files)
    aug = AugmentConfig(size=args.size)
    other_scale = "exact" if aug.decode_scale == "dct" else "dct"
    B = 25
    # shuffle_buffer=0: batches follow the sorted file list, so every method's chunk k holds the
    # same 25 images; timing chunk by chunk, methods interleaved, keeps what load drift CPU time
    # still feels (caches, turbo) from favouring one method
    cfg = DataConfig(manifests=[shards], batch_size=B, num_workers=0, decode_device="cpu", remainder="pad",
                     shuffle_buffer=0, augment=aug)
    cfg_other = replace(cfg, augment=replace(aug, decode_scale=other_scale))
    loader = build_loader(cfg, 0, 1, torch.device("cpu"), "image")
    dali = None if args.no_dali else DaliPeer(install_dali(Path(args.dali_venv)), files, args.size, B)

    import simplejpeg
    from PIL import Image
    from torchvision import transforms as T

    classic_tf = T.Compose([T.RandomResizedCrop(args.size), T.RandomHorizontalFlip(), T.ToTensor(),
                            T.Normalize(aug.mean, aug.std)])
    blobs = [open(f, "rb").read() for f in files]
    chunks = [range(k, min(k + B, n)) for k in range(0, n, B)]
    dali_cpu = [0.0]  # the peer's own CPU seconds, summed per run

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
        other = iter(BatchStream(loader.sources, cfg_other, "image", 0, 1, epoch, 0, gpu_decode=False))
        whole = iter(BatchStream(loader.sources, cfg, "image", 0, 1, epoch, 0, gpu_decode=False))

        def whole_batch() -> int:
            dec.REGION_DECODE = False
            try:
                return next(whole)["image"].shape[0]
            finally:
                dec.REGION_DECODE = True

        def dali_batch() -> int:  # the peer times itself: our clock would also count the pipe
            cpu, got = dali.batch()
            dali_cpu[0] += cpu
            return got
        loader.set_epoch(epoch)
        ours_norm = iter(loader)
        methods = [("ours", lambda: next(ours)["image"].shape[0]),
                   (f"ours, decode_scale {other_scale}", lambda: next(other)["image"].shape[0]),
                   ("ours, whole-image decode", whole_batch),
                   ("ours+norm", lambda: next(ours_norm)["image"].shape[0]),
                   ("DALI CPU", dali_batch), ("classic", lambda: classic(c)), ("bare decode", lambda: bare(c)),
                   ("bare decode (fast idct)", lambda: bare_fast(c))]
        if dali is None:
            methods = [m for m in methods if m[0] != "DALI CPU"]
        t = {k: 0.0 for k, _ in methods}
        got = dict.fromkeys(t, 0)
        dali_cpu[0] = 0.0
        for c in chunks:
            for name, fn in methods:
                t0 = time.process_time()
                got[name] += min(fn(), len(c))  # the loaders pad the last batch; count real images
                t[name] += time.process_time() - t0
        if dali is not None:
            t["DALI CPU"] = dali_cpu[0]
        assert all(v == n for v in got.values()), got
        return t

    try:
        run_once(99)  # warm-up: page cache, lazy imports
        times: dict[str, list[float]] = {}
        for r in range(args.repeats):
            for k, v in run_once(r).items():
                times.setdefault(k, []).append(v)
    finally:
        if dali is not None:
            dali.close()
    # resident memory over three more epochs of the loader (the flatness check)
    rss = []
    for e in range(3):
        loader.set_epoch(100 + e)
        sum(b["image"].shape[0] for b in loader)
        with open("/proc/self/statm") as f:
            rss.append(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20)
    diffs = pixel_differences(loader, cfg, args.diff_epochs)
    rate = {k: n / statistics.median(v) for k, v in times.items()}
    print(f"images: {n} from {args.images}, output {args.size}px, one thread, images per CPU-second, "
          f"medians of {args.repeats}; load {os.getloadavg()[0]:.2f}"
          + (f"; DALI {dali.version}" if dali else "; DALI not run (--no-dali)"))
    for k, v in rate.items():
        print(f"  {k:26s} {v:8.1f} images/s")
    print(f"  ours+norm vs classic: {rate['ours+norm'] / rate['classic']:.2f}x")
    tj = tjregion.load()
    decoder = "libturbojpeg 3 region decode, " + tj.path if tj else "whole-image simplejpeg: " + tjregion.why_not()
    print(f"  decoder: {decoder}; region vs whole-image decode: {rate['ours'] / rate['ours, whole-image decode']:.2f}x")
    print(f"  resident memory after 3 more loader epochs: {', '.join(f'{m:.0f}' for m in rss)} MiB "
          f"({(rss[2] / rss[0] - 1) * 100:+.1f}% from the first)")
    n_px = 3 * args.size * args.size
    n_red = diffs["dct reduced"].size // n_px
    print(f"  pixel differences over {args.diff_epochs} epochs of crops ({diffs['dct'].size // n_px} images, "
          f"{n_red} of them decoded at a reduced DCT scale), grey levels:")
    for name, label in (("dct", "decode_scale dct vs exact"), ("interp", "bilinear vs bicubic (both exact)"),
                        ("idct", "fast vs accurate IDCT (both exact)")):
        print(f"    {label:36s} all: {describe(diffs[name])}; "
              f"reduced-scale crops: {describe(diffs[name + ' reduced'])}")
    # the rule for dct as the default: on the crops it changes, no further from exact than the
    # two interpolations are from each other (mean and p99)
    d, ref = diffs["dct reduced"], diffs["interp reduced"]
    within = d.size > 0 and d.mean() <= ref.mean() and np.percentile(d, 99) <= np.percentile(ref, 99)
    verdict = ("yes" if within else "no") if d.size else "not measured (no crop was large enough)"
    print(f"  dct within the bilinear-bicubic difference on the reduced-scale crops: {verdict} "
          f"(default decode_scale: {aug.decode_scale})")
    dct_rate = rate["ours"] if aug.decode_scale == "dct" else rate["ours, decode_scale dct"]
    print(f"cpu loader (decode_scale dct) vs bare decode: {dct_rate / rate['bare decode']:.2f}x; "
          f"pixel difference to exact: {describe(diffs['dct'])}")
    vs_dali = f"{rate['ours'] / rate['DALI CPU']:.2f}x" if dali else "not run (--no-dali)"
    print(f"cpu loader vs DALI: {vs_dali}; vs classic: {rate['ours'] / rate['classic']:.2f}x; "
          f"vs bare decode: {rate['ours'] / rate['bare decode']:.2f}x")


if __name__ == "__main__":
    main()
