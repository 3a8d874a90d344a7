"""The shard contract of docs/format.md, in code: what shardify writes and every reader relies on.

Both sides import this module (shardify to write and verify, the trainer to read), so the
contract is coded once:
- one error type, `ShardifyError` (a ValueError: a file or a value breaks the contract, or the
  user asked for something that cannot be done); `JpegError` is the kind with a reject reason;
- sample keys: `[A-Za-z0-9_-]+`, at most 90 characters (`make_key`, `is_valid_key`);
- manifest.json: `read_manifest` (file, directory or URL), `validate_manifest`, `write_manifest`;
- the DALI-style `.idx`: `idx_line`, `idx_text`, `parse_idx`;
- `jpg` members: `parse_jpeg_header` and `gpu_unreadable_reason` (what nvJPEG cannot read);
- token ids: `special_ids` ([CLS], [SEP], [PAD] of a tokenizer), `clean_text` (the reference
  cleaning applied before tokenising), `resolve_tokenizer`.
It imports nothing heavy: the standard library only (a tokenizer or fsspec only when asked).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class ShardifyError(ValueError):
    """The one error type: a file or value that breaks the contract, or a user mistake.
    Command lines print it as one line (exit 2), never as a traceback."""


class JpegError(ShardifyError):
    """A `jpg` payload whose header is broken; `reason` is the reject reason (truncated, unreadable)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


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


def simple_manifest(out_dir, dataset: str, fields: list[str], splits: dict[str, list[dict]], **extra) -> dict:
    """A valid manifest for shards written by other code (benchmarks, tests): each shard given as
    {"name", "samples"} and optionally "first_key"/"last_key"; sizes are read from the files, no
    rejects, no checksums. Written to out_dir/manifest.json and returned."""
    def counts(items):
        return {k: sum(x[k] for x in items) for k in _COUNTS}

    doc_splits = {}
    for split, shards in splits.items():
        full = [{"inputs": sh["samples"], "rejected": 0, "sha256": "", "first_key": None, "last_key": None,
                 "bytes": os.path.getsize(os.path.join(os.fspath(out_dir), sh["name"])), **sh} for sh in shards]
        doc_splits[split] = {**counts(full), "shards": full}
    doc = {"schema_version": SCHEMA_VERSION, "dataset": dataset, "fields": list(fields), **extra,
           "splits": doc_splits, "totals": counts(list(doc_splits.values()))}
    write_manifest(out_dir, doc)
    return doc


def write_manifest(out_dir, manifest: dict) -> None:
    """Validate and write `manifest.json` atomically (temporary name, then rename)."""
    validate_manifest(manifest, os.path.join(os.fspath(out_dir), MANIFEST))
    write_json_atomic(Path(out_dir) / MANIFEST, manifest)


def write_json_atomic(path, obj, indent: int | None = 1) -> None:
    """Write JSON to a temporary name unique per host and process, then rename it into place."""
    import socket

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


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


# ----------------------------------------------------------------------------- JPEG headers
# Start-of-frame markers, and which of them nvJPEG handles (Huffman baseline/extended/progressive).
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_GPU_SOF = {0xC0, 0xC1, 0xC2}


@dataclass
class JpegHeader:
    width: int
    height: int
    components: int
    sof: int  # the start-of-frame marker byte, e.g. 0xC0 baseline, 0xC2 progressive
    adobe_transform: int | None  # APP14 'Adobe' colour transform, None when absent
    scan_offset: int  # byte offset of the first start-of-scan marker


def parse_jpeg_header(data: bytes) -> JpegHeader:
    """Walk the JPEG markers up to the first scan; raise JpegError when the header is broken."""
    if data[:2] != b"\xff\xd8":
        raise JpegError("unreadable", "not a JPEG (no SOI marker)")
    pos, n = 2, len(data)
    frame = None
    adobe = None
    while True:
        # Markers may be preceded by any number of 0xFF fill bytes.
        while pos < n and data[pos] != 0xFF:
            pos += 1  # tolerate garbage between segments, as libjpeg does (with a warning)
        while pos < n and data[pos] == 0xFF:
            pos += 1
        if pos >= n:
            raise JpegError("truncated", "file ends inside the JPEG header")
        marker = data[pos]
        pos += 1
        if marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker == 0x01:
            continue  # markers without a length field
        if marker == 0xD9:
            raise JpegError("unreadable", "end-of-image marker before any scan")
        if pos + 2 > n:
            raise JpegError("truncated", "file ends inside the JPEG header")
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2:
            raise JpegError("unreadable", f"bad JPEG segment length {length}")
        seg = data[pos + 2: pos + length]
        if pos + length > n:
            raise JpegError("truncated", "file ends inside the JPEG header")
        if marker in _SOF_MARKERS:
            if len(seg) < 6:
                raise JpegError("unreadable", "short JPEG frame header")
            _, height, width, comps = struct.unpack_from(">BHHB", seg, 0)
            frame = (width, height, comps, marker)
        elif marker == 0xEE and seg[:5] == b"Adobe" and len(seg) >= 12:
            adobe = seg[11]
        elif marker == 0xDA:
            if frame is None:
                raise JpegError("unreadable", "JPEG scan before any frame header")
            width, height, comps, sof = frame
            return JpegHeader(width, height, comps, sof, adobe, pos - 2)
        pos += length


