"""OpenWebText (`Skylion007/openwebtext`) as text shards: one document per sample, or packed
token blocks when a tokenizer is given.

Layouts (detected from the file list, local or on the hub):
- `slices`: `subsets/urlsf_subsetNN.tar` (NN = 00..20). Each holds members
  `openwebtext/urlsf_subsetNN-K_data.xz`, each of which is itself an xz-compressed tar of `.txt`
  documents. Both tar levels are read with `tarfile` in streaming mode (`r|` then `r|xz`), so
  nothing is unpacked to disk and the document files keep their first line (the reference read
  the decompressed inner tar as plain text and lost it).
- `parquet`: the hub's later conversion, `*.parquet` files with a `text` column. Slice N is the
  N-th parquet file in sorted path order; the manifest lists which file each slice was.

A split is a set of slices (default train = 0-4, validation = 5, as in the seed design). Slices
cannot be read at random, so while listing each slice is streamed once and its documents are
staged (shardify.staging) under `<out>/.shardify/stage/`, in parallel, one process per slice.

With a tokenizer, staging also cleans and tokenises each document; listing then concatenates
the documents' ids in source order and cuts them into blocks (shardify.tokenization): the samples
are the blocks, so the seeded shuffle moves whole blocks and no token is lost or doubled at a
shard or worker boundary. Documents that cannot be decoded (or are empty after cleaning) stay
inputs of the split and end in rejects.jsonl.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shardify import line_packing as lp
from shardify import state
from shardify import tokenization as tk
from shardify.format import ShardifyError, make_key
from shardify.records import Item, Reject
from shardify.sources.base import ListContext, Reader, Source
from shardify.staging import LocalFileReader, stage_units
from shardify.text import prepare_document

HUB_ID = "Skylion007/openwebtext"
DEFAULT_SLICES = {"train": [0, 1, 2, 3, 4], "validation": [5]}
_SLICE_RE = re.compile(r"(?:^|/)urlsf_subset(\d+)\.tar$")
_ENCODE_BATCH = 256  # documents per tokenizer call while staging


def parse_slices(text: str) -> list[int]:
    """'0-4' -> [0..4]; '5' -> [5]; '0-2,7' -> [0, 1, 2, 7]."""
    out: list[int] = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if b < a:
                    raise ValueError
                out.extend(range(a, b + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise ShardifyError(f"bad slice range {text!r}: use e.g. 0-4, 5 or 0-2,7") from None
    if not out or any(s < 0 for s in out) or len(set(out)) != len(out):
        raise ShardifyError(f"bad slice range {text!r}: slices must be distinct numbers >= 0")
    return out


def detect_layout(files: list[str]) -> tuple[str, dict[int, str]]:
    """('slices' | 'parquet', {slice number: relative path})."""
    slices = {}
    for rel in files:
        m = _SLICE_RE.search(rel)
        if m:
            slices[int(m.group(1))] = rel
    if slices:
        return "slices", dict(sorted(slices.items()))
    parquet = sorted(f for f in files if f.endswith(".parquet"))
    if parquet:
        return "parquet", dict(enumerate(parquet))
    raise ShardifyError("no OpenWebText files found: expected subsets/urlsf_subsetNN.tar (slice layout) "
                        "or *.parquet files with a `text` column (parquet layout)")


@dataclass
class _Streamer:
    """Streams one slice file (a staging unit); pickles into the staging processes."""

    loc: object
    layout: str
    slice_of: dict  # rel path -> slice number
    clean: bool
    tokenizer: tk.TokenizerSpec | None = None
    packing: str = "stream"

    def __call__(self, rel: str):
        docs = self._documents(rel)
        if self.tokenizer is None:
            yield from docs
            return
        yield from self._tokenised(docs)

    def _documents(self, rel: str):
        """(key, origin, raw bytes, meta) per document, in file order."""
        n = self.slice_of[rel]
        if self.layout == "parquet":
            yield from self._parquet_documents(rel, n)
            return
        with self.loc.open(rel) as f, tarfile.open(fileobj=f, mode="r|") as outer:
            for member in outer:
                if not member.isfile() or not member.name.endswith(".xz"):
                    continue
                stem = Path(member.name).name[: -len(".xz")]
                inner_file = outer.extractfile(member)
                try:
                    with tarfile.open(fileobj=inner_file, mode="r|xz") as inner:
                        for doc in inner:
                            if not doc.isfile():
                                continue
                            name = Path(doc.name).name
                            doc_stem = name.rsplit(".", 1)[0] if "." in name else name
                            key = make_key(f"{stem}-{doc_stem}")
                            data = inner.extractfile(doc).read()
                            yield key, f"{rel}:{member.name}:{doc.name}", data, {
                                "slice": n, "member": member.name, "document": doc.name}
                except (tarfile.TarError, EOFError, OSError) as exc:  # lzma errors are OSErrors
                    # Documents read before the damage are kept; the member itself is recorded.
                    yield make_key(f"{stem}-unreadable"), f"{rel}:{member.name}", b"", {
                        "slice": n, "member": member.name,
                        "reject": "unreadable", "detail": f"{type(exc).__name__}: {exc}"}

    def _parquet_documents(self, rel: str, n: int):
        import pyarrow.parquet as pq

        stem = make_key(Path(rel).name[: -len(".parquet")])
        row = 0
        with self.loc.open(rel) as f:
            pf = pq.ParquetFile(f)
            if "text" not in pf.schema_arrow.names:
                raise ShardifyError(f"{rel} has no `text` column (columns: {pf.schema_arrow.names})")
            for batch in pf.iter_batches(columns=["text"], batch_size=1024):
                for text in batch.column(0).to_pylist():
                    data = (text or "").encode("utf-8", "surrogatepass")
                    yield f"{stem}-{row:08d}", f"{rel}#{row}", data, {"slice": n, "file": rel, "row": row}
                    row += 1

    def _tokenised(self, docs):
        """Clean and tokenise documents in batches; payload = uint32 ids, rejects as metadata."""
        tk.set_single_threaded()  # one staging process per slice already uses the cores
        tok = self.tokenizer.load()
        batch: list = []

        def flush():
            if self.packing == "lines":
                yield from self._encode_lines(tok, batch)
                batch.clear()
                return
            texts = [text for _, _, text, _ in batch if text is not None]
            encoded = iter(tk.encode_texts(tok, texts))
            for key, origin, text, meta in batch:
                if text is None:
                    yield key, origin, b"", meta
                else:
                    ids = next(encoded)
                    yield key, origin, ids.tobytes(), {**meta, "chars": len(text), "tokens": len(ids)}
            batch.clear()

        for key, origin, data, meta in docs:
            text = None
            if "reject" not in meta:
                try:
                    text = prepare_document(data, self.clean)
                except Reject as rej:
                    meta = {**meta, "reject": rej.reason, "detail": rej.detail}
            batch.append((key, origin, text, meta))
            if len(batch) >= _ENCODE_BATCH:
                yield from flush()
        yield from flush()


    @staticmethod
    def _encode_lines(tok, batch: list):
        """Line packing: each line tokenised on its own, as the thesis did (`tokenize_line`);
        the payload keeps the line lengths (line_packing.encode_lines)."""
        lines = [text.splitlines() if text is not None else [] for _, _, text, _ in batch]
        encoded = iter(tk.encode_texts(tok, [ln for doc in lines for ln in doc]))
        for (key, origin, text, meta), doc in zip(batch, lines, strict=True):
            if text is None:
                yield key, origin, b"", meta
                continue
            ids = [next(encoded) for _ in doc]
            flat = np.concatenate(ids) if ids else np.zeros(0, np.uint32)
            yield key, origin, lp.encode_lines([len(x) for x in ids], flat), {
                **meta, "chars": len(text), "tokens": int(len(flat))}


class _BlockSink:
    """Writes packed blocks to the staging file, lists them as items and counts them."""

    def __init__(self, split: str, bin_path: str, out, block_size: int):
        self.split, self.bin_path, self.out, self.block_size = split, bin_path, out, block_size
        self.items: list[Item] = []  # listed since the last drain()
        self.offset = 0
        self.stats = {"documents": 0, "rejected_documents": 0, "tokens": 0, "blocks": 0, "padded_tokens": 0}

    def document(self, doc: Item, reader, raw: bool = False):
        """A staged document's payload (raw bytes) or ids; None (and listed) when it is a reject."""
        if "reject" in doc.meta:
            self.stats["rejected_documents"] += 1
            self.items.append(doc)  # stays an input; its reader raises the Reject
            return None
        self.stats["documents"] += 1
        data = reader.read_at(*doc.loc) if doc.loc[2] else b""
        arr = np.frombuffer(data, dtype=np.uint32)
        # a lines payload starts with its line count and lengths (line_packing.encode_lines)
        self.stats["tokens"] += (len(arr) - 1 - int(arr[0]) if len(arr) else 0) if raw else len(arr)
        return data if raw else arr

    def emit(self, block: np.ndarray, n_tokens: int, first: str) -> None:
        data = block.tobytes()
        self.out.write(data)
        index = self.stats["blocks"]
        # Millions of blocks: share strings (the path, the document key as origin).
        self.items.append(Item(key=f"{self.split}-block-{index:09d}", origin=first,
                               loc=(self.bin_path, self.offset, len(data)),
                               meta={"block": index, "tokens": n_tokens, "first_doc": first}))
        self.offset += len(data)
        self.stats["blocks"] += 1
        self.stats["padded_tokens"] += self.block_size - 2 - n_tokens

    def drain(self) -> list[Item]:
        """The items listed since the last call (handed on at once: millions of blocks)."""
        items, self.items = self.items, []
        return items

    def summary(self, packing: str) -> dict:
        positions = self.stats["blocks"] * self.block_size
        share = self.stats["padded_tokens"] / positions if positions else 0.0
        return {**self.stats, "packing": packing, "padding_share": round(share, 6)}


