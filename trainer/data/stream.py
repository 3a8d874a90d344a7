"""The worker side: an IterableDataset that yields whole batches for one rank.

Each DataLoader worker of a rank builds the steps s with s % num_workers == worker_id, in
order; the DataLoader interleaves workers round-robin, so the rank sees steps 0, 1, 2, ...
The read path, per worker, is a flat list of stages:

1. plan   EpochPlan(sources, weights, seed, epoch, window) and Deal(start, B, W, rank, pad)
2. fetch  on the first need of a window, read every sample of that window this worker will
          use (shards front to back, forward seeks only) into a refcounted cache
3. build  per step: the B samples of this rank's slice; padding positions (>= N) repeat the
          epoch's first samples and are flagged
4. decode image kinds: JPEG header -> random parameters (per sample hash) -> either the CPU
          decode-crop-resize to uint8, or the raw bytes plus parameters for the GPU;
          image_text with data.teacher_view: a second view per image for the teacher, from
          the same decode and its own draws (views.py)
          text kinds: token ids (pre-tokenised npy, or tokenised here)
5. repair a corrupt sample is replaced by a copy of the nearest good sample of the batch,
          flagged like padding, and reported (key, reason) for the main process to log/count
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .augment import draw_params
from .decode import cpu_decode_crop, jpeg_size
from .order import Deal, EpochPlan, Source
from .shards import Corrupt, ShardReader
from .text import TextEncoder, load_npy_ids
from .views import cpu_decode_views, teacher_augment

# members read per kind: (required, optional)
FIELDS = {
    "image": (("jpg",), ("cls",)),
    "text": ((), ("npy", "txt")),
    "image_text": (("jpg", "txt"), ("json",)),
}


class WindowCache:
    """Samples a worker still has to use, loaded one shuffle window at a time."""

    def __init__(self, plan: EpochPlan, deal: Deal, worker: int, num_workers: int, reader: ShardReader,
                 fields: tuple[tuple[str, ...], tuple[str, ...]]):
        self.plan, self.deal, self.worker, self.nw = plan, deal, worker, num_workers
        self.reader, self.fields = reader, fields
        self.items: dict[int, list] = {}  # position -> [sample, uses left]
        self.windows_loaded = 0

    def _mine(self, p: np.ndarray, from_step: int) -> np.ndarray:
        d = self.deal
        step, rank = d.owner(p)
        return ((p >= d.start) & (rank == d.rank) & (step % self.nw == self.worker)
                & (step >= from_step) & (step < d.steps))

    def _needed(self, w: int, from_step: int) -> np.ndarray:
        """Epoch positions in window w that this worker uses from `from_step` on (with repeats)."""
        d, N = self.deal, self.plan.N
        a, b = self.plan.window_range(w)
        p = np.arange(max(a, d.start), b, dtype=np.int64)
        need = [p[self._mine(p, from_step)]]
        end = d.start + d.steps * d.B * d.W
        if end > N:  # padding positions repeat positions p % N
            pp = np.arange(max(N, d.start), end, dtype=np.int64)
            pp = pp[self._mine(pp, from_step)] % N
            need.append(pp[(pp >= a) & (pp < b)])
        return np.concatenate(need)

    def _load(self, w: int, from_step: int) -> None:
        qs, uses = np.unique(self._needed(w, from_step), return_counts=True)
        info = self.plan.lookup(qs)
        req, opt = self.fields
        groups: dict[tuple[int, int], list[int]] = {}
        for k in range(len(qs)):
            groups.setdefault((int(info["source"][k]), int(info["shard"][k])), []).append(k)
        for (s, sh), ks in sorted(groups.items()):
            src: Source = self.plan.sources[s]
            got = self.reader.read(src.urls[sh], int(src.counts[sh]), [int(info["index"][k]) for k in ks], req, opt)
            for k, g in zip(ks, got):
                sample = g if isinstance(g, Corrupt) else (g[0], g[1], s, int(info["uid"][k]))
                self.items[int(qs[k])] = [sample, int(uses[k])]
        self.windows_loaded += 1

    def take(self, q: int, step: int):
        if q not in self.items:
            self._load(q // self.plan.K, step)
        entry = self.items[q]
        entry[1] -= 1
        if entry[1] <= 0:
            del self.items[q]
        return entry[0]


def _repair(good: list[bool], what: str) -> list[int]:
    """For each slot, the slot whose sample fills it: itself, or the nearest good one."""
    idx = [b for b, g in enumerate(good) if g]
    if not idx:
        raise RuntimeError(f"every sample of a batch is corrupt ({what}); check the shards")
    return [b if good[b] else min(idx, key=lambda k: (abs(k - b), k)) for b in range(len(good))]


class BatchStream(IterableDataset):
    """Batches of one rank for the rest of one epoch; see the module docstring."""

    def __init__(self, sources: list[Source], cfg, kind: str, rank: int, world_size: int, epoch: int,
                 start: int, gpu_decode: bool):
        super().__init__()
        self.sources, self.cfg, self.kind = sources, cfg, kind
        self.rank, self.world_size, self.epoch, self.start = rank, world_size, epoch, start
        self.gpu_decode = gpu_decode
        self.worker_override: tuple[int, int] | None = None  # (id, count): tests simulate workers in-process
        self.text = TextEncoder(cfg.tokenizer) if kind in ("text", "image_text") else None

    def plan(self) -> tuple[EpochPlan, Deal]:
        c = self.cfg
        # buffer > 1: shuffle shards and samples within windows of that size; 1: shuffle the
        # shards only; 0: no shuffling at all. Without sample shuffling, still read by windows.
        window = c.shuffle_buffer if c.shuffle_buffer > 1 else 1024
        plan = EpochPlan(self.sources, list(c.weights), c.seed, self.epoch, window,
                         shuffle=c.shuffle_buffer > 1, shuffle_shards=c.shuffle_buffer > 0)
        deal = Deal(plan.N, self.start, c.batch_size, self.world_size, self.rank, c.remainder == "pad")
        return plan, deal

    def __iter__(self):
        info = get_worker_info()
        worker, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.worker_override is not None:
            worker, nw = self.worker_override
        if info is not None:
            # one core per worker: torch intra-op threads or the tokenizer's thread pool in
            # every worker would oversubscribe the machine
            torch.set_num_threads(1)
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        plan, deal = self.plan()
        reader = ShardReader()
        cache = WindowCache(plan, deal, worker, nw, reader, FIELDS[self.kind])
        try:
            for step in range(worker, deal.steps, nw):
                p = deal.positions(step)
                raw = [cache.take(int(q), step) for q in p % plan.N]
                yield self.build(raw, p >= plan.N, step)
        finally:
            reader.close()

    # -- batch building ------------------------------------------------------------------------

    def build(self, raw: list, is_pad: np.ndarray, step: int) -> dict:
        corrupt: list[tuple[str, str]] = []
        out: dict = {"step": step}
        if self.kind == "text":
            self._text(raw, out, corrupt)
        else:
            self._image(raw, out, corrupt)
        pad = torch.from_numpy(np.asarray(is_pad, dtype=bool)).clone()
        if "_filled" in out:  # replaced slots count as repeats
            pad |= torch.from_numpy(out.pop("_filled"))
        out["is_pad"] = pad
        out["corrupt"] = corrupt
        return out

    def _image(self, raw: list, out: dict, corrupt: list) -> None:
        c, aug = self.cfg, self.cfg.augment
        B = len(raw)
        sizes: list = [None] * B
        for b, r in enumerate(raw):
            if isinstance(r, Corrupt):
                continue
            try:
                sizes[b] = jpeg_size(r[1]["jpg"])
            except ValueError as e:
                raw[b] = Corrupt(r[0], f"jpg: {e}")
        ok = [not isinstance(r, Corrupt) for r in raw]
        ids = [(r[2], r[3]) if o else (0, 0) for r, o in zip(raw, ok)]
        srcs, uids, hws = [s for s, _ in ids], [u for _, u in ids], [sz if sz else (1, 1) for sz in sizes]
        par = draw_params(c.seed, self.epoch, srcs, uids, hws, aug)
        # the multimodal teacher's own view: the same image, its own draw stream (views.py)
        taug = teacher_augment(c) if self.kind == "image_text" and c.teacher_view else None
        tpar = draw_params(c.seed, self.epoch, srcs, uids, hws, taug, view=1) if taug else None
        imgs: list = [None] * B
        timgs: list = [None] * B
        if not self.gpu_decode:
            for b in range(B):
                if ok[b]:
                    ok[b] = self._cpu_decode(raw, b, sizes[b], par, tpar, taug, imgs, timgs)
        for r in raw:
            if isinstance(r, Corrupt):
                corrupt.append((r.key, r.reason))
        fill = _repair(ok, corrupt[0][0] + ": " + corrupt[0][1] if corrupt else "")
        src = [raw[fill[b]] for b in range(B)]
        out["key"] = [s[0] for s in src]
        out["_filled"] = np.array([fill[b] != b for b in range(B)])
        out["box"] = torch.from_numpy(par.box[fill])
        out["flip"] = torch.from_numpy(par.flip[fill])
        out["jitter"] = None if par.jitter is None else torch.from_numpy(par.jitter[fill])
        if tpar is not None:
            out["box_teacher"] = torch.from_numpy(tpar.box[fill])
            out["flip_teacher"] = torch.from_numpy(tpar.flip[fill])
            out["jitter_teacher"] = None if tpar.jitter is None else torch.from_numpy(tpar.jitter[fill])
        if self.gpu_decode:
            # one flat buffer + offsets: a single shared-memory tensor instead of B of them
            blobs = [s[1]["jpg"] for s in src]
            offs = np.concatenate([[0], np.cumsum([len(x) for x in blobs])]).astype(np.int64)
            out["jpeg"] = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8)
            out["jpeg_offsets"] = torch.from_numpy(offs)
            # the headers' sizes: the device checks the decoded sizes against them, as the CPU path does
            out["hw"] = torch.tensor([sizes[fill[b]] for b in range(B)], dtype=torch.int64).view(B, 2)
        else:
            S = aug.size
            batch = torch.empty((B, 3, S, S), dtype=torch.uint8)
            for b in range(B):
                batch[b].copy_(imgs[fill[b]])
            out["image"] = batch
            if tpar is not None:
                tb = torch.empty((B, 3, taug.size, taug.size), dtype=torch.uint8)
                for b in range(B):
                    tb[b].copy_(timgs[fill[b]])
                out["image_teacher"] = tb
        if self.kind == "image":
            out["label"] = torch.tensor([_label(s[1].get("cls")) for s in src], dtype=torch.int64)
        else:
            ids_, mask = self._captions([s[1]["txt"] for s in src])
            out["input_ids"], out["padding_mask"] = ids_, mask
            out["image_id"] = [_image_id(s[0], s[1].get("json")) for s in src]

    def _cpu_decode(self, raw: list, b: int, hw, par, tpar, taug, imgs: list, timgs: list) -> bool:
        """The CPU path for sample b: imgs[b] (and timgs[b], the teacher's view) as uint8 crops;
        False, with raw[b] replaced by a Corrupt, when the JPEG does not decode."""
        aug = self.cfg.augment
        try:
            if tpar is None:
                imgs[b] = cpu_decode_crop(raw[b][1]["jpg"], *hw, par.box[b], bool(par.flip[b]), aug.size,
                                          aug.interpolation, aug.decode_scale == "dct")
            else:  # one decode, two views
                imgs[b], timgs[b] = cpu_decode_views(raw[b][1]["jpg"], *hw,
                                                     [(par.box[b], par.flip[b], aug.size, aug.interpolation),
                                                      (tpar.box[b], tpar.flip[b], taug.size, taug.interpolation)],
                                                     aug.decode_scale == "dct")
        except (ValueError, RuntimeError) as e:  # simplejpeg raises ValueError on bad data
            raw[b] = Corrupt(raw[b][0], f"jpg decode: {e}")
            return False
        return True

    def _captions(self, texts: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
        L = self.cfg.text_max_len
        seqs = [self.text.encode_caption(t.decode("utf-8", errors="replace"), L) for t in texts]
        ids, mask = self.text.pad_batch(seqs, L)
        return torch.from_numpy(ids), torch.from_numpy(mask)

    def _text(self, raw: list, out: dict, corrupt: list) -> None:
        T = self.cfg.block_size
        seqs: list = [None] * len(raw)
        for b, r in enumerate(raw):
            if isinstance(r, Corrupt):
                continue
            key, f = r[0], r[1]
            try:
                if "npy" in f:
                    seqs[b] = load_npy_ids(f["npy"])
                elif "txt" in f:
                    seqs[b] = self.text.encode_block(f["txt"].decode("utf-8", errors="replace"), T)
                else:
                    raise ValueError("no .npy or .txt member")
            except ValueError as e:
                raw[b] = Corrupt(key, str(e))
        ok = [not isinstance(r, Corrupt) for r in raw]
        for r in raw:
            if isinstance(r, Corrupt):
                corrupt.append((r.key, r.reason))
        fill = _repair(ok, corrupt[0][0] + ": " + corrupt[0][1] if corrupt else "")
        ids, mask = self.text.pad_batch([seqs[fill[b]] for b in range(len(raw))], T)
        out["input_ids"], out["padding_mask"] = torch.from_numpy(ids), torch.from_numpy(mask)
        out["key"] = [raw[fill[b]][0] for b in range(len(raw))]
        out["_filled"] = np.array([fill[b] != b for b in range(len(raw))])


def _label(cls: bytes | None) -> int:
    if cls is None:
        return -1
    try:
        return int(cls.decode("ascii").strip())
    except ValueError:
        return -1


def _image_id(key: str, meta: bytes | None) -> str:
    """The image's id from its json (`image_id`), else the sample key."""
    if meta:
        try:
            v = json.loads(meta).get("image_id")
            if v is not None:
                return str(v)
        except (ValueError, AttributeError):
            pass
    return key
