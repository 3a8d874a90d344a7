"""The output directory of a job: may this run write here, and what may it delete?

- `fingerprint`: every option that changes the output bytes, and the source's identity (hub id
  and revision, or the local path). A rerun with another fingerprint is refused with the
  difference, changing nothing, unless --overwrite.
- `--overwrite` deletes only what shardify wrote: the shards its stats name, their .idx, its
  output files and its work state; never a user's file or folder that happens to sit in --out.
- A directory that holds shards but no work state (`.shardify/` deleted) is not extended: its
  manifest would leave the old shards out. --overwrite replaces it, deleting what its manifest
  lists, and refuses (before deleting anything) when other shard-named files remain.
- When the files of a local source changed (listing digest), staged payloads are dropped.
"""

from __future__ import annotations

from pathlib import Path

from shardify import __version__, state
from shardify.format import SCHEMA_VERSION, SHARD_FILE_RE, ShardifyError
from shardify.sources.base import Source


def fingerprint(source: Source, opts) -> dict:
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
_SHARD_FILE = SHARD_FILE_RE


def _clear_output(out_dir: Path) -> None:
    """Delete what this job wrote, and nothing else: the shards its stats name, their .idx,
    its own output files and its work state. Other files (a user's backup.tar) stay."""
    import shutil

    from shardify.reader_indexes import reader_index_names

    splits = [state.read_json(p).get("split") for p in state.plan_paths(out_dir)]
    for name in state.written_shards(out_dir):
        state.unlink_file(out_dir / name)
        state.unlink_file(out_dir / (name[: -len(".tar")] + ".idx"))
    for name in OUTPUT_FILES + tuple(reader_index_names(s) for s in splits if s):
        state.unlink_file(out_dir / name)
    state.remove_temporaries(out_dir)
    locks = state.lock_path(out_dir, 0).parent  # held by this run (and its peers): kept
    for path in state.state_dir(out_dir).iterdir():
        if not path.is_dir() or path.is_symlink():
            path.unlink(missing_ok=True)
        elif path != locks:
            shutil.rmtree(path, ignore_errors=True)


def _listed_files(manifest: dict) -> set[str]:
    """The shard and .idx names a manifest lists (tolerant: the manifest may be damaged)."""
    names = set()
    splits = manifest.get("splits") if isinstance(manifest.get("splits"), dict) else {}
    for info in splits.values():
        for sh in (info.get("shards") or []) if isinstance(info, dict) else []:
            name = str(sh.get("name", "")) if isinstance(sh, dict) else ""
            if _SHARD_FILE.match(name) and name.endswith(".tar"):
                names |= {name, name[: -len(".tar")] + ".idx"}
    return names


def _clear_finished(out_dir: Path, manifest: dict) -> None:
    """Without work state, delete what a shardify manifest lists (its shards and their .idx)."""
    from shardify.reader_indexes import reader_index_names

    for name in _listed_files(manifest):
        state.unlink_file(out_dir / name)
    splits = manifest.get("splits") if isinstance(manifest.get("splits"), dict) else {}
    for name in OUTPUT_FILES + tuple(reader_index_names(s) for s in splits):
        state.unlink_file(out_dir / name)


def _orphans(out_dir: Path) -> list[str]:
    return sorted(p.name for p in out_dir.iterdir() if p.is_file() and _SHARD_FILE.match(p.name))


def prepare_output(out_dir: Path, source: Source, opts, log=print) -> None:
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
                raise ShardifyError(
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
                raise ShardifyError(
                    f"{out_dir} holds {what} but no {state.STATE_DIR}/ work state (was it deleted?); "
                    "shards added now would leave the old ones out of the manifest: write to a new "
                    "--out, or add --overwrite to replace the finished dataset"
                )
            if manifest is not None and (manifest.get("tool") or {}).get("name") != "shardify":
                raise ShardifyError(f"{out_dir}/manifest.json was not written by shardify; shardify deletes "
                                    "only what it wrote itself: move it, or write to a new --out")
            listed = _listed_files(manifest or {})
            left = [name for name in _orphans(out_dir) if name not in listed]
            if left:  # refuse before deleting anything: a refused command changes nothing
                raise ShardifyError(
                    f"{out_dir} holds shard files no manifest or work state of shardify lists "
                    f"({', '.join(left[:5])}{' ...' if len(left) > 5 else ''}); shardify deletes only "
                    "what it wrote itself: move or delete them, or write to a new --out"
                )
            if manifest is not None:
                _clear_finished(out_dir, manifest)
    if old_job is not None and listing is not None and old_job.get("listing") not in (None, listing):
        # Same source path, other files: payloads staged from the old files must not be reused.
        # Shards that no longer hold their planned inputs are written again (see shard_done).
        import shutil

        log(f"{source.dataset}: the files under --source changed since the last run: listing them again "
            "and writing again every shard written from the old files")
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
