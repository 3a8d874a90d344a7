"""Tar reading: the fast ustar walk, the tarfile fallback, damage reported per sample."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from trainer.data.shards import Corrupt, ShardError, ShardReader, index_shard


def write_tar(path: str, members: list[tuple[str, bytes]], fmt=tarfile.USTAR_FORMAT) -> None:
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def members(n: int, prefix: str = "") -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        key = f"{prefix}k{i:03d}"
        out += [(f"{key}.jpg", bytes([i]) * (100 + 300 * i)), (f"{key}.cls", str(i).encode())]
    return out


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_index_matches_tarfile_in_every_format(tmp_path, fmt):
    long = "d" * 120 + "/"  # beyond ustar's 100-character name field: GNU/PAX headers
    p = str(tmp_path / "a.tar")
    write_tar(p, members(4) + members(2, prefix=long if fmt != tarfile.USTAR_FORMAT else "sub/"), fmt)
    with open(p, "rb") as f:
        idx = index_shard(p, f)
    assert not idx.truncated and len(idx.keys) == 6
    with tarfile.open(p) as tf:
        for key, mem in zip(idx.keys, idx.members):
            for ext, (off, size) in mem.items():
                ti = tf.getmember(f"{key}.{ext}")
                assert (off, size) == (ti.offset_data, ti.size)
    got = ShardReader().read(p, 6, [5, 0, 3], ("jpg",), ("cls", "txt"))
    assert [g[0] for g in got] == [idx.keys[5], "k000", "k003"]
    assert got[2][1] == {"jpg": bytes([3]) * 1000, "cls": b"3"}


def test_damaged_header_and_truncation_are_per_sample(tmp_path):
    p = str(tmp_path / "b.tar")
    write_tar(p, members(5))
    with tarfile.open(p) as tf:
        third = tf.getmember("k002.jpg")
    raw = bytearray(open(p, "rb").read())
    hdr = third.offset_data - 512
    raw[hdr + 10] ^= 0xFF  # breaks the checksum of sample 2's first header
    open(p, "wb").write(raw)
    got = ShardReader().read(p, 5, [0, 1, 2, 4], ("jpg",))
    assert [type(g) for g in got] == [tuple, tuple, Corrupt, Corrupt]
    assert "missing" in got[2].reason and got[2].key == f"{p}#2"
    # a member cut short: the sample is corrupt, the ones before it are fine
    q = str(tmp_path / "c.tar")
    write_tar(q, members(3))
    with tarfile.open(q) as tf:
        last = tf.getmember("k002.jpg")
    with open(q, "r+b") as f:
        f.truncate(last.offset_data + 10)
    got = ShardReader().read(q, 3, [2, 1], ("jpg",), ("cls",))
    assert isinstance(got[0], Corrupt) and "truncated" in got[0].reason and got[0].key == "k002"
    assert got[1][1]["cls"] == b"1"
    # a required member missing
    got = ShardReader().read(q, 3, [0], ("jpg", "txt"))
    assert isinstance(got[0], Corrupt) and ".txt" in got[0].reason


def test_unreadable_shards_name_themselves(tmp_path):
    with pytest.raises(ShardError, match="shard not found: .*nope.tar"):
        ShardReader().read(str(tmp_path / "nope.tar"), 1, [0], ("jpg",))
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar file")
    with pytest.raises(ShardError, match="bad.tar"):
        ShardReader().read(str(bad), 1, [0], ("jpg",))


def test_fsspec_urls_are_read_too(tmp_path):
    p = str(tmp_path / "u.tar")
    write_tar(p, members(2))
    got = ShardReader().read("file://" + p, 2, [1], ("jpg",))
    assert got[0][0] == "k001"
    import fsspec

    fs = fsspec.filesystem("memory")
    with fs.open("/shards/m.tar", "wb") as f:
        f.write(open(p, "rb").read())
    got = ShardReader().read("memory:///shards/m.tar", 2, [0, 1], ("jpg",))
    assert [g[0] for g in got] == ["k000", "k001"]
    assert not os.path.exists("/shards/m.tar")


def test_loader_reads_a_manifest_behind_an_fsspec_url(tmp_path):
    import fsspec
    import torch

    from loader_fixtures import id_shards
    from trainer.data import DataConfig, build_loader

    d = id_shards(str(tmp_path / "ids"), [3, 2])
    fs = fsspec.filesystem("memory")
    for name in os.listdir(d):
        with fs.open(f"/remote/{name}", "wb") as f:
            f.write(open(os.path.join(d, name), "rb").read())
    cfg = DataConfig(manifests=["memory:///remote"], batch_size=5, num_workers=0, block_size=4, shuffle_buffer=0)
    batch = next(iter(build_loader(cfg, 0, 1, torch.device("cpu"), "text")))
    assert batch["key"] == ["s000_i0000", "s000_i0001", "s000_i0002", "s001_i0000", "s001_i0001"]
    fs.rm("/remote/train-000001.tar")
    with pytest.raises(ShardError, match="memory:///remote/train-000001.tar"):
        list(build_loader(cfg, 0, 1, torch.device("cpu"), "text"))


def write_idx(tar_path: str) -> None:
    """A DALI-style .idx as shardify writes it (v1.2; ext, data offset, size, name per member)."""
    lines, cur, parts = [], None, []
    with tarfile.open(tar_path) as tf:
        for ti in tf.getmembers():
            key, ext = ti.name.split(".", 1)
            if key != cur and parts:
                lines.append(" ".join(parts))
                parts = []
            cur = key
            parts.append(f"{ext} {ti.offset_data} {ti.size} {ti.name}")
    lines.append(" ".join(parts))
    with open(tar_path[:-4] + ".idx", "w") as f:
        f.write(f"v1.2 {len(lines)}\n" + "".join(x + "\n" for x in lines))


def test_idx_file_is_used_when_present(tmp_path):
    p = str(tmp_path / "train-000000.tar")
    write_tar(p, members(4))
    with open(p, "rb") as f:
        scanned = index_shard(p, f)
    write_idx(p)
    with open(p, "rb") as f:
        indexed = index_shard(p, f)
    assert (indexed.keys, indexed.members) == (scanned.keys, scanned.members)
    # the reader follows the index: an index that lists only samples 2 and 3 is what it sees
    text = open(p[:-4] + ".idx").read().splitlines()
    with open(p[:-4] + ".idx", "w") as f:
        f.write("v1.2 2\n" + "\n".join(text[3:]) + "\n")
    got = ShardReader().read(p, 4, [0, 1], ("jpg",), ("cls",))
    assert [g[0] for g in got] == ["k002", "k003"]
    # an unreadable index is ignored (logged), the tar is scanned
    with open(p[:-4] + ".idx", "w") as f:
        f.write("garbage\n")
    got = ShardReader().read(p, 4, [0], ("jpg",))
    assert got[0][0] == "k000"
