"""The shard contract of docs/format.md, in code: what every reader of shards relies on.

Both sides import this module (shardify to write and verify, the trainer to read), so the
contract is coded once:
- one error type, `ShardifyError` (a ValueError: a file or a value breaks the contract, or the
  user asked for something that cannot be done);
- sample keys: `[A-Za-z0-9_-]+`, at most 90 characters (`make_key`, `is_valid_key`), and shard
  names (`shard_name`, `SHARD_FILE_RE`);
- manifest.json: `read_manifest` (file, directory or URL), `validate_manifest`;
- the DALI-style `.idx`: `idx_line`, `idx_text`, `parse_idx`.
The rest of the contract has its own modules, which both sides import too: `jpg` members in
shardify/jpeg.py, token ids and the tokenizer in shardify/tokenization.py, the text cleaning in
shardify/text.py; writing a manifest is shardify/manifest.py's.
It imports nothing heavy: the standard library only (fsspec only for a remote manifest).
"""

from __future__ import annotations

import hashlib
import json
import os
import re

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class ShardifyError(ValueError):
    """The one error type: a file or value that breaks the contract, or a user mistake.
    Command lines print it as one line (exit 2), never as a traceback."""


# ----------------------------------------------------------------------------- keys
KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")
MAX_KEY_LEN = 90  # key + "." + extension must fit the 100-byte ustar name field
# A shard or its index: `{split}-{NNNNNN}.tar` / `.idx` (what shardify may have written in --out).
SHARD_FILE_RE = re.compile(r"^[A-Za-z0-9_]+-\d{6}\.(tar|idx)$")


def is_valid_key(key: str) -> bool:
    return bool(KEY_RE.match(key)) and len(key) <= MAX_KEY_LEN


def make_key(text: str) -> str:
    """Turn a file stem or id into a valid sample key (no dots, only [A-Za-z0-9_-], <= 90 chars).

    Over-long keys keep their first 73 characters and get a hash of the whole text, so they
    stay unique and still say where the sample came from.
    """
    key = _BAD_KEY_CHARS.sub("_", text)
    if not key:
        raise ValueError(f"cannot make a sample key from {text!r}")
    if len(key) > MAX_KEY_LEN:
        key = key[:73] + "_" + hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
    return key


def shard_name(split: str, index: int) -> str:
    """`{split}-{NNNNNN}` (add `.tar` / `.idx`)."""
    return f"{split}-{index:06d}"


# ----------------------------------------------------------------------------- manifest
_COUNTS = ("samples", "inputs", "rejected", "bytes")


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def manifest_path(path) -> str:
    """The manifest file for a path that names it or its directory (local or URL)."""
    path = os.fspath(path)
    if path.endswith(".json"):
        return path
    if _is_url(path):
        return path.rstrip("/") + "/" + MANIFEST
    return os.path.join(path.removeprefix("file://"), MANIFEST)


def read_manifest(path) -> tuple[dict, str]:
    """Read and validate a manifest given the file, its directory or a URL; return
    (manifest, directory). Raises ShardifyError naming the file on any problem."""
    where = manifest_path(path)
    try:
        if _is_url(where):
            import fsspec  # only for remote manifests

            with fsspec.open(where, "rt", encoding="utf-8") as f:
                text = f.read()
        else:
            with open(where, encoding="utf-8") as f:
                text = f.read()
    except FileNotFoundError:
        raise ShardifyError(f"{where}: no manifest.json (is the job finished? run `shardify finalize`)") from None
    except Exception as exc:  # OSError, fsspec's own errors, undecodable bytes
        raise ShardifyError(f"cannot read {where}: {type(exc).__name__}: {exc}") from None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ShardifyError(f"{where} is not valid JSON: {exc}") from None
    validate_manifest(doc, where)
    base = where.rsplit("/", 1)[0] if _is_url(where) else os.path.dirname(os.path.abspath(where))
    return doc, base