class _StagedReader(Reader):
    def __init__(self):
        self.files = LocalFileReader()

    def read(self, item: Item) -> bytes:
        if "reject" in item.meta:
            raise Reject(item.meta["reject"], item.meta.get("detail", ""))
        return self.files.read_at(*item.loc)

    def close(self) -> None:
        self.files.close()


@dataclass
class OpenWebTextSource(Source):
    """OpenWebText from a Location (local copy or hub repo at a resolved commit)."""

    loc: object
    split_slices: dict = field(default_factory=lambda: dict(DEFAULT_SLICES))
    clean: bool = True
    tokenizer: tk.TokenizerSpec | None = None
    block_size: int = 256
    packing: str = "stream"  # "lines": whole lines, as the thesis (line_packing.py); the CLI's default

    dataset = "openwebtext"

    def __post_init__(self):
        if self.packing not in lp.PACKINGS:
            raise ShardifyError(f"--packing {self.packing!r}: use one of {', '.join(lp.PACKINGS)}")
        self.layout, self.slice_files = detect_layout(self.loc.files)
        seen: dict[int, str] = {}
        for split, slices in self.split_slices.items():
            for s in slices:
                if s in seen:
                    raise ShardifyError(f"slice {s} is in both {seen[s]!r} and {split!r}")
                seen[s] = split
        self.fields = ("npy", "json") if self.tokenizer else ("txt", "json")
        self._special = None
        if self.tokenizer:
            self._special = tk.special_ids(self.tokenizer.load())

    # -- provenance and options
    def describe(self) -> dict:
        return {**self.loc.describe(), "layout": self.layout}

    def options(self) -> dict:
        opts = {"slices": {s: list(v) for s, v in sorted(self.split_slices.items())},
                "clean": self.clean, "tokenizer": None}
        if self.tokenizer:
            # The files' hashes identify the tokenizer, not the path or id it was given by.
            opts["tokenizer"] = {"kind": self.tokenizer.kind, "files": self.tokenizer.files}
            opts["block_size"] = self.block_size
            opts["packing"] = self.packing
        return opts

    def manifest_extras(self) -> dict:
        extras = {
            "slices": {s: list(v) for s, v in sorted(self.split_slices.items())},
            "slice_files": {str(n): rel for n, rel in self.slice_files.items()},
            "slice_mapping": ("slice N = subsets/urlsf_subsetNN.tar" if self.layout == "slices"
                              else "slice N = the N-th *.parquet file in sorted path order"),
            "cleaning": ("strip lines; drop empty, '---' and NUL lines; collapse 3+ newlines"
                         if self.clean else None),
        }
        if self.tokenizer:
            sp = self._special
            extras["tokenizer"] = {
                "name": self.tokenizer.name, "kind": self.tokenizer.kind,
                "files_sha256": self.tokenizer.files, "vocab_size": sp.vocab_size,
                "cls_id": sp.cls, "sep_id": sp.sep, "pad_id": sp.pad,
                "block_size": self.block_size, "dtype": np.dtype(sp.dtype).name,
                "packing": self.packing,
                "packing_rule": _PACKING_RULES[self.packing].format(body=self.block_size - 2),
            }
        return extras

    def splits(self) -> list[str]:
        return list(self.split_slices)

    # -- listing
    def _units(self, split: str) -> list[str]:
        missing = [s for s in self.split_slices[split] if s not in self.slice_files]
        if missing:
            have = ", ".join(str(s) for s in self.slice_files) or "none"
            raise ShardifyError(f"split {split!r} needs slices {missing} that the source lacks (it has {have})")
        return [self.slice_files[s] for s in self.split_slices[split]]

    def list_items(self, split: str, ctx: ListContext) -> Iterator[Item]:
        units = self._units(split)
        streamer = _Streamer(self.loc, self.layout, {rel: n for n, rel in self.slice_files.items()},
                             self.clean, self.tokenizer, self.packing)
        docs = stage_units(streamer, units, Path(ctx.stage_dir) / "documents", ctx)
        if not self.tokenizer:
            return docs
        return self._pack(split, docs, Path(ctx.stage_dir))

    def _pack(self, split: str, docs: Iterable[Item], stage_dir: Path) -> Iterator[Item]:
        """Pack the staged ids in document order (stream or lines) and stage the blocks; yield the
        blocks (and the rejected documents) as they are packed."""
        reader = LocalFileReader()
        stage_dir.mkdir(parents=True, exist_ok=True)
        bin_path = stage_dir / "blocks.bin"
        tmp = state.tmp_path(bin_path)  # nodes sharing the output directory may pack at once
        with open(tmp, "wb") as out:
            sink = _BlockSink(split, str(bin_path), out, self.block_size)
            feed = self._feed_lines if self.packing == "lines" else self._feed_stream
            yield from feed(docs, reader, sink)
        reader.close()
        os.replace(tmp, bin_path)
        state.write_json_atomic(stage_dir / "tokens.json", {"split": split, **sink.summary(self.packing)})

    def _feed_stream(self, docs: Iterable[Item], reader, sink: _BlockSink) -> Iterator[Item]:
        """Documents concatenated and cut into full blocks; only the last one is padded."""
        packer = tk.BlockPacker(self.block_size, self._special)
        first_doc = None  # the document the pending (not yet emitted) tokens start in
        for doc in docs:
            ids = sink.document(doc, reader)
            if ids is not None:
                if first_doc is None and len(ids):
                    first_doc = doc.key
                for block in packer.add(ids):
                    sink.emit(block, packer.body, first_doc)
                    first_doc = doc.key  # later blocks start inside this document
                if packer._pending == 0:
                    first_doc = None
            yield from sink.drain()
        last = packer.finish()
        if last is not None:
            sink.emit(last[0], last[1], first_doc)
        yield from sink.drain()

    def _feed_lines(self, docs: Iterable[Item], reader, sink: _BlockSink) -> Iterator[Item]:
        """Whole lines packed greedily (line_packing.py); blocks may span documents."""
        packer = lp.LinePacker(self.block_size, self._special)
        open_doc = None  # the document whose line opened the open block
        for doc in docs:
            payload = sink.document(doc, reader, raw=True)
            if payload is not None:
                for line in lp.decode_lines(payload):
                    had = packer.pending > 0
                    closed = packer.add_line(line)
                    for k, (block, n) in enumerate(closed):
                        sink.emit(block, n, open_doc if (k == 0 and had) else doc.key)
                    if packer.pending == 0:
                        open_doc = None
                    elif not had or closed:
                        open_doc = doc.key
            yield from sink.drain()
        for block, n in packer.finish():
            sink.emit(block, n, open_doc)
        yield from sink.drain()

    def split_extras(self, split: str, ctx: ListContext) -> dict:
        """Token counts of a pre-tokenised split, for its manifest section."""
        path = Path(ctx.stage_dir) / "tokens.json"
        if not self.tokenizer or not path.exists():
            return {}
        return {"tokens": {k: v for k, v in state.read_json(path).items() if k != "split"}}

    # -- reading and encoding (worker processes)
    def open_reader(self, split: str) -> Reader:
        return _StagedReader()

    def encode(self, item: Item, payload: bytes) -> dict[str, bytes]:
        if self.tokenizer:
            block = np.frombuffer(payload, dtype=self._special.dtype)
            meta = {"block": item.meta["block"], "tokens": item.meta["tokens"],
                    "block_size": self.block_size, "first_doc": item.meta["first_doc"]}
            return {"npy": tk.npy_bytes(block), "json": _json(meta)}
        text = prepare_document(payload, self.clean)
        # the same keys in every sample (null when the layout has no such fact)
        meta = {k: item.meta.get(k) for k in ("slice", "member", "document", "file", "row")}
        meta["chars"] = len(text)
        return {"txt": text.encode("utf-8"), "json": _json(meta)}


_PACKING_RULES = {
    "stream": "documents concatenated in source order, cut into blocks of {body} ids + [CLS]/[SEP]; "
              "last block padded with [PAD]",
    "lines": "whole cleaned lines packed greedily in source order into blocks of at most {body} ids + "
             "[CLS]/[SEP], the rest [PAD]; a line of {body} ids or more is cut into blocks of its own",
}


def _json(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True).encode("utf-8")
