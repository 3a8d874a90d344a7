"""`shardify verify`: prove a shard directory matches its manifest and the shard contract.

Checks everything the manifest claims: its structure (shardify/format.py); every shard's size
and sha256; tar structure (ustar members, fixed metadata, members of a sample adjacent, valid
unique keys, extensions among the manifest's fields, the counts and first/last keys); shard
names and equal shares; every count against the others (per shard, split and in total, with
inputs = written + rejected); rejects.jsonl per shard and split; the .idx files, sizes.json,
_info.json and the wids indexes; no shard file in the directory that the manifest omits; and it
decodes a deterministic sample of images (all of them with --full), checking each `jpg` is a
JPEG the GPU decoder accepts, plus `cls`, `json`, `txt` and `npy` members. The manifest's
`classes` list must name what every sample says: a sample with a `cls` and a `synset` in its
json needs `classes[cls] == synset` (a reordered list would make labels name the wrong classes).
"""

from __future__ import annotations

import collections
import io
import json
import os
import sys
import tarfile
from pathlib import Path

from shardify import reader_indexes
from shardify.checksum import sha256_file
from shardify.format import SHARD_FILE_RE, ShardifyError, is_valid_key, parse_idx, shard_name
from shardify.jpeg import JpegError, gpu_unreadable_reason, parse_jpeg_header
from shardify.manifest import load_manifest


def verify(out_dir, full: bool = False, sample_per_shard: int = 4, progress: bool = False) -> list[str]:
    """Return the list of problems found (empty: the directory is good)."""
    try:
        manifest, root = load_manifest(out_dir)
    except ShardifyError as exc:  # missing, not JSON, not the documented structure
        return [str(exc)]
    problems: list[str] = []
    seen_keys: set[str] = set()
    n_classes = len(manifest.get("classes") or []) or None
    fields = set(manifest["fields"])
    shards = [(split, sh) for split, info in manifest["splits"].items() for sh in info["shards"]]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(sh["bytes"] for _, sh in shards), unit="B", unit_scale=True,
                   desc="verify", file=sys.stderr)
    classes = _ClassCheck(manifest.get("classes"))
    for _split, sh in shards:
        problems += _verify_shard(root, sh, seen_keys, full, sample_per_shard, n_classes, fields, bar, classes)
    if bar is not None:
        bar.close()
    problems += classes.problems()
    problems += _verify_counts(manifest)
    problems += _verify_files(manifest, root)
    return problems


_COUNTS = ("samples", "inputs", "rejected", "bytes")
_SHARD_FILE = SHARD_FILE_RE


def _verify_counts(manifest: dict) -> list[str]:
    """Every number the manifest states agrees with the others: per shard, per split, in total."""
    problems = []
    names: set[str] = set()
    for split, info in manifest["splits"].items():
        parts = info["shards"]
        for i, sh in enumerate(parts):
            name = sh["name"]
            if name != f"{shard_name(split, i)}.tar":
                problems.append(f"{split}: shard {i} is named {name}, expected {shard_name(split, i)}.tar")
            if name in names:
                problems.append(f"{name} is listed twice")
            names.add(name)
            if sh["inputs"] != sh["samples"] + sh["rejected"]:
                problems.append(f"{name}: inputs {sh['inputs']} != written {sh['samples']} + rejected {sh['rejected']}")
            if sh["samples"] == 0 and (sh["first_key"] is not None or sh["last_key"] is not None):
                problems.append(f"{name}: first/last key given for a shard without samples")
        if parts and max(sh["inputs"] for sh in parts) - min(sh["inputs"] for sh in parts) > 1:
            problems.append(f"{split}: shard inputs differ by more than one (the plan gives equal shares)")
        for k in ("samples", "bytes"):
            if sum(sh[k] for sh in parts) != info[k]:
                problems.append(f"{split}: the shards' {k} do not add up to the split's {k}")
        listing = info["inputs"] - sum(sh["inputs"] for sh in parts)  # rejected while listing
        if listing < 0 or info["rejected"] - sum(sh["rejected"] for sh in parts) != listing:
            problems.append(f"{split}: the shards' inputs and rejects do not add up to the split's")
        if info["inputs"] != info["samples"] + info["rejected"]:
            problems.append(f"{split}: inputs {info['inputs']} != written {info['samples']} + "
                            f"rejected {info['rejected']}")
    totals = manifest["totals"]
    for k in _COUNTS:
        if totals[k] != sum(info[k] for info in manifest["splits"].values()):
            problems.append(f"totals: {k} {totals[k]} is not the sum of the splits'")
    if totals["inputs"] != totals["samples"] + totals["rejected"]:
        problems.append("totals: inputs != written + rejected")
    return problems


