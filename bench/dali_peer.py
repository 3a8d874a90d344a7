"""NVIDIA DALI's CPU image pipeline as a timed peer of bench_loader.py (runs in DALI's own venv).

    <dali venv>/bin/python bench/dali_peer.py --size 224 --batch 25 FILE...

The pipeline a speed-minded user would write for ImageNet-style training on CPUs:
`fn.readers.file` -> `fn.decoders.image_random_crop(device="cpu")` (libjpeg-turbo decode of the
random-area crop only, area 0.08-1, aspect 3/4-4/3, 10 tries: RandomResizedCrop's parameters)
-> `fn.resize(antialias=True)` (linear) to size x size -> `fn.flip` (horizontal, p = 0.5).
Output: a uint8 HWC batch, what our CPU worker hands over too (normalisation is device work).
One thread, no GPU (device_id=None), and synchronous execution (no prefetch, no pipelining), so
that all the work for a batch happens inside the call that asks for it and the CPU time measured
around that call is the whole cost of the batch.

It imports nothing from this repository (DALI lives in its own venv). Protocol, one line each way
on stdin/stdout: `run` -> `<process CPU seconds of the batch> <images>`; `quit` or end of input
ends it. The first line it writes is `ready <dali version>`.
"""

from __future__ import annotations

import argparse
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()

    import nvidia.dali as dali
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=args.batch, num_threads=1, device_id=None, seed=args.seed,
                  exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
    def pipeline():
        # pad_last_batch: an epoch that does not fill its last batch repeats the last file, as
        # our loader pads (remainder=pad); the bench counts only the real images of each batch
        jpegs, _ = fn.readers.file(files=args.files, random_shuffle=False, pad_last_batch=True, name="files")
        images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB,
                                               random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
                                               num_attempts=10)
        images = fn.resize(images, resize_x=args.size, resize_y=args.size, antialias=True,
                           interp_type=types.INTERP_LINEAR)
        return fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5), vertical=0)

    pipe = pipeline()
    pipe.build()
    print(f"ready {dali.__version__}", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        t0 = time.process_time()
        (images,) = pipe.run()
        cpu = time.process_time() - t0
        first = images.at(0)
        if first.shape != (args.size, args.size, 3) or str(first.dtype) != "uint8":
            sys.exit(f"unexpected DALI output {first.shape} {first.dtype}")
        print(f"{cpu:.6f} {len(images)}", flush=True)


if __name__ == "__main__":
    main()
