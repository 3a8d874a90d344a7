"""shardify/checksum.py: the one sha256-of-a-file helper (shard checks, tokenizer fingerprints)."""

import hashlib

from shardify.checksum import CHUNK, sha256_file


def test_sha256_file_over_several_chunks_reports_progress(tmp_path):
    data = bytes(range(256)) * (CHUNK // 256 * 2 + 3)  # two full chunks and a short one
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    seen = []
    assert sha256_file(path, seen.append) == hashlib.sha256(data).hexdigest()
    assert seen == [CHUNK, CHUNK, 768]
    assert sha256_file(str(path)) == hashlib.sha256(data).hexdigest()