def _read_json_file(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return exc


def _verify_files(manifest: dict, root: Path) -> list[str]:
    """The files next to the manifest: reader indexes, rejects.jsonl, and no unlisted shards."""
    problems = []
    want_sizes = {sh["name"]: sh["samples"] for info in manifest["splits"].values() for sh in info["shards"]}
    expected = {"sizes.json": dict(sorted(want_sizes.items())), "_info.json": reader_indexes.timm_info(manifest)}
    for split in manifest["splits"]:
        expected[reader_indexes.wids_index_name(split)] = reader_indexes.wids_index(manifest, split)
    for name, want in expected.items():
        path = root / name
        if not path.exists():
            problems.append(f"{name} is missing")
        elif _read_json_file(path) != want:
            problems.append(f"{name} does not match the manifest")
    listed = set(want_sizes) | {n[: -len(".tar")] + ".idx" for n in want_sizes}
    for path in sorted(root.iterdir()):
        if path.is_file() and _SHARD_FILE.match(path.name) and path.name not in listed:
            problems.append(f"{path.name} is in the directory but not in the manifest")
    problems += _verify_rejects(manifest, root)
    return problems


def _verify_rejects(manifest: dict, root: Path) -> list[str]:
    rejects_path = root / "rejects.jsonl"
    per_split: collections.Counter = collections.Counter()
    per_shard: collections.Counter = collections.Counter()
    n_rejects = 0
    problems = []
    if rejects_path.exists():
        with open(rejects_path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                n_rejects += 1
                try:
                    r = json.loads(line)
                    per_split[r["split"]] += 1
                    per_shard[r["shard"]] += 1
                    r["reason"], r["key"]
                except (ValueError, KeyError, TypeError):
                    problems.append(f"rejects.jsonl: line {n} is not a reject record")
    totals = manifest["totals"]
    if n_rejects != totals["rejected"]:
        problems.append(f"rejects.jsonl lists {n_rejects} inputs, the manifest counts {totals['rejected']}")
    for split, info in manifest["splits"].items():
        if per_split[split] != info["rejected"]:
            problems.append(f"rejects.jsonl lists {per_split[split]} {split} inputs, "
                            f"the manifest counts {info['rejected']}")
        for sh in info["shards"]:
            stem = sh["name"][: -len(".tar")]  # a reject's "shard" is the shard's name without .tar
            if per_shard[stem] != sh["rejected"]:
                problems.append(f"rejects.jsonl lists {per_shard[stem]} rejects of {sh['name']}, "
                                f"the manifest counts {sh['rejected']}")
    return problems


def _verify_shard(root: Path, sh: dict, seen_keys: set, full: bool, sample_per_shard: int,
                  n_classes: int | None, fields: set, bar, classes: _ClassCheck) -> list[str]:
    name = sh["name"]
    path = root / name
    if not path.exists():
        return [f"{name}: missing"]
    problems = []
    size = os.path.getsize(path)
    if size != sh["bytes"]:
        problems.append(f"{name}: {size} bytes, manifest says {sh['bytes']}")
    if sha256_file(path, bar.update if bar is not None else None) != sh["sha256"]:
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
                if not dot or not is_valid_key(key) or "/" in m.name:
                    problems.append(f"{name}: bad member name {m.name!r}")
                    continue
                if ext not in fields:
                    problems.append(f"{name}: member {m.name} has an extension the manifest's fields do not list")
                if not keys or keys[-1] != key:
                    if key in done_keys or key in seen_keys:
                        problems.append(f"{name}: key {key} appears twice (or its members are not adjacent)")
                    done_keys.add(key)
                    seen_keys.add(key)
                    keys.append(key)
                want_decode = full or _sampled(len(keys) - 1, sh["samples"], sample_per_shard)
                data = tar.extractfile(m).read() if want_decode or classes.wants(ext) else None
                if want_decode:
                    problem = _check_member(ext, data, n_classes)
                    if problem:
                        problems.append(f"{name}: {m.name}: {problem}")
                if classes.wants(ext):
                    classes.add(key, ext, data)
    except tarfile.TarError as exc:
        return problems + [f"{name}: not a readable tar ({exc})"]
    if len(keys) != sh["samples"]:
        problems.append(f"{name}: {len(keys)} samples, manifest says {sh['samples']}")
    if keys and (keys[0] != sh["first_key"] or keys[-1] != sh["last_key"]):
        problems.append(f"{name}: first/last key differ from the manifest")
    problems += _verify_idx(root, name, members, len(keys))
    return problems


class _ClassCheck:
    """Does the manifest's `classes` list name what the samples say? Fed every sample's `cls`
    and `json` members; a sample with both a label and a synset must have
    classes[label] == synset. Reports one line for the whole directory."""

    def __init__(self, classes):
        self.classes = classes if isinstance(classes, list) else None
        self.key = self.label = self.synset = None
        self.wrong = 0
        self.first: tuple | None = None

    def wants(self, ext: str) -> bool:
        return self.classes is not None and ext in ("cls", "json")

    def add(self, key: str, ext: str, data: bytes) -> None:
        if key != self.key:
            self._settle()
            self.key, self.label, self.synset = key, None, None
        try:
            if ext == "cls":
                self.label = int(data.decode("ascii").strip())
            else:
                synset = json.loads(data.decode("utf-8")).get("synset")
                self.synset = synset if isinstance(synset, str) and synset else None
        except (ValueError, UnicodeDecodeError, AttributeError):
            pass  # a member that does not decode is reported where it is decoded

    def _settle(self) -> None:
        """Judge the sample whose members were just fed."""
        if self.label is None or self.synset is None:
            return
        named = self.classes[self.label] if 0 <= self.label < len(self.classes) else None
        if named != self.synset:
            self.wrong += 1
            self.first = self.first or (self.key, self.label, self.synset, named)
        self.label = self.synset = None

    def problems(self) -> list[str]:
        self._settle()
        if self.first is None:
            return []
        key, label, synset, named = self.first
        return [f"the manifest's classes do not match the samples: {self.wrong} sample(s) carry a synset that "
                f"is not classes[cls] (e.g. {key}: cls {label}, synset {synset}, classes[{label}] = {named}); "
                "was the classes list reordered or edited?"]


def _sampled(i: int, n: int, k: int) -> bool:
    """Decode about k evenly spread samples per shard (always the first)."""
    return k > 0 and i % max(1, n // k) == 0


def _check_member(ext: str, data: bytes, n_classes: int | None) -> str | None:
    try:
        if ext == "jpg":
            header = parse_jpeg_header(data)
            reason = gpu_unreadable_reason(header)
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
    except JpegError as rej:
        return f"{rej.reason}: {rej.detail}"
    except Exception as exc:  # any decode failure is a finding, not a crash
        return f"cannot decode ({type(exc).__name__}: {exc})"
    return None


def _verify_idx(root: Path, name: str, members: list, n_samples: int) -> list[str]:
    idx_path = root / (name[: -len(".tar")] + ".idx")
    if not idx_path.exists():
        return [f"{idx_path.name}: missing"]
    try:
        samples = parse_idx(idx_path.read_text(encoding="utf-8"), idx_path.name)
    except (ShardifyError, UnicodeDecodeError) as exc:
        return [str(exc)]
    if len(samples) != n_samples:
        return [f"{idx_path.name}: lists {len(samples)} samples, {name} holds {n_samples}"]
    if [m for sample in samples for m in sample] != members:
        return [f"{idx_path.name}: offsets/sizes do not match {name}"]
    return []
