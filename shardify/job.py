"""Run a sharding job: list, plan, write this node's shards in parallel, then finalize.

    inputs (source order) -> seeded order -> shard ranges -> this node's shards -> workers
    each worker: its shard's rows from the plan's files -> read payloads -> source.encode
                 -> reproducible tar (temp name) -> stats -> rename

Resuming is free: finished shards (see plan.shard_done) are skipped, half-written ones are
deleted, and a rerun with different options is refused (outdir.py). Every input ends up either
in a tar or in the shard's reject list, so finalize can reconcile inputs = written + rejected.
Workers run through workers.py, so a dead worker or Ctrl-C ends the run instead of hanging it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from shardify import plan as planning
from shardify import state
from shardify.format import ShardifyError, shard_name
from shardify.outdir import prepare_output
from shardify.outlock import out_lock
from shardify.records import Item, Reject, reject_record
from shardify.sources.base import Source
from shardify.tarwriter import ShardTarWriter
from shardify.workers import run_in_workers

# A worker's progress messages: at most one per interval (each wakes its queue's feeder
# thread, which then competes for the worker's core and GIL: one per 32 samples made a
# 2-worker run about 5% slower, measured), and none when no bar is shown
_PROGRESS_INTERVAL = 0.25  # seconds


@dataclass
class JobOptions:
    seed: int = 0  # seeds the order of samples across shards
    samples_per_shard: int = 1000
    workers: int = 1  # worker processes on this node
    num_nodes: int = 1  # invocations that share the work (e.g. a SLURM array)
    node_rank: int = 0  # which of them this is
    overwrite: bool = False  # start over when the directory holds a job with other options
    progress: bool = True  # show a progress bar on stderr
    hash_thread: bool | None = None  # sha256 in a helper thread; None: when a core is spare


# ---------------------------------------------------------------- worker side
_WORKER: dict = {}


def _init_worker(source: Source, out_dir: str, progress_queue, hash_thread: bool, listing: str | None,
                 plan: planning.SplitPlan | None = None) -> None:
    _WORKER.clear()
    _WORKER.update(source=source, out_dir=Path(out_dir), queue=progress_queue, readers={},
                   hash_thread=hash_thread, listing=listing, plan=plan)


def _reader(split: str):
    readers = _WORKER["readers"]
    if split not in readers:
        readers[split] = _WORKER["source"].open_reader(split)
    return readers[split]


def write_shard(split: str, index: int, items: list[Item]) -> dict:
    """Write one shard under a temporary name, then its stats, then rename it into place."""
    source: Source = _WORKER["source"]
    out_dir: Path = _WORKER["out_dir"]
    report = _WORKER["queue"]  # None: no progress bar
    next_report = time.monotonic() + _PROGRESS_INTERVAL
    name = shard_name(split, index)
    tar_tmp = state.tmp_path(out_dir / f"{name}.tar")
    writer = ShardTarWriter(tar_tmp, source.fields, hash_thread=_WORKER["hash_thread"])
    rejects = []
    pending_samples = pending_bytes = 0
    try:
        for item, payload in _reader(split).read_many(items):
            try:
                if isinstance(payload, Reject):
                    raise payload
                fields = source.encode(item, payload)
            except Reject as rej:
                rejects.append(reject_record(split, item, rej, name))
                pending_samples += 1
                continue
            before = writer.offset
            writer.write_sample(item.key, fields)
            pending_samples += 1
            pending_bytes += writer.offset - before
            if report is not None and time.monotonic() >= next_report:
                report((pending_samples, pending_bytes))
                pending_samples = pending_bytes = 0
                next_report = time.monotonic() + _PROGRESS_INTERVAL
        stats = writer.close()
    except BaseException:
        writer.abort()
        tar_tmp.unlink(missing_ok=True)
        raise
    if report is not None:
        report((pending_samples, pending_bytes))
    stats.update(
        name=f"{name}.tar",
        mtime_ns=os.stat(tar_tmp).st_mtime_ns,  # a rename keeps it: a later change shows
        listing=_WORKER["listing"],  # the source files it was written from
        index=index,
        inputs=len(items),
        rejected=len(rejects),
        key_digest=str(state.key_digest(writer.keys + [r["key"] for r in rejects])),
        rejects=rejects,
    )
    idx_tmp = state.tmp_path(out_dir / f"{name}.idx")
    idx_tmp.write_text(writer.index_text(), encoding="utf-8")
    os.replace(idx_tmp, out_dir / f"{name}.idx")
    state.write_json_atomic(state.stats_path(out_dir, name), stats, indent=None)
    os.replace(tar_tmp, out_dir / f"{name}.tar")  # last: the tar's presence means "complete"
    return {k: stats[k] for k in ("name", "samples", "rejected", "bytes")}


def _task(args):
    split, index = args
    plan: planning.SplitPlan = _WORKER["plan"]  # a worker reads its shard's rows from the plan's files
    return write_shard(split, index, plan.shard_items(index))


# ---------------------------------------------------------------- driver
class _Progress:
    """A tqdm bar with samples/s and MB/s, or nothing when progress is off."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self.bar = None
        self.bytes = 0
        self.start = time.monotonic()
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="sample", desc=desc, file=sys.stderr,
                            mininterval=0.5, dynamic_ncols=True, smoothing=0.1)

    @property
    def enabled(self) -> bool:
        return self.bar is not None

    def update(self, samples: int, nbytes: int) -> None:
        self._show(self.bytes + nbytes, samples)

    def finish(self, nbytes: int) -> None:
        """Every sample is done: show the exact totals (the workers' last messages may still be
        on their way; they are not waited for)."""
        self._show(nbytes, self.bar.total - self.bar.n if self.bar is not None else 0)

    def _show(self, nbytes: int, more_samples: int) -> None:
        self.bytes = nbytes
        if self.bar is not None:
            self.bar.update(more_samples)
            elapsed = max(time.monotonic() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{self.bytes / elapsed / 1e6:.1f} MB/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def check_options(source: Source, out_dir: Path, splits: list[str], opts: JobOptions) -> None:
    """Every option value makes sense, checked before any work (and before anything is written)."""
    if opts.workers < 1:
        raise ShardifyError("--workers must be at least 1")
    if opts.samples_per_shard < 1:
        raise ShardifyError("--samples-per-shard must be at least 1")
    if opts.num_nodes < 1 or not 0 <= opts.node_rank < opts.num_nodes:
        raise ShardifyError(f"--node-rank {opts.node_rank} is not in [0, {opts.num_nodes})")
    if not splits:
        raise ShardifyError("no split to write")
    twice = sorted({s for s in splits if splits.count(s) > 1})
    if twice:
        raise ShardifyError(f"--split {twice[0]} is given more than once")
    unknown = [s for s in splits if s not in source.splits()]
    if unknown:
        raise ShardifyError(f"split {unknown[0]!r} is not in this source (it has: {', '.join(source.splits())})")
    local = getattr(getattr(source, "loc", None), "local_path", None)
    if local is not None:
        src, out = Path(local).resolve(), out_dir.resolve()
        if out == src or src in out.parents:
            raise ShardifyError(f"--out {out_dir} lies inside --source {local}: a rerun would read the shards as "
                                "inputs; write them outside the source tree")


def run_job(source: Source, out_dir, splits: list[str], opts: JobOptions, log=None) -> dict | None:
    """Write this node's shards of `splits`; finalize when this is the only node.

    Returns the manifest when finalized, else None (run `shardify finalize` after all nodes).
    One run per node of `out_dir` at a time (outlock.py): another is refused with one line.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    check_options(source, Path(out_dir), splits, opts)
    cores = _usable_cores()
    if opts.workers > cores:  # more only adds memory and switching (each split forks at most one per shard)
        log(f"warning: --workers {opts.workers} is more than the {cores} CPU cores this process may use")
    with out_lock(Path(out_dir), opts.node_rank, opts.num_nodes, log):
        return _run_job(source, Path(out_dir), splits, opts, log)


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what a batch scheduler granted, not the machine's count
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _run_job(source: Source, out_dir: Path, splits: list[str], opts: JobOptions, log) -> dict | None:
    from shardify.manifest import finalize

    prepare_output(out_dir, source, opts, log)
    listing = source.listing_digest()  # the local files the shards are written from

    for split in splits:
        log(f"{source.dataset} {split}: listing inputs")
        plan = planning.plan_split(source, split, out_dir, opts, log)
        planning.remove_stale_shards(out_dir, split, plan.shards)
        mine = planning.node_shards(plan.shards, opts.num_nodes, opts.node_rank)
        if opts.num_nodes > 1:  # only this node's leftovers: the others may be writing theirs
            state.remove_temporaries(out_dir, [shard_name(split, i) for i in mine])
        todo = [i for i in mine if not planning.shard_done(out_dir, split, i, plan.key_digests[i], listing)]
        log(f"{source.dataset} {split}: {plan.inputs} inputs -> {plan.shards} shards; "
            f"this node writes {len(mine)} ({len(mine) - len(todo)} already complete)")
        _write_shards(source, out_dir, plan, todo, opts, listing)
        plan.discard()  # kept on a failure only until the rerun plans again
        state.write_json_atomic(
            state.node_path(out_dir, split, opts.node_rank, opts.num_nodes),
            {"split": split, "node_rank": opts.node_rank, "num_nodes": opts.num_nodes, "shards": mine},
        )
    if opts.num_nodes == 1:
        return finalize(out_dir)
    log(f"node {opts.node_rank} of {opts.num_nodes} done; run `shardify finalize {out_dir}` after all nodes")
    return None


def _write_shards(source: Source, out_dir: Path, plan: planning.SplitPlan, tasks: list[int], opts: JobOptions,
                  listing: str | None) -> None:
    split = plan.split
    total = sum(plan.shard_size(i) for i in tasks)
    bar = _Progress(total, opts.progress and total > 0, f"{split}")
    # Hashing in a helper thread only pays when a core is left over for it.
    hash_thread = opts.hash_thread if opts.hash_thread is not None else opts.workers < (os.cpu_count() or 1)
    try:
        if opts.workers == 1 or len(tasks) <= 1:
            report = (lambda msg: bar.update(*msg)) if bar.enabled else None
            _init_worker(source, str(out_dir), report, hash_thread, listing, plan)
            for index in tasks:
                write_shard(split, index, plan.shard_items(index))
            return
        # sources hold only picklable state; fork avoids re-imports
        q = mp.get_context("fork").Queue() if bar.enabled else None

        def drain() -> None:
            while q is not None:
                try:
                    bar.update(*q.get_nowait())
                except queue.Empty:
                    return

        # a task names its shard; the worker reads the shard's rows from the plan's files
        initargs = (source, str(out_dir), q.put if q else None, hash_thread, listing, plan)
        results = run_in_workers(_task, [(split, i) for i in tasks], opts.workers, initializer=_init_worker,
                                 initargs=initargs, poll=drain, what=f"writing {split} shards")
        drain()
        bar.finish(sum(r["bytes"] for r in results))
    finally:
        bar.close()
