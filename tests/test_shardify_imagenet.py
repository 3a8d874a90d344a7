"""`shardify imagenet` end to end on generated copies of ImageNet in each layout."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import imagenet_fixtures as fx
from imagenet_fixtures import run_cli, shard
from shardify.cli import main

LAYOUTS = list(fx.LAYOUT_WRITERS)


def read_shards(out: Path, split: str) -> dict:
    """key -> {ext: bytes} for every sample of a split, read with plain tarfile."""
    manifest = json.loads((out / "manifest.json").read_text())
    samples = {}
    for sh in manifest["splits"][split]["shards"]:
        with tarfile.open(out / sh["name"]) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def tree_bytes(out: Path) -> dict:
    """Every output file (not the work state) with its sha256."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {name: write(root / name) for name, write in fx.LAYOUT_WRITERS.items()}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_every_layout(sources, tmp_path, layout):
    out = tmp_path / "out"
    result = shard(sources[layout], out, "--workers", 2)
    assert "train: inputs = written + rejected: 19 = 14 + 5" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["layout"] == layout
    assert manifest["totals"] == {**manifest["totals"], "inputs": 31, "samples": 26, "rejected": 5}

    expected = {image_id: (synset, data, outcome) for image_id, synset, data, outcome
                in fx.all_inputs("train")}
    train = read_shards(out, "train")
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert {r["key"]: r["reason"] for r in rejects} == {
        k: o.split(":")[1] for k, (_, _, o) in expected.items() if o.startswith("reject")}
    for key, (synset, data, outcome) in expected.items():
        if outcome.startswith("reject"):
            assert key not in train
            continue
        sample = train[key]
        assert int(sample["cls"]) == fx.SYNSETS.index(synset)
        meta = json.loads(sample["json"])
        assert meta["synset"] == synset
        if outcome == "ok":
            assert sample["jpg"] == data and meta["reencoded_from"] == ""  # original bytes kept
        else:
            assert meta["reencoded_from"] == outcome.split(":")[1]
    # Balanced shards: samples + rejects differ by at most one input between shards.
    inputs = [sh["inputs"] for sh in manifest["splits"]["train"]["shards"]]
    assert max(inputs) - min(inputs) <= 1
    assert run_cli("verify", out, "--full", "--no-progress").output.strip().endswith("OK")


def test_all_layouts_give_the_same_samples(sources, tmp_path):
    contents = []
    for layout in LAYOUTS:
        shard(sources[layout], tmp_path / layout)
        data = read_shards(tmp_path / layout, "train")
        contents.append({k: (v["jpg"], v["cls"]) for k, v in data.items()})
        # Within a shard, order is the seeded order, the same for every layout.
        manifest = json.loads((tmp_path / layout / "manifest.json").read_text())
        contents.append(manifest["splits"]["train"]["shards"][0]["first_key"])
    assert all(c == contents[0] for c in contents[0::2])
    assert all(c == contents[1] for c in contents[1::2])


def test_output_is_identical_for_any_number_of_workers_and_nodes(sources, tmp_path):
    src = sources["archives"]
    shard(src, tmp_path / "w1", "--workers", 1)
    shard(src, tmp_path / "w2", "--workers", 2)
    for rank in (1, 0):  # order of nodes does not matter
        result = shard(src, tmp_path / "n2", "--num-nodes", 2, "--node-rank", rank)
        assert "run `shardify finalize" in result.output or "finalize" in result.output
    assert not (tmp_path / "n2" / "manifest.json").exists()
    run_cli("finalize", tmp_path / "n2", "--max-reject-rate", 0.5)
    assert tree_bytes(tmp_path / "w1") == tree_bytes(tmp_path / "w2") == tree_bytes(tmp_path / "n2")


def test_finalize_names_what_is_missing(sources, tmp_path):
    out = tmp_path / "out"
    shard(sources["imagefolder"], out, "--num-nodes", 3, "--node-rank", 0)
    result = CliRunner().invoke(main, ["finalize", str(out)])
    assert result.exit_code == 2
    assert "train-000001.tar is missing (node 1 of 3 has not finished it)" in result.output
    assert not (out / "manifest.json").exists()


