"""shardify/sources/wds_tar.py groups a WebDataset tar's members into samples as webdataset does."""

from __future__ import annotations

import io
import tarfile

from shardify.sources.wds_tar import image_member, tar_samples


def _tar(path, members):
    """A plain tar of (name, bytes) files; a name ending in / is a directory."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name.rstrip("/"))
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


MEMBERS = [
    ("shard/", b""),
    ("shard/a.jpg", b"A-jpg"),
    ("shard/a.cls", b"3"),
    ("shard/a.seg.npy", b"A-seg"),  # an extension with a dot
    ("shard/README", b"no dot: no sample"),
    ("shard/b.PNG", b"B-png"),  # upper case: ext png
    ("shard/b.txt", b"B caption"),
    ("shard/c.txt", b"C caption, no image"),
    ("shard/d.webp", b"D-webp"),
    ("shard/d.jpg", b"D-jpg"),  # two images: jpg comes first in IMAGE_EXTS
]


def test_groups_like_webdatasets_own_reader(tmp_path):
    import webdataset.tariterators as wti

    path = tmp_path / "s.tar"
    _tar(path, MEMBERS)
    with tarfile.open(path) as tar:
        ours = [(key, {ext: data for ext, (_, data) in group.items()})
                for key, group in tar_samples(tar, lambda ext: True)]
    with open(path, "rb") as stream:
        theirs = [(s["__key__"].rsplit("/", 1)[-1], {k: v for k, v in s.items() if not k.startswith("__")})
                  for s in wti.group_by_keys(wti.tar_file_expander([{"url": str(path), "stream": stream}]))]
    assert ours == theirs
    assert [k for k, _ in ours] == ["a", "b", "c", "d"]


def test_reads_only_what_is_asked_and_picks_the_image(tmp_path):
    path = tmp_path / "s.tar"
    _tar(path, MEMBERS)
    with tarfile.open(path) as tar:
        samples = dict(tar_samples(tar, lambda ext: ext == "cls"))
    assert samples["a"]["cls"][1] == b"3" and samples["a"]["jpg"][1] is None
    assert samples["a"]["jpg"][0].name == "shard/a.jpg"
    assert image_member(samples["b"])[0].name == "shard/b.PNG"
    assert image_member(samples["c"]) is None
    assert image_member(samples["d"])[0].name == "shard/d.jpg"
    with tarfile.open(path, mode="r|") as tar:  # a stream: bytes are read as the members pass
        streamed = {k: g for k, g in tar_samples(tar, lambda ext: ext in ("jpg", "webp"))}
    assert streamed["d"]["webp"][1] == b"D-webp" and streamed["d"]["jpg"][1] == b"D-jpg"
