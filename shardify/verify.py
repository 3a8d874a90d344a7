"""`shardify verify`: prove a shard directory matches its manifest and the shard contract.

Checks: every shard's size and sha256; tar structure (ustar members, fixed metadata, members of
a sample adjacent, valid unique keys, the manifest's counts and first/last keys); the .idx
files and sizes.json; rejects.jsonl against the counts; inputs = written + rejected; and it
decodes a deterministic sample of images (all of them with --full), checking each `jpg` is a
JPEG the GPU decoder accepts, plus `cls`, `json`, `txt` and `npy` members.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
from pathlib import Path

from shardify.images import _reencode_reason, parse_jpeg_header
from shardify.manifest import load_manifest
from shardify.records import KEY_RE, Reject

_CHUNK = 1 << 20


def verify(out_dir, full: bool = False, sample_per_shard: int = 4, progress: bool = False) -> list[str]:
    """Return the list of problems found (empty: the directory is good)."""
    manifest, root = load_manifest(out_dir)
    problems: list[str] = []
    seen_keys: set[str] = set()
    n_classes = len(manifest.get("classes") or []) or None
    shards = [(split, sh) for split, info in manifest["splits"].items() for sh in info["shards"]]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(sh["bytes"] for _, sh in shards), unit="B", unit_scale=True,
                   desc="verify", file=sys.stderr)
    for split, sh in shards:
        problems += _verify_shard(root, sh, seen_keys, full, sample_per_shard, n_classes, bar)
    if bar is not None:
        bar.close()
    problems += _verify_totals(manifest, root)
    return problems


def _verify_totals(manifest: dict, root: Path) -> list[str]:
    problems = []
    for split, info in manifest["splits"].items():
        parts = info["shards"]
        for k in ("samples", "bytes"):
            if sum(sh[k] for sh in parts) != info[k]:
                problems.append(f"{split}: the shards' {k} do not add up to the split's {k}")
        if info["inputs"] != info["samples"] + info["rejected"]:
            problems.append(f"{split}: inputs {info['inputs']} != written {info['samples']} + rejected {info['rejected']}")
    totals = manifest["totals"]
    if totals["inputs"] != totals["samples"] + totals["rejected"]:
        problems.append("totals: inputs != written + rejected")
    sizes_path = root / "sizes.json"
    if not sizes_path.exists():
        problems.append("sizes.json is missing")
    else:
        sizes = json.loads(sizes_path.read_text())
        want = {sh["name"]: sh["samples"] for info in manifest["splits"].values() for sh in info["shards"]}
        if sizes != want:
            problems.append("sizes.json does not match the manifest")
    rejects_path = root / "rejects.jsonl"
    n_rejects = 0
    if rejects_path.exists():
        with open(rejects_path, encoding="utf-8") as f:
            n_rejects = sum(1 for line in f if line.strip())
    if n_rejects != totals["rejected"]:
        problems.append(f"rejects.jsonl lists {n_rejects} inputs, the manifest counts {totals['rejected']}")
    return problems


def _verify_shard(root: Path, sh: dict, seen_keys: set, full: bool, sample_per_shard: int,
                  n_classes: int | None, bar) -> list[str]:
    name = sh["name"]
    path = root / name
    if not path.exists():
        return [f"{name}: missing"]
    problems = []
    size = os.path.getsize(path)
    if size != sh["bytes"]:
        problems.append(f"{name}: {size} bytes, manifest says {sh['bytes']}")
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    if sha.hexdigest() != sh["sha256"]:
        problems.append(f"{name}: sha256 mismatch (corrupted or modified)")
    keys: list[str] = []
    members: list[tuple[str, int, int]] = []  # (name, data offset, size)
    done_keys: set[str] = set()
    try:
        with tarfile.open(path, mode="r:") as tar:
            for m in tar:
                members.append((m.name, m.offset_data, m.size))
                if not m.isfile() or m.mtime != 0 or m.uid != 0 or m.gid != 0 or m.mode != 0o644:
                    problems.append(f"{name}: member {m.name} has non-canonical metadata")
                key, dot, ext = m.name.partition(".")
                if not dot or not KEY_RE.match(key) or "/" in m.name:
                    problems.append(f"{name}: bad member name {m.name!r}")
                    continue
                if not keys or keys[-1] != key:
                    if key in done_keys or key in seen_keys:
                        problems.append(f"{name}: key {key} appears twice (or its members are not adjacent)")
                    done_keys.add(key)
                    seen_keys.add(key)
                    keys.append(key)
                want_decode = full or _sampled(len(keys) - 1, sh["samples"], sample_per_shard)
                if want_decode:
                    problem = _check_member(ext, tar.extractfile(m).read(), n_classes)
                    if problem:
                        problems.append(f"{name}: {m.name}: {problem}")
    except tarfile.TarError as exc:
        return problems + [f"{name}: not a readable tar ({exc})"]
    if len(keys) != sh["samples"]:
        problems.append(f"{name}: {len(keys)} samples, manifest says {sh['samples']}")
    if keys and (keys[0] != sh["first_key"] or keys[-1] != sh["last_key"]):
        problems.append(f"{name}: first/last key differ from the manifest")
    problems += _verify_idx(root, name, members, len(keys))
    return problems


def _sampled(i: int, n: int, k: int) -> bool:
    """Decode about k evenly spread samples per shard (always the first)."""
    return k > 0 and i % max(1, n // k) == 0


def _check_member(ext: str, data: bytes, n_classes: int | None) -> str | None:
    try:
        if ext == "jpg":
            header = parse_jpeg_header(data)
            reason = _reencode_reason(header)
            if reason:
                return f"JPEG the GPU decoder cannot read ({reason})"
            from PIL import Image

            with Image.open(io.BytesIO(data)) as img:
                img.load()
        elif ext == "cls":
            value = int(data.decode("ascii").strip())
            if n_classes is not None and not 0 <= value < n_classes:
                return f"class {value} outside 0..{n_classes - 1}"
        elif ext == "json":
            if not isinstance(json.loads(data.decode("utf-8")), dict):
                return "json is not an object"
        elif ext == "txt":
            data.decode("utf-8")
        elif ext == "npy":
            import numpy as np

            np.load(io.BytesIO(data), allow_pickle=False)
    except Reject as rej:
        return f"{rej.reason}: {rej.detail}"
    except Exception as exc:  # any decode failure is a finding, not a crash
        return f"cannot decode ({type(exc).__name__}: {exc})"
    return None


def _verify_idx(root: Path, name: str, members: list, n_samples: int) -> list[str]:
    idx_path = root / (name[: -len(".tar")] + ".idx")
    if not idx_path.exists():
        return [f"{idx_path.name}: missing"]
    lines = idx_path.read_text().splitlines()
    if not lines or lines[0] != f"v1.2 {n_samples}":
        return [f"{idx_path.name}: bad header {lines[0] if lines else ''!r}"]
    listed = []
    for line in lines[1:]:
        fields = line.split(" ")
        for j in range(0, len(fields), 4):
            ext, off, size, member = fields[j : j + 4]
            listed.append((member, int(off), int(size)))
    if listed != members:
        return [f"{idx_path.name}: offsets/sizes do not match {name}"]
    return []
