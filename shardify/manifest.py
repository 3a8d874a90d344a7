"""manifest.json: merge the per-shard stats of all nodes into the dataset's single source of truth.

`finalize` runs at the end of a single-node job and as `shardify finalize DIR` after a
multi-node one. It refuses to write a manifest unless every planned shard is present exactly
once with the planned inputs (checked through per-shard key digests), and inputs = written +
rejected holds per shard, per split and in total. Then it writes rejects.jsonl, sizes.json, the
reader indexes (_info.json for timm, wids-<split>.json for wids) and, last and atomically,
manifest.json (validated against the contract in shardify/format.py). `write_manifest` is the one
way a manifest is written; `simple_manifest` writes one for shards that other code wrote
(benchmarks, tests).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from shardify import reader_indexes, state
from shardify.format import MANIFEST, SCHEMA_VERSION, ShardifyError, read_manifest, shard_name, validate_manifest


def finalize(out_dir) -> dict:
    out_dir = Path(out_dir)
    if not state.job_path(out_dir).exists():
        raise ShardifyError(f"{out_dir} holds no shardify job (no {state.STATE_DIR}/job.json)")
    job = state.read_json(state.job_path(out_dir))
    plans = state.plan_paths(out_dir)
    if not plans:
        raise ShardifyError(f"{out_dir}: no split has been planned yet; run the shardify command first")
    # rejects go straight to a temporary file (there may be millions): renamed into place only
    # when the manifest can be written, deleted otherwise
    rejects_tmp = state.tmp_path(out_dir / "rejects.jsonl")
    try:
        with open(rejects_tmp, "w", encoding="utf-8") as rejects:
            splits, sizes, problems = _collect(out_dir, plans, rejects)
    except BaseException:
        rejects_tmp.unlink(missing_ok=True)
        raise
    if problems:
        rejects_tmp.unlink(missing_ok=True)
        raise ShardifyError(f"cannot finalize {out_dir}: " + "; ".join(problems[:20])
                        + (f"; and {len(problems) - 20} more" if len(problems) > 20 else ""))
    totals = _sum(splits.values())
    manifest = {
        "schema_version": job["fingerprint"]["schema_version"],
        "tool": job["tool"],
        "dataset": job["fingerprint"]["dataset"],
        "source": job["source"],
        "options": {"seed": job["fingerprint"]["seed"],
                    "samples_per_shard": job["fingerprint"]["samples_per_shard"],
                    **job["fingerprint"]["source_options"]},
        "fields": job["fields"],
        **job["extras"],
        "splits": splits,
        "totals": totals,
    }
    os.replace(rejects_tmp, out_dir / "rejects.jsonl")
    state.remove_temporaries(out_dir)  # every node is done: leftovers of crashed runs can go
    state.write_json_atomic(out_dir / "sizes.json", dict(sorted(sizes.items())))
    state.write_json_atomic(out_dir / "_info.json", reader_indexes.timm_info(manifest))
    for split in splits:
        state.write_json_atomic(out_dir / reader_indexes.wids_index_name(split),
                                reader_indexes.wids_index(manifest, split))
    write_manifest(out_dir, manifest)  # last: its presence means "complete"
    return manifest


def _collect(out_dir: Path, plans: list[Path], rejects) -> tuple[dict, dict, list[str]]:
    """Check every split's shards against its plan; write every reject as a line to `rejects`.
    Returns (split sections, shard sizes, problems)."""
    problems: list[str] = []
    splits: dict = {}
    sizes: dict = {}
    for plan_path in plans:
        plan = state.read_json(plan_path)
        split = plan["split"]
        n_nodes = _node_count(out_dir, split)
        shards = []
        rejects.writelines(json.dumps(r) + "\n" for r in plan["listing_rejects"])
        for i in range(plan["shards"]):
            name = shard_name(split, i)
            stats_path = state.stats_path(out_dir, name)
            tar_path = out_dir / f"{name}.tar"
            if not stats_path.exists() or not tar_path.exists():
                who = f"node {i % n_nodes} of {n_nodes}" if n_nodes else "no node"
                problems.append(f"{name}.tar is missing ({who} has not finished it)")
                continue
            st = state.read_json(stats_path)
            if os.path.getsize(tar_path) != st["bytes"]:
                who = f" (node {i % n_nodes} of {n_nodes})" if n_nodes and n_nodes > 1 else ""
                problems.append(f"{name}.tar has {os.path.getsize(tar_path)} bytes, its stats say {st['bytes']}: "
                                f"something changed it; rerun the shardify command{who} to write it again")
            if st["key_digest"] != plan["key_digests"][i]:
                problems.append(f"{name}.tar does not hold the planned inputs (written with another plan?)")
            if st["samples"] + st["rejected"] != st["inputs"]:
                problems.append(f"{name}.tar: {st['inputs']} inputs != {st['samples']} written + "
                                f"{st['rejected']} rejected")
            rejects.writelines(json.dumps(r) + "\n" for r in st["rejects"])
            sizes[st["name"]] = st["samples"]
            shards.append({k: st[k] for k in ("name", "samples", "inputs", "rejected", "bytes",
                                               "sha256", "first_key", "last_key")})
        summary = _sum(shards)
        summary["inputs"] += len(plan["listing_rejects"])
        summary["rejected"] += len(plan["listing_rejects"])
        if summary["inputs"] != plan["inputs"] and not problems:
            problems.append(f"{split}: {summary['inputs']} inputs accounted for, {plan['inputs']} listed")
        splits[split] = {**summary, **plan.get("extras", {}), "shards": shards}
    return splits, sizes, problems


def _sum(parts) -> dict:
    keys = ("samples", "inputs", "rejected", "bytes")
    return {k: sum(p[k] for p in parts) for k in keys}


def _node_count(out_dir: Path, split: str) -> int | None:
    """The node count the split was run with, from the nodes' partial records."""
    counts = {state.read_json(p)["num_nodes"] for p in state.node_paths(out_dir, split)}
    return max(counts) if counts else None


def simple_manifest(out_dir, dataset: str, fields: list[str], splits: dict[str, list[dict]], **extra) -> dict:
    """A valid manifest for shards written by other code (benchmarks, tests): each shard given as
    {"name", "samples"} and optionally "first_key"/"last_key"; sizes are read from the files, no
    rejects, no checksums. Written to out_dir/manifest.json and returned."""
    doc_splits = {}
    for split, shards in splits.items():
        full = [{"inputs": sh["samples"], "rejected": 0, "sha256": "", "first_key": None, "last_key": None,
                 "bytes": os.path.getsize(os.path.join(os.fspath(out_dir), sh["name"])), **sh} for sh in shards]
        doc_splits[split] = {**_sum(full), "shards": full}
    doc = {"schema_version": SCHEMA_VERSION, "dataset": dataset, "fields": list(fields), **extra,
           "splits": doc_splits, "totals": _sum(list(doc_splits.values()))}
    write_manifest(out_dir, doc)
    return doc


def write_manifest(out_dir, manifest: dict) -> None:
    """Validate and write `manifest.json` atomically (temporary name, then rename)."""
    validate_manifest(manifest, os.path.join(os.fspath(out_dir), MANIFEST))
    state.write_json_atomic(Path(out_dir) / MANIFEST, manifest)


def load_manifest(path) -> tuple[dict, Path]:
    """Read and validate a manifest given the file or its directory; return (manifest, directory)."""
    manifest, root = read_manifest(path)
    return manifest, Path(root)
