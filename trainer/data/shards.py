"""Reading samples out of tar shards: index a shard's members once, then read only what is needed.

A shard is opened through the local file system (plain paths) or fsspec (any URL); user strings
never reach a shell. The first visit reads the shard's `.idx` (DALI-style, written by
shardify) when there is one, else scans the tar headers (a small ustar walker, tarfile for
anything fancier; both seek over the payloads, so this reads about 512 bytes per member) and
keeps a table key -> {ext: (offset, size)}; reads then seek forward to the members a worker
wants. A worker reads only its own samples' payloads, so the image bytes are read about once
per epoch in total, not once per rank (each worker does scan the headers of the shards it
visits).

Damage is reported per sample, not raised: a member cut short, a sample missing from a
truncated tar, or a sample lacking a required field comes back as `Corrupt(key, reason)`. A
shard that cannot be opened at all raises `ShardError` naming it.
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass

from shardify.format import ShardifyError, parse_idx  # the .idx format is the shard contract's

log = logging.getLogger(__name__)


class ShardError(RuntimeError):
    """A shard is missing or unreadable (as opposed to one bad sample inside it)."""


@dataclass
class Corrupt:
    """A sample that could not be read or decoded; replaced in its batch and counted."""

    key: str
    reason: str


@dataclass
class ShardIndex:
    keys: list[str]
    members: list[dict[str, tuple[int, int]]]  # per sample: ext -> (data offset, size)
    truncated: str  # why the scan stopped early, "" when the tar ended cleanly


def _open(url: str):
    try:
        if "://" in url and not url.startswith("file://"):
            import fsspec

            return fsspec.open(url, "rb").open()
        return open(url.removeprefix("file://"), "rb")
    except FileNotFoundError:
        raise ShardError(f"shard not found: {url}") from None
    except Exception as e:  # fsspec raises many types; all mean the same to the user
        raise ShardError(f"cannot open shard {url}: {type(e).__name__}: {e}") from None


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the basename, ext = the rest."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


def _ustar_scan(f) -> tuple[list[tuple[str, int, int]], str] | None:
    """Fast header walk for plain ustar tars (what shardify writes): [(name, offset, size)].

    Returns None when the tar uses anything else (pax or GNU long names, base-256 sizes), so the
    caller falls back to tarfile; a bad checksum or a short header ends the walk as truncation.
    """
    out: list[tuple[str, int, int]] = []
    off = 0
    while True:
        f.seek(off)
        hdr = f.read(512)
        if len(hdr) == 0:
            return out, ""  # no end-of-archive blocks; everything before was whole
        if len(hdr) < 512:
            return out, f"short header at byte {off}"
        if hdr.count(0) == 512:
            return out, ""
        try:
            chk = int(hdr[148:156].rstrip(b"\0 ") or b"0", 8)
            size_field = hdr[124:136]
            if size_field[0] & 0x80:
                return None
            size = int(size_field.rstrip(b"\0 ").lstrip(b" ") or b"0", 8)
        except ValueError:
            return None
        if chk != sum(hdr) - sum(hdr[148:156]) + 8 * 32:
            return out, f"bad header checksum at byte {off}"
        kind = hdr[156:157]
        if kind not in (b"0", b"\0", b"5"):
            return None
        if kind != b"5":
            name = hdr[0:100].split(b"\0", 1)[0]
            if hdr[257:262] == b"ustar":
                prefix = hdr[345:500].split(b"\0", 1)[0]
                if prefix:
                    name = prefix + b"/" + name
            out.append((name.decode("utf-8", "replace"), off + 512, size))
        off += 512 + -(-size // 512) * 512


def _tarfile_scan(url: str, f) -> tuple[list[tuple[str, int, int]], str]:
    f.seek(0)
    try:
        tf = tarfile.open(fileobj=f, mode="r:")
    except tarfile.TarError as e:
        raise ShardError(f"shard {url} is not a readable tar: {e}") from None
    out, truncated = [], ""
    while True:
        try:
            ti = tf.next()
        except (tarfile.TarError, EOFError, OSError) as e:
            truncated = f"{type(e).__name__}: {e}"
            break
        if ti is None:
            break
        if ti.isfile():
            out.append((ti.name, ti.offset_data, ti.size))
    return out, truncated


def _read_idx(url: str) -> list[tuple[str, int, int]] | None:
    """Members from the DALI-style `.idx` next to the shard (shardify writes one), if any.

    One small read instead of a header walk (a seek per member, which on remote storage means a
    request per member); None when there is no usable index.
    """
    if not url.endswith(".tar"):
        return None
    idx_url = url[: -len(".tar")] + ".idx"
    try:
        if "://" in idx_url and not idx_url.startswith("file://"):
            import fsspec

            with fsspec.open(idx_url, "rt", encoding="utf-8") as f:
                text = f.read()
        else:
            path = idx_url.removeprefix("file://")
            if not os.path.exists(path):
                return None
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except (OSError, ValueError):
        return None
    try:
        return [member for sample in parse_idx(text, idx_url) for member in sample]
    except ShardifyError as e:
        log.warning("ignoring unreadable index %s (%s); scanning the tar instead", idx_url, e)
        return None


def index_shard(url: str, f) -> ShardIndex:
    listed = _read_idx(url)
    if listed is not None:
        return _table(listed, "")
    scan = _ustar_scan(f)
    members, truncated = scan if scan is not None else _tarfile_scan(url, f)
    if not members and truncated:
        raise ShardError(f"shard {url} is not a readable tar: {truncated}")
    return _table(members, truncated)


def _table(members: list[tuple[str, int, int]], truncated: str) -> ShardIndex:
    keys: list[str] = []
    table: list[dict[str, tuple[int, int]]] = []
    for name, off, size in members:
        key, ext = _split_name(name)
        if not keys or keys[-1] != key:
            keys.append(key)
            table.append({})
        table[-1][ext] = (off, size)
    return ShardIndex(keys, table, truncated)


class ShardReader:
    """Per-worker reader with a small cache of open shards and their indexes."""

    def __init__(self, max_open: int = 8):
        self.max_open = max_open
        self._open: OrderedDict[str, tuple[object, ShardIndex]] = OrderedDict()

    def _get(self, url: str, expected: int) -> tuple[object, ShardIndex]:
        if url in self._open:
            self._open.move_to_end(url)
            return self._open[url]
        f = _open(url)
        idx = index_shard(url, f)
        if idx.truncated or len(idx.keys) != expected:
            log.warning("shard %s: manifest says %d samples, tar holds %d%s", url, expected, len(idx.keys),
                        f" (scan stopped: {idx.truncated})" if idx.truncated else "")
        self._open[url] = (f, idx)
        while len(self._open) > self.max_open:
            _, (old, _) = self._open.popitem(last=False)
            old.close()
        return f, idx

    def read(self, url: str, expected: int, indices: list[int], exts: tuple[str, ...],
             optional: tuple[str, ...] = ()) -> list[tuple[str, dict[str, bytes]] | Corrupt]:
        """Read samples by their index in the shard (any order); required `exts`, some `optional`."""
        f, idx = self._get(url, expected)
        order = sorted(range(len(indices)), key=lambda k: indices[k])  # forward seeks only
        out: list = [None] * len(indices)
        for k in order:
            i = indices[k]
            if i >= len(idx.keys):
                out[k] = Corrupt(f"{url}#{i}", "sample missing from shard (truncated tar?)")
                continue
            key, mem = idx.keys[i], idx.members[i]
            missing = [e for e in exts if e not in mem]
            if missing:
                out[k] = Corrupt(key, f"no .{missing[0]} member")
                continue
            fields: dict[str, bytes] = {}
            bad = ""
            for e in exts + tuple(x for x in optional if x in mem):
                off, size = mem[e]
                f.seek(off)
                data = f.read(size)
                if len(data) != size:
                    bad = f".{e} member truncated ({len(data)} of {size} bytes)"
                    break
                fields[e] = data
            out[k] = Corrupt(key, bad) if bad else (key, fields)
        return out

    def close(self) -> None:
        for f, _ in self._open.values():
            f.close()
        self._open.clear()
