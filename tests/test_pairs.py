"""shardify pairs on local fixtures in the real layouts: COCO Karpathy, Flickr30k, CC3M/CC12M wds."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from click.testing import CliRunner
from PIL import Image

import text_pair_fixtures as fx
from shardify.cli import main
from shardify.job import JobOptions, run_job
from shardify.sources.pairs import ImageOptions
from shardify.sources.pairs_wds import CC3MSource
from shardify.sources.pairs_zip import CocoKarpathySource, Flickr30kSource
from shardify.storage import local_location
from shardify.verify import verify
from test_owt import read_wds, rejects


def _run(source, out, splits, **kw):
    return run_job(source, out, splits, JobOptions(progress=False, **kw), log=lambda m: None)


def _cli(args):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result


def test_coco_karpathy_pairs(tmp_path):
    expected = fx.make_coco_karpathy(tmp_path / "src")
    src = CocoKarpathySource(local_location(str(tmp_path / "src")))
    out = tmp_path / "out"
    manifest = _run(src, out, ["train", "test"], samples_per_shard=3, workers=2)
    assert verify(out) == []
    got = read_wds(out, "train")
    # train = train + restval, one sample per (image, caption)
    assert len(got) == len(expected["train"]) == manifest["splits"]["train"]["samples"] == 10
    for cocoid, k, caption in expected["train"]:
        s = got[f"coco{cocoid}-{k}"]
        assert s["txt"].decode() == caption
        meta = json.loads(s["json"])
        assert meta["image_id"] == cocoid and meta["caption_index"] == k
        assert meta["karpathy_split"] in ("train", "restval")
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and img.mode in ("RGB", "L")
        assert (meta["width"], meta["height"]) == img.size
    cmyk = [json.loads(s["json"]) for s in got.values() if json.loads(s["json"])["reencoded_from"]]
    assert cmyk and all(m["reencoded_from"] == "cmyk-jpeg" for m in cmyk)
    assert len(read_wds(out, "test")) == len(expected["test"])


def test_coco_original_jpeg_bytes_kept_and_max_side(tmp_path):
    fx.make_coco_karpathy(tmp_path / "src", cmyk_one=False)
    import zipfile

    with zipfile.ZipFile(tmp_path / "src" / "train2014.zip") as z:
        member = z.namelist()[0]
        original = z.read(member)
    src = CocoKarpathySource(local_location(str(tmp_path / "src")))
    _run(src, tmp_path / "out", ["train"])
    cocoid = int(member.rsplit("_", 1)[1].split(".")[0])
    assert read_wds(tmp_path / "out", "train")[f"coco{cocoid}-0"]["jpg"] == original
    small = CocoKarpathySource(local_location(str(tmp_path / "src")), ImageOptions(max_side=16))
    _run(small, tmp_path / "small", ["train"])
    for s in read_wds(tmp_path / "small", "train").values():
        meta = json.loads(s["json"])
        assert max(Image.open(io.BytesIO(s["jpg"])).size) == 16 == max(meta["width"], meta["height"])
        assert max(meta["orig_width"], meta["orig_height"]) > 16


def test_coco_missing_image_is_a_reject(tmp_path):
    fx.make_coco_karpathy(tmp_path / "src")
    ann = json.loads((tmp_path / "src" / "dataset_coco.json").read_text())
    ann["images"][0]["filename"] = "COCO_train2014_999999999999.jpg"
    (tmp_path / "src" / "dataset_coco.json").write_text(json.dumps(ann))
    src = CocoKarpathySource(local_location(str(tmp_path / "src")))
    manifest = _run(src, tmp_path / "out", ["train"])
    assert manifest["splits"]["train"]["rejected"] == 2  # both captions of that image
    assert {r["reason"] for r in rejects(tmp_path / "out")} == {"missing"}


def test_flickr30k_pairs(tmp_path):
    expected = fx.make_flickr30k(tmp_path / "src")
    src = Flickr30kSource(local_location(str(tmp_path / "src")))
    out = tmp_path / "out"
    for split in ("train", "test"):
        _run(src, out, [split], samples_per_shard=4)
    assert verify(out) == []
    for split in ("train", "test"):
        got = read_wds(out, split)
        assert len(got) == len(expected[split])
        for stem, k, caption in expected[split]:
            s = got[f"f30k{stem}-{k}"]
            assert s["txt"].decode() == caption and json.loads(s["json"])["image_id"] == int(stem)


def test_cc3m_wds_reshard_without_reencoding(tmp_path):
    expected = fx.make_wds_mirror(tmp_path / "src", "cc3m", "train", shards=2, per_shard=4)
    fx.make_wds_mirror(tmp_path / "src", "cc3m", "validation", shards=1, per_shard=2)
    originals = {}
    for p in sorted((tmp_path / "src").glob("cc3m-train-*.tar")):
        with tarfile.open(p) as t:
            for m in t:
                if m.name.endswith(".jpg"):
                    originals[m.name[:-4]] = t.extractfile(m).read()
    src = CC3MSource(local_location(str(tmp_path / "src")))
    assert src.splits() == ["train", "validation"]
    out = tmp_path / "out"
    manifest = _run(src, out, ["train", "validation"], samples_per_shard=3, workers=2)
    assert manifest["source"]["layout"] == "wds"
    assert verify(out) == []
    got = read_wds(out, "train")
    assert len(got) == len(expected)
    for key, caption, url in expected:
        s = got[f"train-{key}"]
        meta = json.loads(s["json"])
        assert s["txt"].decode() == caption and meta["url"] == url and meta["image_id"] == key
        if not meta.get("reencoded_from"):
            assert s["jpg"] == originals[key]  # original bytes, not re-encoded
        else:
            assert meta["reencoded_from"] == "png"


def test_shards_identical_for_any_worker_count(tmp_path):
    fx.make_wds_mirror(tmp_path / "src", "cc12m", "train", shards=2, per_shard=5)
    from shardify.sources.pairs_wds import CC12MSource

    shas = []
    for workers in (1, 2):
        m = _run(CC12MSource(local_location(str(tmp_path / "src"))), tmp_path / f"o{workers}", ["train"],
                 samples_per_shard=3, workers=workers)
        shas.append([s["sha256"] for s in m["splits"]["train"]["shards"]])
    assert shas[0] == shas[1]


def test_cli_pairs_and_openwebtext(tmp_path):
    fx.make_coco_karpathy(tmp_path / "coco")
    r = _cli(["pairs", "coco-karpathy", "--source", str(tmp_path / "coco"), "--out", str(tmp_path / "o"),
              "--split", "train", "--no-progress", "--samples-per-shard", "4", "--max-reject-rate", "0"])
    assert r.exit_code == 0, r.output
    assert "train: inputs = written + rejected: 10 = 10 + 0" in r.output
    assert _cli(["verify", str(tmp_path / "o"), "--no-progress"]).exit_code == 0

    r = _cli(["pairs", "coco-karpathy", "--out", str(tmp_path / "o2"), "--no-progress"])
    assert r.exit_code == 2 and "--source" in r.output

    fx.make_owt_slices(tmp_path / "owt", slices=(0, 1), members=1, docs=3)
    for split, slices in (("train", "0"), ("validation", "1")):
        r = _cli(["openwebtext", "--source", str(tmp_path / "owt"), "--out", str(tmp_path / "t"),
                  "--split", split, "--slices", slices, "--split-slices", "train=0",
                  "--split-slices", "validation=1", "--no-progress", "--max-reject-rate", "0.5"])
        assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert set(manifest["splits"]) == {"train", "validation"}

    r = _cli(["openwebtext", "--source", str(tmp_path / "owt"), "--out", str(tmp_path / "k"),
              "--split", "train", "--slices", "0-1", "--split-slices", "train=0-1",
              "--tokenizer", str(Path(__file__).parent.parent / "no-such-tokenizer-dir"), "--no-progress"])
    assert r.exit_code == 2