def test_different_options_are_refused_unless_overwrite(sources, tmp_path):
    out = tmp_path / "out"
    shard(sources["wds"], out)
    before = tree_bytes(out)
    result = shard(sources["wds"], out, "--seed", 7, expect=2)
    assert "other options (seed: 0 -> 7)" in result.output and "--overwrite" in result.output
    assert tree_bytes(out) == before
    shard(sources["wds"], out, "--seed", 7, "--overwrite")
    assert tree_bytes(out) != before
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["seed"] == 7


def test_rerun_of_a_finished_job_changes_nothing(sources, tmp_path):
    out = tmp_path / "out"
    shard(sources["parquet"], out)
    before = tree_bytes(out)
    result = shard(sources["parquet"], out)
    assert "(4 already complete)" in result.output
    assert tree_bytes(out) == before


def test_reject_budget_sets_the_exit_status(sources, tmp_path):
    result = run_cli("imagenet", "--source", sources["imagefolder"], "--out", tmp_path / "o",
                     "--no-progress", "--max-reject-rate", 0.01, expect=1)
    assert "above --max-reject-rate" in result.output
    assert (tmp_path / "o" / "manifest.json").exists()  # the good samples are still written


def test_split_option_and_unknown_split(sources, tmp_path):
    shard(sources["archives"], tmp_path / "v", "--split", "validation")
    manifest = json.loads((tmp_path / "v" / "manifest.json").read_text())
    assert list(manifest["splits"]) == ["validation"]
    result = CliRunner().invoke(main, ["imagenet", "--source", str(sources["archives"]), "--out",
                                       str(tmp_path / "t"), "--split", "test"])
    assert result.exit_code == 2 and "split 'test' is not in this source" in result.output


