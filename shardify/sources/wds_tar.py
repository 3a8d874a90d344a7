"""Reading a WebDataset tar back as samples: its members grouped by key, in tar order.

One rule for every source that reads WebDataset tars (the ImageNet mirror, CC3M/CC12M): a
member `dir/KEY.EXT` belongs to sample KEY (the base name up to its first dot; EXT lower-cased,
may hold dots: `seg.npy`), and the members of a sample are adjacent. Members that are not
regular files, or whose base name has no dot, belong to no sample (webdataset's own reader
skips them the same way).
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the image member of a sample: the first of these it has


def tar_samples(tar: tarfile.TarFile, read: Callable[[str], bool]) -> Iterator[tuple[str, dict]]:
    """(key, {ext: (member, bytes or None)}) per sample. The bytes of a member are read when
    `read(ext)` is true (the tar may be a stream: later is too late); a repeated extension keeps
    its first member."""
    key, group = None, {}
    for member in tar:
        name = member.name.rsplit("/", 1)[-1]
        if not member.isfile() or "." not in name:
            continue
        base, ext = name.split(".", 1)
        ext = ext.lower()
        if base != key:
            if key is not None:
                yield key, group
            key, group = base, {}
        if ext not in group:
            group[ext] = (member, tar.extractfile(member).read() if read(ext) else None)
    if key is not None:
        yield key, group


def image_member(group: dict):
    """The sample's image as (member, bytes or None), or None when it has none."""
    return next((group[e] for e in IMAGE_EXTS if e in group), None)
