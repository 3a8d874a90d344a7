"""GLUE fine-tuning of a text student: `trainer eval glue --task sst2 --data DIR STUDENT`.

Fine-tunes a text encoder (an exported student, a checkpoint or run directory of a text task, or
a Hugging Face BERT directory) on one GLUE task from local parquet files laid out as the hub's
`nyu-mll/glue` (`<task>/train-*.parquet`, `<task>/validation-*.parquet`; MNLI has
`validation_matched-*` and `validation_mismatched-*`), then scores its validation split(s) with the
task's metric. The head is BERT's: a tanh-activated dense layer on the [CLS] token (the student's
pooler was dropped), dropout, and a linear classifier (one output for STS-B, a regression).

Metrics: accuracy (SST-2, QNLI, RTE, MNLI matched/mismatched), F1 of class 1 and accuracy (MRPC,
QQP), Matthews correlation (CoLA), Spearman and Pearson correlation (STS-B). `score` is the
first-named metric of the task (for MNLI: matched accuracy).

The result JSON holds the metrics, the student's source and step, the options, and every data
file used with its size and sha256.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from torch import nn

from trainer.errors import UserError

from .benchmarks import resolve_device
from .features import file_sha256


@dataclass(frozen=True)
class GlueTask:
    name: str
    columns: tuple[str, ...]  # one text column, or the two of a pair
    num_labels: int  # 1: regression
    metrics: tuple[str, ...]  # the first is the score
    eval_splits: tuple[str, ...]


GLUE_TASKS: dict[str, GlueTask] = {t.name: t for t in (
    GlueTask("cola", ("sentence",), 2, ("matthews",), ("validation",)),
    GlueTask("sst2", ("sentence",), 2, ("accuracy",), ("validation",)),
    GlueTask("mrpc", ("sentence1", "sentence2"), 2, ("f1", "accuracy"), ("validation",)),
    GlueTask("qqp", ("question1", "question2"), 2, ("f1", "accuracy"), ("validation",)),
    GlueTask("stsb", ("sentence1", "sentence2"), 1, ("spearman", "pearson"), ("validation",)),
    GlueTask("qnli", ("question", "sentence"), 2, ("accuracy",), ("validation",)),
    GlueTask("rte", ("sentence1", "sentence2"), 2, ("accuracy",), ("validation",)),
    GlueTask("mnli", ("premise", "hypothesis"), 3, ("accuracy",), ("validation_matched", "validation_mismatched")),
)}


def task_named(name: str) -> GlueTask:
    key = name.lower().replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        raise UserError(f"unknown GLUE task {name!r} (one of {', '.join(GLUE_TASKS)})")
    return GLUE_TASKS[key]


# -- metrics -----------------------------------------------------------------------------------


def accuracy(pred: np.ndarray, label: np.ndarray) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(label))) if len(label) else 0.0


def f1_binary(pred: np.ndarray, label: np.ndarray) -> float:
    """F1 of class 1; 0 when there is no true and no predicted positive."""
    pred, label = np.asarray(pred), np.asarray(label)
    tp = int(np.sum((pred == 1) & (label == 1)))
    fp = int(np.sum((pred == 1) & (label != 1)))
    fn = int(np.sum((pred != 1) & (label == 1)))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def matthews(pred: np.ndarray, label: np.ndarray) -> float:
    """Matthews correlation of two binary labellings; 0 when one of them is constant."""
    pred, label = np.asarray(pred) == 1, np.asarray(label) == 1
    tp, tn = float(np.sum(pred & label)), float(np.sum(~pred & ~label))
    fp, fn = float(np.sum(pred & ~label)), float(np.sum(~pred & label))
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / den if den else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    xc, yc = x - x.mean(), y - y.mean()
    den = math.sqrt(float(np.sum(xc * xc)) * float(np.sum(yc * yc)))
    return float(np.sum(xc * yc)) / den if den else 0.0


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of their ranks (as Spearman's rho needs)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(average_ranks(x), average_ranks(y))


METRICS = {"accuracy": accuracy, "f1": f1_binary, "matthews": matthews, "pearson": pearson, "spearman": spearman}


def task_metrics(task: GlueTask, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's metrics from raw model outputs ([N, num_labels] logits, or [N] scores)."""
    pred = outputs.reshape(-1) if task.num_labels == 1 else outputs.argmax(-1)
    return {m: METRICS[m](pred, labels) for m in task.metrics}


