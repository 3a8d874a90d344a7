"""The interface every dataset source implements, and the default sequential reader.

A source knows one dataset family (ImageNet, OpenWebText, image-text pairs) in the layouts it
has had. The job runner (shardify/job.py) only talks to this interface:

1. `list_items(split, ctx)` lists every input of a split in a deterministic order, cheaply (no
   image bytes). Sources whose layout cannot be read at random (tar.gz archives, parquet) stage
   the payloads under `ctx.stage_dir` while listing, once (shardify/staging.py).
   Yield the items as they are found (a generator): the planner writes each to a file as it
   comes, so a listing of any length costs no more memory than one item (shardify/plan.py).
2. In each worker process, `open_reader(split)` returns a `Reader` whose `read_many(items)`
   yields `(item, payload_bytes_or_Reject)` in the order given. Readers may fetch in parallel
   (a downloader does) but must yield in order.
3. `encode(item, payload)` turns a payload into WebDataset fields `{ext: bytes}` or raises
   `Reject`. It runs in the workers, so it must be deterministic and picklable state only.

Everything a source needs in the workers must pickle: keep file systems, options and paths as
attributes, open file handles only inside readers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from shardify.records import Item, Reject


@dataclass
class ListContext:
    """What a source may use while listing a split."""

    stage_dir: Path  # staged payloads, in the output directory: shared by the job's tasks
    workers: int  # processes the source may use to list or stage units in parallel
    progress: Callable[[str, int], None]  # progress(description, items_listed_so_far)
    show_progress: bool = True  # False with --no-progress: staging workers stay quiet too
    node_rank: int = 0  # which task of the job this is (each stages its share: staging.py)
    num_nodes: int = 1


class Reader(ABC):
    """Reads payloads for items, in a worker process."""

    def read_many(self, items: Sequence[Item]) -> Iterator[tuple[Item, bytes | Reject]]:
        for item in items:
            try:
                yield item, self.read(item)
            except Reject as rej:
                yield item, rej
            except OSError as exc:
                yield item, Reject("unreadable", f"{type(exc).__name__}: {exc}")

    @abstractmethod
    def read(self, item: Item) -> bytes:
        """The raw payload of one item (raise Reject or OSError on failure)."""

    def close(self) -> None:  # noqa: B027 (optional hook: most readers hold nothing to release)
        """Release open files and connections."""


class Source(ABC):
    """A dataset family in one concrete layout, local or on the hub."""

    dataset: str = ""  # dataset name recorded in the manifest, e.g. "imagenet"
    fields: tuple[str, ...] = ()  # WebDataset extensions each sample has, in tar member order

    @abstractmethod
    def describe(self) -> dict:
        """Provenance for the manifest: id, revision, layout, local_path."""

    def listing_digest(self) -> str | None:
        """A cheap fingerprint of a local source's files (names, sizes, times); None on the hub,
        where the resolved revision identifies the files."""
        loc = getattr(self, "loc", None)
        return getattr(loc, "listing_digest", None)

    def options(self) -> dict:
        """Source options that change the output bytes (they enter the job fingerprint)."""
        return {}

    @abstractmethod
    def splits(self) -> list[str]:
        """Splits this source can write."""

    @abstractmethod
    def list_items(self, split: str, ctx: ListContext) -> Iterable[Item]:
        """All inputs of `split`, in a deterministic order, iterated once (best a generator)."""

    @abstractmethod
    def open_reader(self, split: str) -> Reader:
        """A reader for `split`'s payloads; called inside each worker process."""

    @abstractmethod
    def encode(self, item: Item, payload: bytes) -> dict[str, bytes]:
        """WebDataset fields for one input, or raise Reject."""

    def manifest_extras(self) -> dict:
        """Extra top-level manifest entries (e.g. class lists)."""
        return {}

    def split_extras(self, split: str, ctx: ListContext) -> dict:
        """Extra entries for the split's manifest section, known once the split is listed
        (e.g. token counts of pre-tokenised text)."""
        return {}
