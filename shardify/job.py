"""Run a sharding job: list, plan, write this node's shards in parallel, then finalize.

    inputs (source order) -> seeded order -> shard ranges -> this node's shards -> workers
    each worker: read payloads -> source.encode -> reproducible tar (temp name) -> stats -> rename

Resuming is free: finished shards (tar + stats present) are skipped, half-written ones are
deleted, and a rerun with different options is refused. Every input ends up either in a tar or
in the shard's reject list, so finalize can reconcile inputs = written + rejected.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from shardify import __version__
from shardify import plan as planning
from shardify import state
from shardify.records import Item, Reject, UserError
from shardify.sources.base import ListContext, Source
from shardify.tarwriter import ShardTarWriter
from shardify.workers import run_in_workers

SCHEMA_VERSION = 1
_PROGRESS_EVERY = 32  # samples between progress messages from a worker


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


def fingerprint(source: Source, opts: JobOptions) -> dict:
    """Everything that changes the output bytes, and the source's identity (its id, revision and,
    for a local source, its path); a rerun must match it to resume."""
    return {
        "schema_version": SCHEMA_VERSION,
        "dataset": source.dataset,
        "source": source.describe(),
        "source_options": source.options(),
        "seed": opts.seed,
        "samples_per_shard": opts.samples_per_shard,
    }


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


# Files a finished job writes next to its shards (besides the shards and their .idx files).
OUTPUT_FILES = ("manifest.json", "sizes.json", "rejects.jsonl", "_info.json")
_SHARD_FILE = re.compile(r"^[A-Za-z0-9_]+-\d{6}\.(tar|idx)$")


def _unlink_file(path: Path) -> None:
    """Delete a regular file we wrote; never a folder or anything else of the same name."""
    if path.is_file() and not path.is_symlink():
        path.unlink()


def _clear_output(out_dir: Path) -> None:
    """Delete what this job wrote, and nothing else: the shards its stats name, their .idx,
    its own output files and its work state. Other files (a user's backup.tar) stay."""
    import shutil

    from shardify.readers import reader_index_names

    splits = [state.read_json(p).get("split") for p in state.plan_paths(out_dir)]
    for name in state.written_shards(out_dir):
        _unlink_file(out_dir / name)
        _unlink_file(out_dir / (name[: -len(".tar")] + ".idx"))
    for name in OUTPUT_FILES + tuple(reader_index_names(s) for s in splits if s):
        _unlink_file(out_dir / name)
    state.remove_temporaries(out_dir)
    shutil.rmtree(state.state_dir(out_dir), ignore_errors=True)


def _clear_finished(out_dir: Path, manifest: dict) -> None:
    """Without work state, delete what a shardify manifest lists (its shards and their .idx)."""
    from shardify.readers import reader_index_names

    for info in manifest.get("splits", {}).values():
        for sh in info.get("shards", []):
            name = str(sh.get("name", ""))
            if _SHARD_FILE.match(name):
                _unlink_file(out_dir / name)
                _unlink_file(out_dir / (name[: -len(".tar")] + ".idx"))
    for name in OUTPUT_FILES + tuple(reader_index_names(s) for s in manifest.get("splits", {})):
        _unlink_file(out_dir / name)


def _orphans(out_dir: Path) -> list[str]:
    return sorted(p.name for p in out_dir.iterdir() if p.is_file() and _SHARD_FILE.match(p.name))


def prepare_output(out_dir: Path, source: Source, opts: JobOptions, log=print) -> None:
    """Create the directory, check the fingerprint, clean temporaries of an interrupted run.

    Refuses (changing nothing) a directory that holds a job with other options or another
    source, and one that holds shards without shardify's work state (a finished dataset whose
    .shardify/ was deleted): adding to it would leave its shards out of the new manifest.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    job_path = state.job_path(out_dir)
    fp = fingerprint(source, opts)
    listing = source.listing_digest()
    old_job = None
    if job_path.exists():
        old_job = state.read_json(job_path)
        old = old_job.get("fingerprint", {})
        if old != fp:
            if not opts.overwrite:
                diff = "; ".join(_differences(old, fp)) or "format version"
                raise UserError(
                    f"{out_dir} holds shards written with other options ({diff}); "
                    "rerun with the same options to resume, or add --overwrite to start over"
                )
            _clear_output(out_dir)
            old_job = None
    else:
        manifest = _read_manifest_or_none(out_dir)
        if manifest is not None or _orphans(out_dir):
            what = "a finished dataset (manifest.json)" if manifest is not None else "shard files"
            if not opts.overwrite:
                raise UserError(
                    f"{out_dir} holds {what} but no {state.STATE_DIR}/ work state (was it deleted?); "
                    "shards added now would leave the old ones out of the manifest: write to a new "
                    "--out, or add --overwrite to replace the finished dataset"
                )
            if manifest is not None:
                _clear_finished(out_dir, manifest)
            left = _orphans(out_dir)
            if left:
                raise UserError(
                    f"{out_dir} holds shard files no manifest or work state of shardify lists "
                    f"({', '.join(left[:5])}{' ...' if len(left) > 5 else ''}); shardify deletes only "
                    "what it wrote itself: move or delete them, or write to a new --out"
                )
    if old_job is not None and listing is not None and old_job.get("listing") not in (None, listing):
        # Same source path, other files: payloads staged from the old files must not be reused.
        # Shards that no longer hold their planned inputs are written again (see shard_done).
        import shutil

        log(f"{source.dataset}: the files under --source changed since the last run; listing them again")
        shutil.rmtree(state.stage_dir(out_dir), ignore_errors=True)
    if opts.num_nodes == 1:  # nobody else writes here: leftovers of an interrupted run can go
        state.remove_temporaries(out_dir)
    state.write_json_atomic(job_path, {
        "fingerprint": fp,
        "listing": listing,
        "tool": {"name": "shardify", "version": __version__},
        "source": source.describe(),
        "fields": list(source.fields),
        "extras": source.manifest_extras(),
    })


def _read_manifest_or_none(out_dir: Path) -> dict | None:
    path = out_dir / "manifest.json"
    if not path.is_file():
        return None
    try:
        doc = state.read_json(path)
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def plan_split(source: Source, split: str, out_dir: Path, opts: JobOptions, log) -> tuple[list, list, list]:
    """List a split, reject duplicate keys, and cut the seeded order into shards.

    Returns (items per shard, listing rejects, key digest per shard) and records the plan in the
    state directory. A key that another split of the directory already uses is refused.
    """
    stage_dir = state.stage_dir(out_dir, split)
    staged_before = stage_dir.exists()
    last = [0.0]

    def progress(desc: str, count: int) -> None:
        now = time.monotonic()
        if opts.progress and now - last[0] > 2.0:
            last[0] = now
            log(f"  listing {split}: {desc} ({count} inputs so far)")

    ctx = ListContext(stage_dir=stage_dir, workers=opts.workers, progress=progress, show_progress=opts.progress)
    items = source.list_items(split, ctx)
    seen: set[str] = set()
    unique: list[Item] = []
    listing_rejects = []
    for item in items:
        if item.key in seen:
            listing_rejects.append(_reject_record(split, item, Reject("duplicate_key", "key listed before"), None))
        else:
            seen.add(item.key)
            unique.append(item)
    del seen
    try:
        hashes = _check_keys_unique_across_splits(out_dir, split, unique)
    except UserError:
        if not staged_before:  # a refused command leaves nothing behind
            import shutil

            shutil.rmtree(stage_dir, ignore_errors=True)
        raise
    order = planning.seeded_order([it.key for it in unique], opts.seed)
    n_shards = planning.num_shards(len(unique), opts.samples_per_shard)
    bounds = planning.shard_bounds(len(unique), n_shards)
    per_shard = [[unique[j] for j in order[a:b]] for a, b in bounds]
    digests = [str(state.key_digest(it.key for it in shard)) for shard in per_shard]
    _save_key_hashes(state.keys_path(out_dir, split), hashes)
    state.write_json_atomic(state.plan_path(out_dir, split), {
        "split": split,
        "inputs": len(items),
        "shards": n_shards,
        "key_digests": digests,
        "listing_rejects": listing_rejects,
        "extras": source.split_extras(split, ctx),
    })
    return per_shard, listing_rejects, digests


def _check_keys_unique_across_splits(out_dir: Path, split: str, unique: list[Item]):
    """Keys are unique per dataset directory: refuse a split that reuses another split's key."""
    import numpy as np

    hashes = state.key_hashes(it.key for it in unique)
    for path in state.plan_paths(out_dir):
        other = state.read_json(path).get("split")
        keys_file = state.keys_path(out_dir, other) if other else None
        if other == split or keys_file is None or not keys_file.exists():
            continue
        common = np.intersect1d(hashes, np.load(keys_file, allow_pickle=False))
        if len(common):
            shared = set(int(x) for x in common)
            for it in unique:
                h = int(state.key_hashes([it.key])[0])
                if h in shared:
                    raise UserError(
                        f"the {split} input {it.origin} has the key {it.key!r}, which the split "
                        f"{other!r} in {out_dir} already uses; keys must be unique in a dataset "
                        f"directory: write {split} to another --out (or rename the file)"
                    )
    return hashes


def _save_key_hashes(path: Path, hashes) -> None:
    import numpy as np

    tmp = state.tmp_path(path)
    with open(tmp, "wb") as f:
        np.save(f, hashes, allow_pickle=False)
    os.replace(tmp, path)


def _reject_record(split: str, item: Item, rej: Reject, shard: str | None) -> dict:
    return {"split": split, "key": item.key, "source": item.origin, "reason": rej.reason,
            "detail": rej.detail, "shard": shard}


def _remove_stale_shards(out_dir: Path, split: str, n_shards: int) -> None:
    """Shards past the end of the plan are left from a run over a larger source: delete them
    (only those our stats say we wrote), so that nothing in the directory looks like part of
    the dataset without being in it."""
    prefix = f"{split}-"
    for name in state.written_shards(out_dir):
        index = name[len(prefix): -len(".tar")] if name.startswith(prefix) and name.endswith(".tar") else ""
        if index.isdigit() and len(index) == 6 and int(index) >= n_shards:
            stem = name[: -len(".tar")]
            _unlink_file(out_dir / name)
            _unlink_file(out_dir / f"{stem}.idx")
            state.stats_path(out_dir, stem).unlink(missing_ok=True)


def shard_done(out_dir: Path, split: str, index: int, key_digest: str) -> bool:
    """A shard is done when its tar, .idx and stats exist, it holds the planned inputs (a local
    source that changed between two runs changes the plan: such shards are written again) and
    its bytes are the ones its stats describe (a tar truncated or modified by something else
    is written again). The sha256 is recomputed only for a tar whose mtime changed."""
    name = planning.shard_name(split, index)
    tar, stats_path = out_dir / f"{name}.tar", state.stats_path(out_dir, name)
    if not (tar.is_file() and stats_path.exists() and (out_dir / f"{name}.idx").is_file()):
        return False
    st = state.read_json(stats_path)
    if st["key_digest"] != key_digest:
        return False
    info = tar.stat()
    if info.st_size != st["bytes"]:
        return False
    if st.get("mtime_ns") != info.st_mtime_ns:  # touched or copied since written: check the bytes
        if _sha256_file(tar) != st["sha256"]:
            return False
        st["mtime_ns"] = info.st_mtime_ns
        state.write_json_atomic(stats_path, st, indent=None)
    return True


def _sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- worker side
_WORKER: dict = {}


def _init_worker(source: Source, out_dir: str, progress_queue, hash_thread: bool) -> None:
    _WORKER.clear()
    _WORKER.update(source=source, out_dir=Path(out_dir), queue=progress_queue, readers={},
                   hash_thread=hash_thread)


def _reader(split: str):
    readers = _WORKER["readers"]
    if split not in readers:
        readers[split] = _WORKER["source"].open_reader(split)
    return readers[split]


def write_shard(split: str, index: int, items: list[Item]) -> dict:
    """Write one shard under a temporary name, then its stats, then rename it into place."""
    source: Source = _WORKER["source"]
    out_dir: Path = _WORKER["out_dir"]
    report = _WORKER["queue"]
    name = planning.shard_name(split, index)
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
                rejects.append(_reject_record(split, item, rej, name))
                pending_samples += 1
                continue
            before = writer.offset
            writer.write_sample(item.key, fields)
            pending_samples += 1
            pending_bytes += writer.offset - before
            if pending_samples >= _PROGRESS_EVERY:
                report((pending_samples, pending_bytes))
                pending_samples = pending_bytes = 0
        stats = writer.close()
    except BaseException:
        writer.abort()
        tar_tmp.unlink(missing_ok=True)
        raise
    report((pending_samples, pending_bytes))
    stats.update(
        name=f"{name}.tar",
        mtime_ns=os.stat(tar_tmp).st_mtime_ns,  # a rename keeps it: a later change shows
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
    return write_shard(*args)


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

    def update(self, samples: int, nbytes: int) -> None:
        self.bytes += nbytes
        if self.bar is not None:
            self.bar.update(samples)
            elapsed = max(time.monotonic() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{self.bytes / elapsed / 1e6:.1f} MB/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_job(source: Source, out_dir, splits: list[str], opts: JobOptions, log=None) -> dict | None:
    """Write this node's shards of `splits`; finalize when this is the only node.

    Returns the manifest when finalized, else None (run `shardify finalize` after all nodes).
    """
    from shardify.manifest import finalize

    log = log or (lambda msg: print(msg, file=sys.stderr))
    out_dir = Path(out_dir)
    if opts.workers < 1:
        raise UserError("--workers must be at least 1")
    if not 0 <= opts.node_rank < opts.num_nodes:
        raise UserError(f"--node-rank {opts.node_rank} is not in [0, {opts.num_nodes})")
    unknown = [s for s in splits if s not in source.splits()]
    if unknown:
        raise UserError(f"split {unknown[0]!r} is not in this source (it has: {', '.join(source.splits())})")
    prepare_output(out_dir, source, opts, log)

    for split in splits:
        log(f"{source.dataset} {split}: listing inputs")
        per_shard, listing_rejects, digests = plan_split(source, split, out_dir, opts, log)
        n_inputs = sum(len(s) for s in per_shard) + len(listing_rejects)
        _remove_stale_shards(out_dir, split, len(per_shard))
        mine = planning.node_shards(len(per_shard), opts.num_nodes, opts.node_rank)
        if opts.num_nodes > 1:  # only this node's leftovers: the others may be writing theirs
            state.remove_temporaries(out_dir, [planning.shard_name(split, i) for i in mine])
        todo = [i for i in mine if not shard_done(out_dir, split, i, digests[i])]
        log(f"{source.dataset} {split}: {n_inputs} inputs -> {len(per_shard)} shards; "
            f"this node writes {len(mine)} ({len(mine) - len(todo)} already complete)")
        _write_shards(source, out_dir, split, [(i, per_shard[i]) for i in todo], opts)
        state.write_json_atomic(
            state.node_path(out_dir, split, opts.node_rank, opts.num_nodes),
            {"split": split, "node_rank": opts.node_rank, "num_nodes": opts.num_nodes, "shards": mine},
        )
    if opts.num_nodes == 1:
        return finalize(out_dir)
    log(f"node {opts.node_rank} of {opts.num_nodes} done; run `shardify finalize {out_dir}` after all nodes")
    return None


def _write_shards(source: Source, out_dir: Path, split: str, tasks: list, opts: JobOptions) -> None:
    total = sum(len(items) for _, items in tasks)
    bar = _Progress(total, opts.progress and total > 0, f"{split}")
    # Hashing in a helper thread only pays when a core is left over for it.
    hash_thread = opts.hash_thread if opts.hash_thread is not None else opts.workers < (os.cpu_count() or 1)
    try:
        if opts.workers == 1 or len(tasks) <= 1:
            _init_worker(source, str(out_dir), lambda msg: bar.update(*msg), hash_thread)
            for index, items in tasks:
                write_shard(split, index, items)
            return
        q = mp.get_context("fork").Queue()  # sources hold only picklable state; fork avoids re-imports

        def drain() -> None:
            while True:
                try:
                    bar.update(*q.get_nowait())
                except queue.Empty:
                    return

        run_in_workers(_task, [(split, i, items) for i, items in tasks], opts.workers,
                       initializer=_init_worker, initargs=(source, str(out_dir), q.put, hash_thread),
                       poll=drain, what=f"writing {split} shards")
        time.sleep(0.05)  # let the workers' last progress messages arrive
        drain()
    finally:
        bar.close()