def test_missing_source_dir_and_unrecognised_layout(tmp_path):
    result = CliRunner().invoke(main, ["imagenet", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no such directory" in result.output
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    result = CliRunner().invoke(main, ["imagenet", "--source", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "cannot recognise an ImageNet layout" in result.output


def test_read_back_with_webdataset_and_datasets(sources, tmp_path):
    import datasets
    import webdataset as wds

    out = tmp_path / "out"
    shard(sources["imagefolder"], out)
    manifest = json.loads((out / "manifest.json").read_text())
    urls = [str(out / sh["name"]) for sh in manifest["splits"]["train"]["shards"]]
    via_wds = {s["__key__"]: (int(s["cls"]), s["jpg"]) for s in wds.WebDataset(urls, shardshuffle=False)}
    via_tar = {k: (int(v["cls"]), v["jpg"]) for k, v in read_shards(out, "train").items()}
    assert via_wds == via_tar and len(via_wds) == 14
    ds = datasets.load_dataset("webdataset", data_files={"train": urls}, split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    ds = ds.cast_column("jpg", datasets.Image(decode=False))
    via_hf = {row["__key__"]: (int(row["cls"]), row["jpg"]["bytes"]) for row in ds}
    assert via_hf == via_tar


def test_verify_finds_corruption_and_missing_files(sources, tmp_path):
    out = tmp_path / "out"
    shard(sources["archives"], out)
    tar = out / "train-000001.tar"
    data = bytearray(tar.read_bytes())
    data[2000] ^= 0xFF
    tar.write_bytes(bytes(data))
    (out / "validation-000000.tar").unlink()
    result = CliRunner().invoke(main, ["verify", str(out), "--no-progress"])
    assert result.exit_code == 1
    assert "train-000001.tar: sha256 mismatch" in result.output
    assert "validation-000000.tar: missing" in result.output


def test_inspect_summary_and_grid(sources, tmp_path):
    from PIL import Image

    out = tmp_path / "out"
    shard(sources["archives"], out)
    result = run_cli("inspect", out, "--grid", tmp_path / "grid.png", "-n", 8)
    assert "train     14 samples in 4 shards" in result.output
    assert "too_many_pixels: 1" in result.output
    with Image.open(tmp_path / "grid.png") as img:
        assert img.width > 0 and img.height > 0


def _make_many(root: Path, n_per_class: int) -> Path:
    return fx.write_imagefolder(root, per_class=n_per_class, specials=True)


@pytest.mark.slow
def test_kill_and_rerun_gives_identical_output(tmp_path):
    src = _make_many(tmp_path / "src", 60)
    cmd = [sys.executable, "-m", "shardify", "imagenet", "--source", str(src), "--samples-per-shard", "2",
           "--max-reject-rate", "0.5", "--no-progress", "--split", "train"]
    subprocess.run(cmd + ["--out", str(tmp_path / "ref")], check=True, capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("train-*.tar"))) < 5:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    done_before = len(list(out.glob("train-*.tar")))
    rerun = subprocess.run(cmd + ["--out", str(out)], check=True, capture_output=True, text=True)
    assert f"({done_before} already complete)" in rerun.stderr
    assert tree_bytes(out) == tree_bytes(tmp_path / "ref")
    assert not list(out.rglob("*.tmp-*"))


def test_a_node_leaves_other_nodes_temporaries_alone(sources, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    other = out / ".train-000000.tar.tmp-otherhost-4242"  # node 0 is writing shard 0 right now
    other.write_bytes(b"half a shard")
    mine = out / ".train-000001.tar.tmp-deadhost-1"  # node 1's own leftover from a crash
    mine.write_bytes(b"stale")
    shard(sources["archives"], out, "--num-nodes", 2, "--node-rank", 1)
    assert other.exists() and not mine.exists()
    shard(sources["archives"], out, "--num-nodes", 2, "--node-rank", 0)
    run_cli("finalize", out, "--max-reject-rate", 0.5)
    assert not other.exists()  # finalize runs when every node is done: leftovers go


def test_node_split_defaults_from_a_slurm_array(sources, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")  # the second task of an array 4-5
    result = shard(sources["wds"], out, "--split", "train")
    assert "this node writes 2" in result.output and not (out / "manifest.json").exists()
    assert sorted(p.name for p in out.glob("train-*.tar")) == ["train-000001.tar", "train-000003.tar"]


def test_the_unlabelled_test_split_has_no_cls_and_no_rejects(tmp_path):
    src = fx.write_archives(tmp_path / "src", specials=False)
    images = fx.good_images("validation", per_class=2)
    with tarfile.open(src / "data" / "test_images.tar.gz", "w:gz") as tar:
        for k, (_, _, data) in enumerate(images):
            fx._tar_add(tar, f"ILSVRC2012_test_{k + 1:08d}.JPEG", data)
    shard(src, tmp_path / "out", "--split", "test")
    samples = read_shards(tmp_path / "out", "test")
    assert len(samples) == len(images) and all(set(s) == {"jpg", "json"} for s in samples.values())
    assert (tmp_path / "out" / "rejects.jsonl").read_text() == ""


@pytest.mark.parametrize("change", ["add", "remove"])
def test_a_changed_local_source_is_rewritten_on_rerun(tmp_path, change):
    src = fx.write_imagefolder(tmp_path / "src", per_class=4, specials=False)
    out = tmp_path / "out"
    shard(src, out, "--split", "train", "--samples-per-shard", 4)
    folder = src / "train" / fx.SYNSETS[0]
    if change == "add":  # one more image: the plan changes, the old shards are stale
        (folder / f"{fx.SYNSETS[0]}_00099.JPEG").write_bytes(fx.jpeg_bytes(99))
    else:  # a class fewer: fewer shards, the last old one must not stay behind
        for path in folder.iterdir():
            path.unlink()
    shard(src, out, "--split", "train", "--samples-per-shard", 4)
    shard(src, tmp_path / "fresh", "--split", "train", "--samples-per-shard", 4)
    assert tree_bytes(out) == tree_bytes(tmp_path / "fresh")
    assert run_cli("verify", out, "--no-progress").output.strip().endswith("OK")


def test_an_unwritable_output_is_one_line(sources, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = CliRunner().invoke(main, ["imagenet", "--source", str(sources["wds"]), "--out", str(blocker / "out")])
    assert result.exit_code == 2 and result.output.startswith("error: ") and len(result.output.splitlines()) == 1
