"""The fast tar writer produces exactly what Python's tarfile would, plus correct stats."""

import hashlib
import io
import tarfile

import pytest

from shardify.tarwriter import RECORD, ShardTarWriter, member_header


@pytest.mark.parametrize("name,size", [("a.jpg", 0), ("n01440764_10026.jpg", 110_000),
                                       ("k" * 96 + ".cls", 1)])
def test_header_matches_tarfile(name, size):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = size, 0, 0o644, 0, 0
    info.uname = info.gname = ""
    assert member_header(name, size) == info.tobuf(format=tarfile.USTAR_FORMAT)


def test_names_over_100_bytes_are_refused():
    with pytest.raises(ValueError, match="longer than 100 bytes"):
        member_header("x" * 150 + ".json", 7)


def test_writer_output_equals_tarfile_and_stats_are_right(tmp_path):
    samples = [(f"s{i:03d}", {"json": b"{}", "jpg": bytes([i]) * (i * 300 + 1), "cls": str(i).encode()})
               for i in range(7)]
    path = tmp_path / "x.tar"
    w = ShardTarWriter(path, ("cls", "jpg", "json"))
    for key, fields in samples:
        w.write_sample(key, fields)
    stats = w.close()
    data = path.read_bytes()

    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, fields in samples:
            for ext in ("cls", "jpg", "json"):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uid, info.gid = len(fields[ext]), 0, 0o644, 0, 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(fields[ext]))
    assert data == ref.getvalue()
    assert len(data) % RECORD == 0
    assert stats == {"samples": 7, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                     "first_key": "s000", "last_key": "s006"}
    # The .idx offsets point at each member's bytes.
    for line in w.index_text().splitlines()[1:]:
        fields = line.split(" ")
        for j in range(0, len(fields), 4):
            ext, off, size, member = fields[j:j + 4]
            key = member.split(".")[0]
            assert data[int(off):int(off) + int(size)] == dict(samples)[key][ext]
