"""The trainer-facing loader: epochs, state, DataLoader workers, and the device-side stage.

    loader = build_loader(cfg, rank, world_size, device, kind)   # kind: image | text | image_text
    len(loader)            # batches per epoch for this rank (the same on every rank)
    for batch in loader:   # the rest of the current epoch, then the epoch advances by one
        ...
    loader.state_dict()    # {"epoch", "consumed", "seed", "samples_per_epoch", "version"}
    loader.load_state_dict(sd)  # constant time; any world size / worker count

`consumed` counts samples of the epoch order handed out by all ranks together; since every
step takes the next B*W positions of that order, it is all a resume needs. The device stage
runs in the calling process: for the GPU path it decodes the batch with nvJPEG and crops,
resizes and flips it in batched ops; for the CPU path it moves the uint8 batch over. Both then
apply colour jitter and normalisation and cast to cfg.output_dtype. With `data.teacher_view`
(image_text), each batch also holds `image_teacher`: a second view of the same decoded images
with its own draws and augmentation (`data.teacher_augment`, views.py).

On a CUDA device the device stage runs ahead in a helper thread, on its own stream: batch k+1
is decoded and augmented while the trainer's step k runs (`lookahead` finished batches wait,
default 1, while the thread stages the next).
A batch is handed over with an event the caller's stream waits on (no host wait) and its
tensors marked with `record_stream`, so the allocator does not reuse their memory before the
step has read it. `consumed`, the corrupt-sample count and the warnings count batches handed to
the caller, never batches staged ahead, so a checkpoint taken between steps resumes exactly.
The device is always named with its index (`cuda:N`), so torchvision keeps one nvJPEG decoder.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import queue
import threading

import torch
from torch.utils.data import DataLoader

from .augment import finish, resized_crops, to_device
from .decode import decode_cuda
from .order import Deal, epoch_counts, epoch_steps, load_source
from .stream import BatchStream
from .views import check_teacher_view, teacher_augment

log = logging.getLogger(__name__)

KINDS = ("image", "text", "image_text")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
STATE_VERSION = 1


class StreamingLoader:
    """Deterministic, elastic-resumable, rank-balanced batches from shard manifests."""

    def __init__(self, cfg, rank: int, world_size: int, device: torch.device, kind: str):
        _check(cfg, rank, world_size, kind)
        self.cfg, self.rank, self.world_size, self.kind = cfg, rank, world_size, kind
        self.device = canonical_device(device)
        self.sources = [load_source(m, cfg.split) for m in cfg.manifests]
        _check_local_shards(self.sources)
        # samples per epoch: the same for every epoch (weights only change the mix)
        self.N = sum(epoch_counts([src.size for src in self.sources], list(cfg.weights)))
        if self.N <= 0:
            raise ValueError("the manifests hold no samples for split " + repr(cfg.split))
        self.dtype = _DTYPES[cfg.output_dtype]
        self.gpu_decode = kind != "text" and _use_gpu(cfg.decode_device, self.device)
        if kind != "text" and not self.gpu_decode and importlib.util.find_spec("simplejpeg") is None:
            # say so now, not as a ModuleNotFoundError inside a DataLoader worker
            raise ValueError("data.decode_device: the CPU decode path needs simplejpeg, which is not "
                             "installed (pip install simplejpeg), or use decode_device=cuda")
        self.epoch = 0
        self.consumed = 0  # global samples of the current epoch handed out
        self.corrupt_count = 0  # corrupt samples replaced since this loader was built
        # batches whose device stage runs ahead in a helper thread (0: inline, in the caller's
        # thread); CPU devices gain nothing from it, tests set it to exercise the thread
        self.lookahead = 1 if self.device.type == "cuda" else 0
        self._stage_stream = None  # the helper thread's CUDA stream, made on first use

    # -- sizes and state -------------------------------------------------------------------------

    def __len__(self) -> int:
        return epoch_steps(self.N, self.cfg.batch_size, self.world_size, self.cfg.remainder == "pad")

    def batches_left(self) -> int:
        """Batches the next iteration yields (fewer than len() after a mid-epoch resume)."""
        return self._deal().steps

    def _deal(self) -> Deal:
        return Deal(self.N, self.consumed, self.cfg.batch_size, self.world_size, self.rank,
                    self.cfg.remainder == "pad")

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning; a no-op when it is already the current epoch."""
        if int(epoch) != self.epoch:
            self.epoch, self.consumed = int(epoch), 0

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "consumed": self.consumed,
                "seed": self.cfg.seed, "samples_per_epoch": self.N}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {sd.get('version')!r} is not {STATE_VERSION}")
        if int(sd["seed"]) != self.cfg.seed:
            raise ValueError(f"loader state was saved with seed {sd['seed']}, config has {self.cfg.seed}: "
                             "resuming would change the order")
        if int(sd["samples_per_epoch"]) != self.N:
            raise ValueError(f"loader state is for {sd['samples_per_epoch']} samples per epoch, the manifests "
                             f"now give {self.N}: the data changed")
        self.epoch, self.consumed = int(sd["epoch"]), int(sd["consumed"])

    # -- iteration -------------------------------------------------------------------------------

    def __iter__(self):
        cfg, deal = self.cfg, self._deal()
        start, gb = self.consumed, cfg.batch_size * self.world_size
        ds = BatchStream(self.sources, cfg, self.kind, self.rank, self.world_size, self.epoch, start,
                         self.gpu_decode)
        nw = max(0, int(cfg.num_workers))
        # a private generator: DataLoader draws a base seed at every iter(), which would advance
        # the global torch RNG (dropout, drop path) by a different count in a resumed run;
        # workers need no seed from it (every random draw is seeded per sample)
        dl = DataLoader(ds, batch_size=None, num_workers=nw,
                        pin_memory=self.device.type == "cuda" and not self.gpu_decode,
                        prefetch_factor=2 if nw > 0 else None, persistent_workers=False,
                        generator=torch.Generator().manual_seed(self.epoch))
        it = iter(dl)  # workers start here, forked from the caller's thread
        staged = self._ahead(it) if self.lookahead > 0 else (self._device_stage(wb) for wb in it)
        done = 0
        try:
            for batch in staged:
                self._hand_over(batch)
                done += 1
                self.consumed = min(self.N, start + done * gb)
                yield batch
        finally:
            staged.close()  # stops the helper thread when the caller leaves the epoch early
            if hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()
        if done != deal.steps:  # a worker died quietly: never report a finished epoch then
            raise RuntimeError(f"loader yielded {done} of {deal.steps} batches for epoch {self.epoch}")
        self.epoch, self.consumed = self.epoch + 1, 0

    def _hand_over(self, batch: dict) -> None:
        """Caller's side of a staged batch: log and count its corrupt samples."""
        corrupt = batch.pop("_corrupt")
        for key, reason in corrupt:
            log.warning("corrupt sample %s skipped and replaced: %s", key, reason)
        self.corrupt_count += len(corrupt)

    def _ahead(self, it):
        """Batches from the worker-batch iterator `it`, their device stage run `lookahead`
        batches ahead in a helper thread."""
        q: queue.Queue = queue.Queue(maxsize=self.lookahead)
        stop = threading.Event()
        cuda = self.device.type == "cuda"
        if cuda and self._stage_stream is None:
            self._stage_stream = torch.cuda.Stream(self.device)

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                if cuda:
                    torch.cuda.set_device(self.device)
                ctx = torch.cuda.stream(self._stage_stream) if cuda else contextlib.nullcontext()
                with ctx:
                    for wb in it:
                        batch = self._device_stage(wb)
                        ready = None
                        if cuda:
                            ready = torch.cuda.Event()
                            ready.record(self._stage_stream)
                        if not put((batch, ready)):
                            break
                put(_END)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread, raised there
                put(_Failure(e))

        t = threading.Thread(target=work, name="loader-device-stage", daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                batch, ready = item
                if ready is not None:
                    user = torch.cuda.current_stream(self.device)
                    user.wait_event(ready)
                    for v in batch.values():
                        if isinstance(v, torch.Tensor) and v.device.type == "cuda":
                            v.record_stream(user)
                yield batch
        finally:
            stop.set()
            t.join()

    def _device_stage(self, wb: dict) -> dict:
        """A worker batch -> the batch on the device (queued work only: no host wait)."""
        dev, aug = self.device, self.cfg.augment
        out = {"key": wb["key"], "is_pad": to_device(wb["is_pad"], dev), "_corrupt": list(wb["corrupt"])}
        if self.kind == "text":
            out["input_ids"] = to_device(wb["input_ids"], dev)
            out["padding_mask"] = to_device(wb["padding_mask"], dev)
            return out
        if self.gpu_decode:
            x, jitter, teacher = self._gpu_images(wb, out)
        else:
            x, jitter = to_device(wb["image"], dev), wb["jitter"]
            teacher = (to_device(wb["image_teacher"], dev), wb["jitter_teacher"]) if "image_teacher" in wb else None
        out["image"] = finish(x, jitter, aug, self.dtype)
        if teacher is not None:  # the multimodal teacher's own view (views.py)
            out["image_teacher"] = finish(teacher[0], teacher[1], teacher_augment(self.cfg), self.dtype)
        if self.kind == "image":
            out["label"] = to_device(wb["label"], dev)
        else:
            out["input_ids"] = to_device(wb["input_ids"], dev)
            out["padding_mask"] = to_device(wb["padding_mask"], dev)
            out["image_id"] = wb["image_id"]
        return out

    def _gpu_images(self, wb: dict, out: dict):
        """nvJPEG decode, replacement of what it refuses, crop/resize/flip: (images 0..255, jitter,
        teacher) with teacher = (its view 0..255, its jitter) or None, both views from one decode."""
        buf, offs = wb["jpeg"], wb["jpeg_offsets"].tolist()  # host tensors from the worker
        datas = [buf[offs[b]:offs[b + 1]] for b in range(len(offs) - 1)]
        sizes = wb["hw"].tolist() if "hw" in wb else None
        imgs, errs = decode_cuda(datas, self.device, sizes)
        # per-sample host parameters of every view: (box, flip, jitter)
        views = [[wb["box"], wb["flip"], wb["jitter"]]]
        if "box_teacher" in wb:
            views.append([wb["box_teacher"], wb["flip_teacher"], wb["jitter_teacher"]])
        bad = [b for b, e in enumerate(errs) if e]
        if bad:  # the decoder refused a sample the header check passed: replace it like a worker would
            good = [b for b in range(len(imgs)) if not errs[b]]
            if not good:
                raise RuntimeError(f"every image of a batch failed to decode ({wb['key'][0]}: {errs[0]})")
            views = [[None if t is None else t.clone() for t in v] for v in views]
            pad = wb["is_pad"].clone()
            keys = list(wb["key"])
            for b in bad:
                out["_corrupt"].append((keys[b], errs[b]))
                g = min(good, key=lambda k: (abs(k - b), k))
                imgs[b], keys[b] = imgs[g], keys[g]
                for v in views:
                    for t in v:
                        if t is not None:
                            t[b] = t[g]
                pad[b] = True
            out["key"], out["is_pad"] = keys, to_device(pad, self.device)
        aug = self.cfg.augment
        (box, flip, jitter), teacher = views[0], None
        if len(views) > 1:
            taug, (tbox, tflip, tjit) = teacher_augment(self.cfg), views[1]
            teacher = (resized_crops(imgs, tbox, tflip, taug.size, taug.interpolation), tjit)
        return resized_crops(imgs, box, flip, aug.size, aug.interpolation), jitter, teacher


class _Failure:
    """An exception raised in the device-stage thread, to be raised again in the caller's."""

    def __init__(self, exc: BaseException):
        self.exc = exc


_END = object()


def canonical_device(device) -> torch.device:
    """`device` with its index: 'cuda' becomes 'cuda:N' (N the current device), so every part of
    the program names it the same way (torchvision re-creates its nvJPEG decoder whenever the
    device it is given differs from the last one, and 'cuda' differs from 'cuda:0')."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d


def build_loader(cfg, rank: int, world_size: int, device: torch.device, kind: str) -> StreamingLoader:
    """The loader of `kind` ("image" | "text" | "image_text") for one rank; see the module doc."""
    return StreamingLoader(cfg, rank, world_size, device, kind)


def _use_gpu(decode_device: str, device: torch.device) -> bool:
    if decode_device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"data.decode_device must be auto, cpu or cuda, got {decode_device!r}")
    if decode_device == "cuda" and device.type != "cuda":
        raise ValueError(f"data.decode_device=cuda needs a cuda device, the loader was given {device}")
    if decode_device == "auto":
        return device.type == "cuda" and torch.cuda.is_available()
    return decode_device == "cuda"


def _check(cfg, rank: int, world_size: int, kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not cfg.manifests:
        raise ValueError("data.manifests is empty: give at least one manifest.json path")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if cfg.batch_size < 1:
        raise ValueError(f"data.batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.remainder not in ("drop", "pad"):
        raise ValueError(f"data.remainder must be 'drop' or 'pad', got {cfg.remainder!r}")
    if cfg.output_dtype not in _DTYPES:
        raise ValueError(f"data.output_dtype must be float32 or bfloat16, got {cfg.output_dtype!r}")
    if cfg.augment.interpolation not in ("bilinear", "bicubic"):
        raise ValueError(f"augment.interpolation must be bilinear or bicubic, got {cfg.augment.interpolation!r}")
    check_teacher_view(cfg, kind)
    if kind == "image_text" and not cfg.tokenizer:
        raise ValueError("data.tokenizer is empty: image_text batches need it to tokenise captions")


def _check_local_shards(sources) -> None:
    """Fail before any worker starts when a local shard is missing (remote ones fail on open)."""
    for src in sources:
        for url in src.urls:
            if "://" not in url and not os.path.exists(url):
                raise FileNotFoundError(f"shard not found: {url} (listed in {src.manifest})")