# -- data --------------------------------------------------------------------------------------


def split_files(data_dir: str | Path, task: GlueTask, split: str) -> list[Path]:
    """`<dir>/<task>/<split>-*.parquet` (or `<split>.parquet`); DIR may also be the task folder."""
    root = Path(data_dir)
    base = root / task.name if (root / task.name).is_dir() else root
    files = sorted(base.glob(f"{split}-*.parquet")) + sorted(base.glob(f"{split}.parquet"))
    if not files:
        raise UserError(f"no {task.name} {split} files: expected {root / task.name}/{split}-*.parquet "
                        "(the layout of the hub's nyu-mll/glue)")
    return files


def read_split(files: list[Path], task: GlueTask) -> tuple[list[tuple[str, ...]], np.ndarray]:
    """(texts, labels) of parquet files; a missing column or a bad label is a one-line error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts: list[tuple[str, ...]] = []
    labels: list = []
    for f in files:
        try:
            table = pq.read_table(f, columns=[*task.columns, "label"])
        except (pa.ArrowInvalid, KeyError, OSError) as exc:
            raise UserError(f"{f}: cannot read the columns {', '.join((*task.columns, 'label'))} "
                            f"({str(exc).splitlines()[0]})") from None
        cols = [table.column(c).to_pylist() for c in task.columns]
        for row in zip(*cols):
            texts.append(tuple("" if v is None else str(v) for v in row))
        labels.extend(table.column("label").to_pylist())
    if any(v is None for v in labels):
        raise UserError(f"{files[0].parent}: a label is missing")
    y = np.asarray(labels, dtype=np.float64 if task.num_labels == 1 else np.int64)
    if task.num_labels > 1 and len(y) and (y.min() < 0 or y.max() >= task.num_labels):
        raise UserError(f"{files[0].parent}: labels must lie in 0..{task.num_labels - 1} "
                        f"(found {int(y.min())}..{int(y.max())}; test splits have none)")
    return texts, y


def pair_lengths(n1: int, n2: int, budget: int) -> tuple[int, int]:
    """How many tokens of each text of a pair to keep: the "longest first" rule exactly as the
    `tokenizers` library (transformers' fast BERT tokenizer) applies it; the second text gets
    the odd token when both are cut to half."""
    if n1 + n2 <= budget:
        return n1, n2
    swap = n1 > n2
    if swap:
        n1, n2 = n2, n1
    n2 = n1 if n1 > budget else max(n1, budget - n1)
    if n1 + n2 > budget:
        n1 = budget // 2
        n2 = n1 + budget % 2
    return (n2, n1) if swap else (n1, n2)


def encode_examples(tok, texts: list[tuple[str, ...]], max_len: int) -> list[tuple[list[int], list[int]]]:
    """[CLS] a [SEP] (b [SEP]) ids and their segment ids, cut to max_len (pairs longest first),
    as transformers' BERT tokenizer encodes GLUE examples."""
    from shardify.tokenize import special_ids

    sp = special_ids(tok)
    n_text = len(texts[0]) if texts else 1
    enc = [[e.ids for e in tok.encode_batch([t[i] for t in texts], add_special_tokens=False)]
           for i in range(n_text)] if texts else []
    out = []
    for k in range(len(texts)):
        a = enc[0][k]
        if n_text == 1:
            a = a[: max_len - 2]
            out.append(([sp.cls, *a, sp.sep], [0] * (len(a) + 2)))
            continue
        b = enc[1][k]
        la, lb = pair_lengths(len(a), len(b), max_len - 3)
        out.append(([sp.cls, *a[:la], sp.sep, *b[:lb], sp.sep], [0] * (la + 2) + [1] * (lb + 1)))
    return out


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Pad to the longest of the batch: ids, padding mask (True = padding), segment ids."""
    T = max(len(e[0]) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    types = torch.zeros((len(examples), T), dtype=torch.long)
    pad = torch.ones((len(examples), T), dtype=torch.bool)
    for b, (i, t) in enumerate(examples):
        ids[b, : len(i)] = torch.tensor(i)
        types[b, : len(t)] = torch.tensor(t)
        pad[b, : len(i)] = False
    return ids, pad, types


# -- the student -------------------------------------------------------------------------------


@dataclass
class TextStudent:
    encoder: nn.Module
    tokenizer: str  # path of the tokenizer it reads
    info: dict  # source, kind, task, step


def _tokenizer_in(path: str | None) -> str | None:
    if not path:
        return None
    p = Path(path).expanduser()
    if p.is_file():
        return str(p)
    for name in ("tokenizer.json", "vocab.txt"):
        if (p / name).is_file():
            return str(p / name)
    return None


def load_text_student(path: str, tokenizer: str = "") -> TextStudent:
    """A text encoder and its tokenizer from an HF BERT directory, an exported student, a
    checkpoint or a run directory."""
    from trainer.models.text import BertTextEncoder, load_bert

    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"student not found: {p}")
    if p.is_dir() and (p / "config.json").is_file():  # a Hugging Face BERT directory
        enc = BertTextEncoder(load_bert(str(p)))
        tok = tokenizer or _tokenizer_in(str(p))
        info = {"source": str(p), "kind": "hf-bert", "task": None, "step": None}
    else:
        from trainer.export import load_student

        loaded = load_student(str(p))
        if "text" not in loaded.encoders:
            raise UserError(f"{p}: the {loaded.task} student has no text encoder")
        enc = loaded.encoders["text"]
        cfg = loaded.config or {}
        # the run's own tokenizer, else the one shipped with its teacher
        tok = (tokenizer or _tokenizer_in((cfg.get("data") or {}).get("tokenizer"))
               or _tokenizer_in((cfg.get("teacher") or {}).get("path")))
        info = {"source": str(loaded.source), "kind": "shardify-kd-student", "task": loaded.task, "step": loaded.step}
    if not tok:
        raise UserError(f"no tokenizer found for {p}: give --tokenizer (tokenizer.json or vocab.txt)")
    return TextStudent(enc, str(tok), info)


class GlueModel(nn.Module):
    """Encoder + BERT-style head on the [CLS] token."""

    def __init__(self, encoder: nn.Module, dim: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.takes_types = "token_type_ids_BT" in inspect.signature(encoder.forward).parameters
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Dropout(dropout), nn.Linear(dim, num_labels))

    def forward(self, ids: torch.Tensor, pad: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(ids, pad, token_type_ids_BT=types) if self.takes_types else self.encoder(ids, pad)
        return self.head(tokens[:, 0].float())


# -- fine-tuning -------------------------------------------------------------------------------


@dataclass
class GlueOptions:
    student: str
    task: str
    data: str
    out: str = ""  # result JSON; default glue_<task>.json in the current directory
    tokenizer: str = ""
    epochs: float = 3.0
    batch_size: int = 32
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    max_len: int = 128
    seed: int = 0
    device: str = "auto"
    max_train_samples: int = 0  # 0: all
    max_eval_samples: int = 0  # 0: all


def _predict(model: GlueModel, data: list, pad_id: int, bs: int, device: torch.device) -> np.ndarray:
    model.eval()
    outs = []
    with torch.no_grad(), _autocast(device):
        for i in range(0, len(data), bs):
            ids, pad, types = (t.to(device) for t in collate(data[i:i + bs], pad_id))
            outs.append(model(ids, pad, types).float().cpu())
    return torch.cat(outs).numpy() if outs else np.zeros((0, 1))


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def run_glue(opts: GlueOptions) -> dict[str, Any]:
    """Fine-tune and score; writes the result JSON and returns it."""
    from trainer.data.text import load_tokenizer
    from shardify.tokenize import special_ids

    task = task_named(opts.task)
    for name, ok in (("--epochs must be above 0", opts.epochs > 0), ("--batch-size must be at least 1", opts.batch_size >= 1),
                     ("--lr must be above 0", opts.lr > 0), ("--max-len must be at least 8", opts.max_len >= 8)):
        if not ok:
            raise UserError(name)
    files = {"train": split_files(opts.data, task, "train")}
    for s in task.eval_splits:
        files[s] = split_files(opts.data, task, s)
    out_path = Path(opts.out or f"glue_{task.name}.json")
    student = load_text_student(opts.student, opts.tokenizer)
    try:
        tok = load_tokenizer(student.tokenizer)
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(f"tokenizer {student.tokenizer}: {exc}") from None
    pad_id = special_ids(tok).pad

    train_texts, train_y = read_split(files["train"], task)
    if opts.max_train_samples:
        train_texts, train_y = train_texts[: opts.max_train_samples], train_y[: opts.max_train_samples]
    if not train_texts:
        raise UserError(f"{files['train'][0]}: no training examples")
    train = encode_examples(tok, train_texts, opts.max_len)
    evals = {}
    for s in task.eval_splits:
        texts, y = read_split(files[s], task)
        if opts.max_eval_samples:
            texts, y = texts[: opts.max_eval_samples], y[: opts.max_eval_samples]
        evals[s] = (encode_examples(tok, texts, opts.max_len), y)

    device = resolve_device(opts.device)
    torch.manual_seed(opts.seed)
    enc = student.encoder.float()
    with torch.no_grad():
        dim = enc(*collate([([0, 0], [0, 0])], pad_id)[:2]).shape[-1]
    model = GlueModel(enc, dim, task.num_labels).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and not n.endswith(".bias"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=opts.lr)
    steps_per_epoch = math.ceil(len(train) / opts.batch_size)
    total = max(1, round(steps_per_epoch * opts.epochs))
    warmup = int(opts.warmup_frac * total)
    # linear warmup, then linear decay to 0 (BERT's GLUE schedule)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
    gen = torch.Generator().manual_seed(opts.seed)
    labels = torch.as_tensor(train_y)
    t0 = time.perf_counter()
    step, history, epoch = 0, [], 0
    while step < total:
        model.train()
        order = torch.randperm(len(train), generator=gen).tolist()
        losses = []
        for i in range(0, len(order), opts.batch_size):
            if step >= total:
                break
            idx = order[i:i + opts.batch_size]
            ids, pad, types = (t.to(device) for t in collate([train[j] for j in idx], pad_id))
            y = labels[idx].to(device)
            with _autocast(device):
                out = model(ids, pad, types)
            loss = (nn.functional.mse_loss(out.float().squeeze(-1), y.float()) if task.num_labels == 1
                    else nn.functional.cross_entropy(out.float(), y))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.item())
        epoch += 1
        history.append({"epoch": epoch, "step": step, "train_loss": float(np.mean(losses)) if losses else None})
    metrics = {s: task_metrics(task, _predict(model, data, pad_id, opts.batch_size * 2, device), y)
               for s, (data, y) in evals.items()}
    seconds = time.perf_counter() - t0
    first = task.eval_splits[0]
    result = {
        "task": task.name,
        "score": metrics[first][task.metrics[0]],
        "score_name": f"{first} {task.metrics[0]}",
        "metrics": metrics,
        "examples": {"train": len(train), **{s: len(d) for s, (d, _) in evals.items()}},
        "student": student.info,
        "tokenizer": student.tokenizer,
        "config": asdict(opts) | {"steps": total, "device": str(device)},
        "data_files": {s: [{"path": str(f), "bytes": f.stat().st_size, "sha256": file_sha256(f)} for f in fs]
                       for s, fs in files.items()},
        "history": history,
        "seconds": round(seconds, 2),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out_path)
    result["out"] = str(out_path)
    return result


def summary(result: dict) -> str:
    parts = ", ".join(f"{s} " + " ".join(f"{k} {v:.4f}" for k, v in m.items()) for s, m in result["metrics"].items())
    return (f"glue {result['task']}: {parts} ({result['examples']['train']} train examples, "
            f"{result['config']['steps']} steps, {result['seconds']:.0f} s) -> {result['out']}")


@click.command("glue")
@click.argument("student", type=str)
@click.option("--task", "task_name", required=True, help=f"GLUE task: {', '.join(GLUE_TASKS)}")
@click.option("--data", required=True, type=click.Path(file_okay=False),
              help="folder with <task>/train-*.parquet and <task>/validation*.parquet (nyu-mll/glue layout)")
@click.option("--out", default="", help="result JSON  [default: glue_<task>.json]")
@click.option("--tokenizer", default="", help="tokenizer.json / vocab.txt  [default: the student's]")
@click.option("--epochs", default=3.0, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--lr", default=2e-5, show_default=True)
@click.option("--weight-decay", default=0.01, show_default=True)
@click.option("--warmup-frac", default=0.1, show_default=True)
@click.option("--max-len", default=128, show_default=True, help="tokens per example, incl. [CLS]/[SEP]")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@click.option("--max-train-samples", default=0, show_default=True, help="0: all (a smaller number for quick checks)")
@click.option("--max-eval-samples", default=0, show_default=True, help="0: all")
def glue_command(student: str, task_name: str, **kw) -> None:
    """Fine-tune a text STUDENT (exported file, checkpoint, run dir or HF BERT dir) on one GLUE
    task and score its validation split."""
    result = run_glue(GlueOptions(student=student, task=task_name, **kw))
    click.echo(summary(result))