def _need(obj, key: str, kind, where: str, what: str):
    if not isinstance(obj, dict) or key not in obj:
        raise ShardifyError(f"{where}: {what} has no {key!r}")
    value = obj[key]
    if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ShardifyError(f"{where}: {what}.{key} must be a non-negative integer, not {value!r}")
    if kind is not int and not isinstance(value, kind):
        raise ShardifyError(f"{where}: {what}.{key} must be {getattr(kind, '__name__', kind)}, not {value!r}")
    return value


def validate_manifest(doc, where: str = MANIFEST) -> None:
    """Check the structure docs/format.md describes (not the shards: `shardify verify` does).

    Raises ShardifyError with the first problem, naming the dotted key."""
    if not isinstance(doc, dict):
        raise ShardifyError(f"{where}: a manifest is a JSON object, not {type(doc).__name__}")
    version = _need(doc, "schema_version", int, where, "the manifest")
    if version != SCHEMA_VERSION:
        raise ShardifyError(f"{where}: schema_version {version} is not one this version reads ({SCHEMA_VERSION})")
    _need(doc, "dataset", str, where, "the manifest")
    fields = _need(doc, "fields", list, where, "the manifest")
    if not all(isinstance(f, str) for f in fields):
        raise ShardifyError(f"{where}: fields must be a list of extensions")
    splits = _need(doc, "splits", dict, where, "the manifest")
    for split, info in splits.items():
        what = f"splits.{split}"
        if not isinstance(info, dict):
            raise ShardifyError(f"{where}: {what} must be an object")
        for k in _COUNTS:
            _need(info, k, int, where, what)
        shards = _need(info, "shards", list, where, what)
        for i, sh in enumerate(shards):
            sw = f"{what}.shards[{i}]"
            if not isinstance(sh, dict):
                raise ShardifyError(f"{where}: {sw} must be an object")
            name = _need(sh, "name", str, where, sw)
            if "/" in name or "\\" in name or not name.endswith(".tar") or name.startswith("."):
                raise ShardifyError(f"{where}: {sw}.name {name!r} must be a .tar file name next to the manifest")
            for k in _COUNTS:
                _need(sh, k, int, where, sw)
            _need(sh, "sha256", str, where, sw)
            for k in ("first_key", "last_key"):
                if k not in sh or not (sh[k] is None or isinstance(sh[k], str)):
                    raise ShardifyError(f"{where}: {sw}.{k} must be a key or null")
    totals = _need(doc, "totals", dict, where, "the manifest")
    for k in _COUNTS:
        _need(totals, k, int, where, "totals")


# ----------------------------------------------------------------------------- .idx
def idx_line(members: list[tuple[str, int, int, str]]) -> str:
    """One sample's line: `<ext> <data offset> <size> <member name>` per member."""
    return " ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in members)


def idx_text(lines: list[str]) -> str:
    """A whole `.idx` (DALI's `wds2idx` format, version 1.2) from the samples' lines."""
    return f"v1.2 {len(lines)}\n" + "".join(line + "\n" for line in lines)


def parse_idx(text: str, where: str = ".idx") -> list[list[tuple[str, int, int]]]:
    """Per sample, its members as (member name, data offset, size); ShardifyError when broken."""
    lines = text.splitlines()
    head = lines[0].split(" ") if lines else []
    if len(head) != 2 or head[0] != "v1.2" or not head[1].isdigit():
        raise ShardifyError(f"{where}: bad header {lines[0] if lines else ''!r} (expected 'v1.2 <samples>')")
    if int(head[1]) != len(lines) - 1:
        raise ShardifyError(f"{where}: the header says {head[1]} samples, the file lists {len(lines) - 1}")
    out = []
    for n, line in enumerate(lines[1:], start=2):
        fields = line.split(" ")
        if not line or len(fields) % 4:
            raise ShardifyError(f"{where}: line {n} does not hold groups of <ext> <offset> <size> <name>")
        sample = []
        for j in range(0, len(fields), 4):
            ext, off, size, name = fields[j: j + 4]
            if not (off.isdigit() and size.isdigit()) or name.rpartition(".")[2] != ext.rpartition(".")[2]:
                raise ShardifyError(f"{where}: line {n}: bad member entry {' '.join(fields[j: j + 4])!r}")
            sample.append((name, int(off), int(size)))
        out.append(sample)
    return out