def gpu_unreadable_reason(h: JpegHeader) -> str | None:
    """Why a well-formed JPEG cannot go to the GPU decoder as is (None: it can)."""
    if h.components == 4:
        return "ycck-jpeg" if h.adobe_transform == 2 else "cmyk-jpeg"
    if h.components not in (1, 3):
        return f"jpeg-{h.components}-components"
    if h.sof not in _GPU_SOF:
        return f"jpeg-sof{h.sof - 0xC0}"
    if h.components == 3 and h.adobe_transform == 0:
        return "rgb-jpeg"  # RGB-coded (not YCbCr) JPEG: GPU decoders get the colours wrong
    if h.height == 0:
        return "jpeg-dnl"  # height given later in the stream; decoders differ
    return None


def check_complete(data: bytes, h: JpegHeader) -> None:
    """JpegError("truncated") when the file was cut short. The entropy-coded data never
    contains FF D9, so an EOI after the scan start is the real end of the image."""
    if data.rfind(b"\xff\xd9") < h.scan_offset:
        raise JpegError("truncated", "no end-of-image marker after the scan data")


def check_stored_jpeg(data: bytes) -> JpegHeader:
    """The header of a shard's `jpg`; JpegError unless shardify would have stored it as it is.

    The loader runs this on every sample before either decode path, so the CPU and GPU paths
    refuse the same inputs: a broken header, a file cut short (no end-of-image marker after the
    scan; nvJPEG's hardware decoder may decode such a file into a partly blank image instead of
    failing, where libjpeg refuses it), and the kinds nvJPEG cannot decode (CMYK, RGB-coded,
    arithmetic or lossless JPEGs)."""
    h = parse_jpeg_header(data)
    check_complete(data, h)
    reason = gpu_unreadable_reason(h)
    if reason is not None:
        raise JpegError("unreadable", f"{reason}: shardify re-encodes such images; re-shard this source")
    return h


# ----------------------------------------------------------------------------- token ids
@dataclass
class SpecialIds:
    cls: int
    sep: int
    pad: int
    vocab_size: int

    @property
    def dtype(self):
        """uint16 when every id fits (BERT's 30,522 do), else uint32."""
        import numpy as np

        return np.uint16 if self.vocab_size <= 1 << 16 else np.uint32


def special_ids(tok) -> SpecialIds:
    """[CLS], [SEP] and [PAD] of a `tokenizers.Tokenizer`: blocks are [CLS] ids [SEP] [PAD]..."""
    ids = []
    for token in ("[CLS]", "[SEP]", "[PAD]"):
        i = tok.token_to_id(token)
        if i is None:
            raise ShardifyError(f"the tokenizer has no {token} token; a BERT-style vocabulary is needed")
        ids.append(i)
    return SpecialIds(*ids, vocab_size=tok.get_vocab_size(with_added_tokens=True))


def resolve_tokenizer(name: str):
    """The tokenizer spec (its `load()` gives the `tokenizers.Tokenizer`, padding and truncation
    off) for a tokenizer.json / vocab.txt, a directory holding one, or a hub model id."""
    from shardify.tokenize import resolve_tokenizer as resolve  # tokenizers only when asked

    return resolve(name)


_MANY_NEWLINES = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """The reference cleaning of a document, applied before tokenising: per line, strip; drop
    empty lines, lines equal to `---` and lines holding NUL; join with newlines and collapse
    runs of 3+ newlines to 2."""
    kept = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line == "---" or "\x00" in line:
            continue
        kept.append(line)
    return _MANY_NEWLINES.sub("\n\n", "\n".join(kept))
