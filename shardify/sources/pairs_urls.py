"""URL-only image-text lists: images are downloaded while the shards are written.

Inputs: any csv, tsv, parquet or jsonl files with a url column and a caption column
(`--url-col`, `--caption-col`), local (`--source FILE_OR_DIR`) or a hub dataset repo:
- `conceptual_captions`: `google-research-datasets/conceptual_captions`, columns image_url,
  caption; the `unlabeled` subset by default (files under `unlabeled/`), splits train/validation;
- `sbu`: `vicenteor/sbu_captions`, columns image_url, caption;
- `urls`: anything else (default columns url, caption).
A file belongs to split S when S is a word of its path (`train-00000-of-00002.parquet`,
`validation.tsv`); when no file names a split, all files are one split `train`.

Each row is one input, keyed `{file stem}-{row number}`, so a reject names the exact row. The
download runs in the worker that writes the shard (`DownloadReader` below): bounded threads
that run ahead of a slow URL within a byte budget (shardify/download/order.py), timeouts,
retries, a per-host rate limit, size limits (shardify/download/fetcher.py). Every URL ends written or
in rejects.jsonl with the reason (http_404, timeout, not_image, placeholder, ...).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shardify.download.fetcher import DownloadConfig, HostRateLimiter, fetch
from shardify.download.order import OrderedFetcher
from shardify.format import ShardifyError, make_key
from shardify.records import Item, Reject
from shardify.sources.base import ListContext, Reader, Source
from shardify.sources.pairs import PAIR_FIELDS, ImageOptions, encode_pair

_LIST_EXTS = (".csv", ".tsv", ".parquet", ".jsonl")
_SPLIT_WORDS = ("train", "validation", "val", "test")


class DownloadReader(Reader):
    """Downloads items' URLs (Item.loc) in parallel; yields (item, bytes | Reject) in the order
    asked. An item listed with meta["reject"] (no url) is that reject, without a request."""

    def __init__(self, cfg: DownloadConfig):
        self.cfg = cfg
        self.limiter = HostRateLimiter(cfg.host_rate)  # shared by this worker's threads
        self.fetcher = OrderedFetcher(cfg.concurrency, cfg.lookahead_bytes)

    def read(self, item: Item, hold=None) -> bytes:
        if "reject" in item.meta:
            raise Reject(item.meta["reject"], item.meta.get("detail", ""))
        return fetch(item.loc, self.cfg, self.limiter, hold=hold)

    def read_many(self, items: Sequence[Item]) -> Iterator[tuple[Item, bytes | Reject]]:
        results = self.fetcher.run(len(items), lambda i, hold: self.read(items[i], hold))
        return zip(items, results)

    def close(self) -> None:
        self.fetcher.close()


def _split_of(rel: str) -> str | None:
    words = set(re.split(r"[^a-z]+", rel.lower()))
    return next((w for w in _SPLIT_WORDS if w in words), None)


@dataclass
class UrlListSource(Source):
    loc: object
    image: ImageOptions = field(default_factory=ImageOptions)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    url_col: str | None = None
    caption_col: str | None = None
    subset: str | None = None  # only files under this folder (e.g. "unlabeled")

    dataset = "urls"
    hub_id = None
    default_url_col = "url"
    default_caption_col = "caption"
    default_subset = None
    fields = PAIR_FIELDS

    def __post_init__(self):
        self.url_col = self.url_col or self.default_url_col
        self.caption_col = self.caption_col or self.default_caption_col
        if self.subset is None:
            self.subset = self.default_subset
        files = [f for f in self.loc.files if f.lower().endswith(_LIST_EXTS)]
        if self.subset and any(f.startswith(f"{self.subset}/") or f"/{self.subset}/" in f for f in files):
            files = [f for f in files if f.startswith(f"{self.subset}/") or f"/{self.subset}/" in f]
        if not files:
            where = self.loc.local_path or self.loc.repo_id
            raise ShardifyError(f"{where} has no .csv, .tsv, .parquet or .jsonl url lists")
        by_split: dict[str, list[str]] = {}
        for f in files:
            by_split.setdefault(_split_of(f) or "", []).append(f)
        if set(by_split) == {""}:
            by_split = {"train": by_split[""]}
        by_split.pop("", None)  # files naming no split when others do: not part of any
        self._files = {k: sorted(v) for k, v in by_split.items()}

    def describe(self) -> dict:
        return {**self.loc.describe(), "layout": "url-list"}

    def options(self) -> dict:
        # The downloader's limits are left out on purpose: a rerun with --retry-failed may
        # raise timeouts or retries and still resume the same job.
        return {"image": self.image.to_dict(), "url_col": self.url_col, "caption_col": self.caption_col,
                "subset": self.subset}

    def manifest_extras(self) -> dict:
        return {"url_list_files": self._files, "download": self.download.to_dict()}

    def splits(self) -> list[str]:
        return sorted(self._files)

    def _rows(self, rel: str):
        """(url, caption) per row of one list file; a damaged file is one line naming it."""
        try:
            yield from self._read_rows(rel)
        except ShardifyError:
            raise
        except Exception as exc:  # pyarrow, csv and json each raise their own kinds on damaged files
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ShardifyError(f"{rel}: cannot read this url list ({type(exc).__name__}: {first[:200]})") from None

    def _read_rows(self, rel: str):
        cols = (self.url_col, self.caption_col)
        with self.loc.open(rel) as f:
            if rel.lower().endswith(".parquet"):
                import pyarrow.parquet as pq

                pf = pq.ParquetFile(f)
                missing = [c for c in cols if c not in pf.schema_arrow.names]
                if missing:
                    raise ShardifyError(f"{rel} has no column {missing[0]!r} (it has {pf.schema_arrow.names}); "
                                        "use --url-col / --caption-col")
                for batch in pf.iter_batches(columns=list(cols), batch_size=8192):
                    yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist())
            elif rel.lower().endswith(".jsonl"):
                for line in io.TextIOWrapper(f, encoding="utf-8"):
                    if line.strip():
                        row = json.loads(line)
                        yield row.get(self.url_col), row.get(self.caption_col)
            else:
                delim = "\t" if rel.lower().endswith(".tsv") else ","
                reader = csv.DictReader(io.TextIOWrapper(f, encoding="utf-8", newline=""), delimiter=delim)
                missing = [c for c in cols if c not in (reader.fieldnames or [])]
                if missing:
                    raise ShardifyError(f"{rel} has no column {missing[0]!r} (it has {reader.fieldnames}); "
                                        "use --url-col / --caption-col")
                for row in reader:
                    yield row[self.url_col], row[self.caption_col]

    def list_items(self, split: str, ctx: ListContext) -> Iterator[Item]:
        count = 0
        for rel in self._files[split]:
            stem = make_key(Path(rel).name.split(".", 1)[0])
            for row, (url, caption) in enumerate(self._rows(rel)):
                meta = {"url": url, "caption": caption, "image_id": f"{stem}-{row}"}
                if not url:
                    meta.update(reject="no_url", detail="empty url")
                yield Item(key=f"{stem}-{row:09d}", origin=f"{rel}#{row}", loc=url or "", meta=meta)
                count += 1
            ctx.progress(f"read {rel}", count)

    def open_reader(self, split: str) -> Reader:
        return DownloadReader(self.download)

    def encode(self, item: Item, payload: bytes) -> dict[str, bytes]:
        return encode_pair(item, payload, self.image, self.dataset)


class ConceptualCaptionsSource(UrlListSource):
    dataset = "conceptual_captions"
    hub_id = "google-research-datasets/conceptual_captions"
    default_url_col = "image_url"
    default_subset = "unlabeled"


class SBUSource(UrlListSource):
    dataset = "sbu"
    hub_id = "vicenteor/sbu_captions"
    default_url_col = "image_url"
