"""GLUE fine-tuning of a text student as the thesis ran it: `trainer eval glue --task sst2 --data DIR STUDENT`.

Fine-tunes a text encoder (an exported student, a checkpoint or run directory of a text task, or
a Hugging Face BERT directory) on GLUE tasks from local parquet files laid out as the hub's
`nyu-mll/glue` (`<task>/train-*.parquet`, `<task>/validation-*.parquet`; MNLI has
`validation_matched-*` and `validation_mismatched-*`), then scores the validation split(s).

The recipe per task is the thesis's (`TimCares/MasterThesis:configs/fine_tuning/<task>.yaml`,
`src/models/text_classification.py`), in `RECIPES`: epochs, batch size and peak lr per task;
AdamW with betas (0.9, 0.98), eps 1e-6 and weight decay 0.1 on every parameter; 10% linear
warmup, then linear decay (transformers' polynomial schedule, power 1); at most 256 tokens, pairs
cut longest-first by the `tokenizers` library itself; the head is the pretrained BERT pooler
(dense + tanh on [CLS], from the student's teacher or `--pooler`), dropout 0.1 and a linear
classifier (one output for STS-B, a regression with MSE). Any value changed on the command line
makes the record's protocol `custom (...)`, which `trainer report` never sets beside the thesis.

Metrics come from scikit-learn and SciPy (what the thesis called): Matthews correlation (CoLA),
F1 of class 1 (MRPC, QQP, with accuracy beside), Spearman (STS-B, Pearson beside), accuracy
(SST-2, MNLI matched and mismatched, QNLI, RTE, WNLI). `score` is the thesis's metric for the task
in % (MNLI: matched); the GLUE score is the mean over the 9 tasks (`trainer report`).

Each task writes one evaluation record through trainer/eval/results.py, with every data file
used (size and SHA-256) and per-epoch validation figures.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from scipy import stats
from sklearn import metrics as skm
from torch import nn

from trainer.errors import UserError

from .benchmarks import resolve_device
from .features import file_sha256

PROTOCOL = "thesis-glue"


@dataclass(frozen=True)
class GlueTask:
    name: str
    columns: tuple[str, ...]  # one text column, or the two of a pair
    num_labels: int  # 1: regression
    metrics: tuple[str, ...]  # the first is the thesis's metric, the score
    eval_splits: tuple[str, ...]


GLUE_TASKS: dict[str, GlueTask] = {t.name: t for t in (
    GlueTask("cola", ("sentence",), 2, ("matthews",), ("validation",)),
    GlueTask("sst2", ("sentence",), 2, ("accuracy",), ("validation",)),
    GlueTask("mrpc", ("sentence1", "sentence2"), 2, ("f1", "accuracy"), ("validation",)),
    GlueTask("qqp", ("question1", "question2"), 2, ("f1", "accuracy"), ("validation",)),
    GlueTask("stsb", ("sentence1", "sentence2"), 1, ("spearman", "pearson"), ("validation",)),
    GlueTask("mnli", ("premise", "hypothesis"), 3, ("accuracy",), ("validation_matched", "validation_mismatched")),
    GlueTask("qnli", ("question", "sentence"), 2, ("accuracy",), ("validation",)),
    GlueTask("rte", ("sentence1", "sentence2"), 2, ("accuracy",), ("validation",)),
    GlueTask("wnli", ("sentence1", "sentence2"), 2, ("accuracy",), ("validation",)),
)}


@dataclass(frozen=True)
class Recipe:
    """One task's fine-tuning hyper-parameters (the thesis's yaml, file named in `source`)."""
    epochs: int
    batch_size: int
    lr: float
    source: str
    weight_decay: float = 0.1  # on every parameter (the thesis's AdamW over model.parameters())
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_frac: float = 0.1
    max_len: int = 256
    dropout: float = 0.1
    seed: int = 42


RECIPES: dict[str, Recipe] = {
    "cola": Recipe(20, 16, 1e-5, "cola.yaml"),
    "sst2": Recipe(10, 32, 2e-5, "sst.yaml"),
    "mrpc": Recipe(20, 16, 2e-5, "mrpc.yaml"),
    "qqp": Recipe(10, 128, 2e-5, "qqp.yaml"),
    "stsb": Recipe(20, 16, 4e-5, "stsb.yaml"),
    "mnli": Recipe(10, 64, 2e-5, "mnli.yaml"),
    "qnli": Recipe(10, 32, 2e-5, "qnli.yaml"),
    "rte": Recipe(20, 16, 2e-5, "rte.yaml"),
    "wnli": Recipe(20, 8, 1e-5, "wnli.yaml"),
}


def task_named(name: str) -> GlueTask:
    key = name.lower().replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        raise UserError(f"unknown GLUE task {name!r} (one of {', '.join(GLUE_TASKS)}, or all)")
    return GLUE_TASKS[key]


# -- metrics (scikit-learn and SciPy, as the thesis's scorer) ----------------------------------


def _spearman(label: np.ndarray, pred: np.ndarray) -> float:
    return float(stats.spearmanr(pred, label)[0])


def _pearson(label: np.ndarray, pred: np.ndarray) -> float:
    return float(stats.pearsonr(pred, label)[0])


# metric name -> f(true labels, predictions), in sklearn's argument order
METRICS = {"accuracy": skm.accuracy_score, "f1": skm.f1_score, "matthews": skm.matthews_corrcoef,
           "spearman": _spearman, "pearson": _pearson}


def task_metrics(task: GlueTask, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's metrics in % from raw model outputs ([N, num_labels] logits, or [N] scores);
    a correlation that is undefined (a constant prediction) counts as 0."""
    pred = outputs.reshape(-1) if task.num_labels == 1 else outputs.argmax(-1)
    out = {}
    for m in task.metrics:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SciPy warns on a constant input; it scores 0 here
            v = float(METRICS[m](labels, pred)) if len(labels) else 0.0
        out[m] = 100.0 * (v if math.isfinite(v) else 0.0)
    return out


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


def encode_examples(tok, texts: list[tuple[str, ...]], max_len: int) -> list[tuple[list[int], list[int]]]:
    """[CLS] a [SEP] (b [SEP]) ids and their segment ids, at most max_len tokens: the tokenizer's
    own post-processor adds the special tokens and its "longest_first" truncation cuts pairs (the
    `tokenizers` library, which transformers' fast BERT tokenizer is)."""
    if tok.post_processor is None:
        raise UserError("the tokenizer has no post-processor to add [CLS]/[SEP]: give a BERT tokenizer.json")
    tok.no_padding()
    tok.enable_truncation(max_length=max_len, strategy="longest_first")
    inputs = [t if len(t) == 2 else t[0] for t in texts]
    return [(e.ids, e.type_ids) for e in tok.encode_batch(inputs, add_special_tokens=True)]


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
    bert: str = ""  # the BERT (directory or hub id) whose pretrained pooler the head starts from


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
        bert = str(p)
    else:
        from trainer.export import load_student

        loaded = load_student(str(p))
        if "text" not in loaded.encoders:
            raise UserError(f"{p}: the {loaded.task} student has no text encoder")
        enc = loaded.encoders["text"]
        cfg = loaded.config or {}
        teacher = str((cfg.get("teacher") or {}).get("path") or "")
        # the run's own tokenizer, else the one shipped with its teacher
        tok = tokenizer or _tokenizer_in((cfg.get("data") or {}).get("tokenizer")) or _tokenizer_in(teacher)
        info = {"source": str(loaded.source), "kind": "student", "task": loaded.task, "step": loaded.step}
        bert = teacher if loaded.task == "text_kd" else ""
    if not tok:
        raise UserError(f"no tokenizer found for {p}: give --tokenizer (tokenizer.json or vocab.txt)")
    return TextStudent(enc, str(tok), info, bert)


def pretrained_pooler(source: str, dim: int) -> nn.Linear:
    """BERT's pooler dense layer (its weights from `source`, a BERT directory or hub id)."""
    from trainer.models.text import _offline, _quiet_transformers

    transformers = _quiet_transformers()
    try:
        bert = transformers.BertModel.from_pretrained(source, add_pooling_layer=True, local_files_only=_offline())
    except Exception as exc:  # hub and file errors come in many types; the user needs one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--pooler {source}: no BERT with a pooler loadable there ({first})") from None
    dense = bert.pooler.dense
    if dense.in_features != dim:
        raise UserError(f"--pooler {source}: its pooler is {dense.in_features} wide, the student {dim}")
    layer = nn.Linear(dim, dim)
    layer.load_state_dict(dense.state_dict())
    return layer


class GlueModel(nn.Module):
    """Encoder, then the thesis's head on [CLS]: BERT's pooler (dense + tanh), dropout, linear."""

    def __init__(self, encoder: nn.Module, pooler: nn.Linear, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.takes_types = "token_type_ids_BT" in inspect.signature(encoder.forward).parameters
        self.pooler = pooler
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(pooler.out_features, num_labels)

    def forward(self, ids: torch.Tensor, pad: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(ids, pad, token_type_ids_BT=types) if self.takes_types else self.encoder(ids, pad)
        return self.classifier(self.dropout(torch.tanh(self.pooler(tokens[:, 0].float()))))


# -- fine-tuning -------------------------------------------------------------------------------


@dataclass
class GlueOptions:
    """What the command line may change; None keeps the task's recipe value."""
    student: str
    task: str
    data: str
    out: str = ""  # result JSON [default: <the model's eval dir>/glue_<task>.json]
    tokenizer: str = ""
    pooler: str = ""  # BERT whose pooler starts the head [default: the student's teacher]
    epochs: float | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    max_len: int | None = None
    seed: int | None = None
    device: str = "auto"
    max_train_samples: int = 0  # 0: all
    max_eval_samples: int = 0  # 0: all


def effective_recipe(task: GlueTask, opts: GlueOptions) -> Recipe:
    """The task's recipe with the options the user set."""
    changes = {k: getattr(opts, k) for k in ("epochs", "batch_size", "lr", "weight_decay", "max_len", "seed")
               if getattr(opts, k) is not None}
    return replace(RECIPES[task.name], **changes)


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


def optimizer_and_schedule(model: nn.Module, r: Recipe, total_steps: int):
    """The thesis's AdamW over every parameter (weight decay included) and transformers'
    polynomial decay (power 1) after a linear warmup over the first 10% of the steps."""
    from transformers.optimization import get_polynomial_decay_schedule_with_warmup

    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, betas=r.betas, eps=r.eps, weight_decay=r.weight_decay)
    sched = get_polynomial_decay_schedule_with_warmup(opt, num_warmup_steps=int(total_steps * r.warmup_frac),
                                                      num_training_steps=total_steps)
    return opt, sched


def _check(r: Recipe) -> None:
    for msg, ok in (("--epochs must be above 0", r.epochs > 0), ("--batch-size must be at least 1", r.batch_size >= 1),
                    ("--lr must be above 0", r.lr > 0), ("--max-len must be at least 8", r.max_len >= 8)):
        if not ok:
            raise UserError(msg)


def _default_out(student: str, task: str) -> Path:
    p = Path(student).expanduser()
    return (p if p.is_dir() and not (p / "config.json").is_file() else p.parent) / "eval" / f"glue_{task}.json"


def _read_data(opts: GlueOptions, task: GlueTask, tok, max_len: int):
    files = {"train": split_files(opts.data, task, "train")}
    for s in task.eval_splits:
        files[s] = split_files(opts.data, task, s)
    train_texts, train_y = read_split(files["train"], task)
    if opts.max_train_samples:
        train_texts, train_y = train_texts[: opts.max_train_samples], train_y[: opts.max_train_samples]
    if not train_texts:
        raise UserError(f"{files['train'][0]}: no training examples")
    evals = {}
    for s in task.eval_splits:
        texts, y = read_split(files[s], task)
        if opts.max_eval_samples:
            texts, y = texts[: opts.max_eval_samples], y[: opts.max_eval_samples]
        evals[s] = (encode_examples(tok, texts, max_len), y)
    return files, (encode_examples(tok, train_texts, max_len), train_y), evals


def run_glue(opts: GlueOptions) -> dict[str, Any]:
    """Fine-tune and score one task; writes its evaluation record and returns it."""
    from trainer.data.text import TextEncoder, load_tokenizer

    from .results import protocol_name, write_result

    task = task_named(opts.task)
    r = effective_recipe(task, opts)
    _check(r)
    student = load_text_student(opts.student, opts.tokenizer)
    try:
        tok = load_tokenizer(student.tokenizer)
        pad_id = TextEncoder(student.tokenizer).pad_id()
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(f"tokenizer {student.tokenizer}: {exc}") from None
    files, (train, train_y), evals = _read_data(opts, task, tok, r.max_len)
    out_path = Path(opts.out) if opts.out else _default_out(opts.student, task.name)

    device = resolve_device(opts.device)
    torch.manual_seed(r.seed)
    enc = student.encoder.float()
    with torch.no_grad():
        dim = enc(*collate([([0, 0], [0, 0])], pad_id)[:2]).shape[-1]
    pooler_src = opts.pooler or student.bert
    if pooler_src:
        pooler = pretrained_pooler(pooler_src, dim)
    else:
        print(f"glue {task.name}: no BERT to take the pretrained pooler from (give --pooler): a new one is trained")
        pooler = nn.Linear(dim, dim)
    model = GlueModel(enc, pooler, task.num_labels, r.dropout).to(device)
    steps_per_epoch = max(1, len(train) // r.batch_size)  # the thesis drops the last partial batch
    total = max(1, round(steps_per_epoch * r.epochs))
    opt, sched = optimizer_and_schedule(model, r, total)
    gen = torch.Generator().manual_seed(r.seed)
    labels = torch.as_tensor(train_y)
    t0 = time.perf_counter()
    step, history = 0, []
    while step < total:
        model.train()
        order = torch.randperm(len(train), generator=gen).tolist()
        losses = []
        for i in range(0, max(1, len(order) - r.batch_size + 1), r.batch_size):
            if step >= total:
                break
            idx = order[i:i + r.batch_size]
            ids, pad, types = (t.to(device) for t in collate([train[j] for j in idx], pad_id))
            y = labels[idx].to(device)
            with _autocast(device):
                out = model(ids, pad, types)
            loss = (nn.functional.mse_loss(out.float().view(-1), y.float()) if task.num_labels == 1
                    else nn.functional.cross_entropy(out.float(), y))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.item())
        val = {s: task_metrics(task, _predict(model, d, pad_id, r.batch_size * 2, device), y)
               for s, (d, y) in evals.items()}
        history.append({"epoch": len(history) + 1, "step": step,
                        "train_loss": float(np.mean(losses)) if losses else None, **val})
    metrics = {s: history[-1][s] for s in task.eval_splits}
    first = task.eval_splits[0]
    metrics["score"] = metrics[first][task.metrics[0]]
    metrics["score_name"] = f"{first} {task.metrics[0]}"
    used = asdict(r) | {"train_samples": opts.max_train_samples, "eval_samples": opts.max_eval_samples,
                        "pooler": "pretrained" if pooler_src else "new"}
    thesis = asdict(RECIPES[task.name]) | {"train_samples": 0, "eval_samples": 0, "pooler": "pretrained"}
    thesis.pop("seed")  # the seed changes the figure's noise, not the protocol
    data = {s: {"split": s, "files": [{"path": str(f), "bytes": f.stat().st_size, "sha256": file_sha256(f)}
                                      for f in fs]}
            for s, fs in files.items()}
    options = {"label": "", "tokenizer": student.tokenizer, "pooler": pooler_src, "device": str(device),
               "steps": total, "examples": {"train": len(train), **{s: len(d) for s, (d, _) in evals.items()}},
               "history": history}
    rec = write_result(out_path, "glue", task.name, metrics, student.info, {"recipe": used}, data, options,
                       time.perf_counter() - t0, protocol_name(PROTOCOL, thesis, used))
    return rec | {"out": str(out_path)}


def summary(rec: dict) -> str:
    m = rec["metrics"]
    parts = ", ".join(f"{s} " + " ".join(f"{k} {v:.2f}" for k, v in m[s].items())
                      for s in GLUE_TASKS[rec["dataset"]].eval_splits)
    o = rec["options"]
    return (f"glue {rec['dataset']}: {parts} ({o['examples']['train']} train examples, {o['steps']} steps, "
            f"{rec['seconds']:.0f} s; protocol {rec['protocol']}) -> {rec['out']}")


@click.command("glue")
@click.argument("student", type=str)
@click.option("--task", "task_names", required=True, multiple=True,
              help=f"GLUE task ({', '.join(GLUE_TASKS)}) or all; repeatable")
@click.option("--data", required=True, type=click.Path(file_okay=False),
              help="folder with <task>/train-*.parquet and <task>/validation*.parquet (nyu-mll/glue layout)")
@click.option("--out", default="", help="result JSON (one task) or folder (several) [default: the model's eval/]")
@click.option("--tokenizer", default="", help="tokenizer.json / vocab.txt  [default: the student's]")
@click.option("--pooler", default="", help="BERT directory or hub id whose pretrained pooler starts the head "
                                           "[default: the student's teacher]")
@click.option("--epochs", type=float, default=None, help="[default: the task's thesis recipe]")
@click.option("--batch-size", type=int, default=None, help="[default: the task's thesis recipe]")
@click.option("--lr", type=float, default=None, help="peak learning rate [default: the task's thesis recipe]")
@click.option("--weight-decay", type=float, default=None, help="[default: 0.1, on every parameter]")
@click.option("--max-len", type=int, default=None, help="tokens per example, incl. [CLS]/[SEP] [default: 256]")
@click.option("--seed", type=int, default=None, help="[default: 42]")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@click.option("--max-train-samples", default=0, show_default=True, help="0: all (a smaller number for quick checks)")
@click.option("--max-eval-samples", default=0, show_default=True, help="0: all")
def glue_command(student: str, task_names: tuple[str, ...], out: str, **kw) -> None:
    """Fine-tune a text STUDENT (exported file, checkpoint, run dir or HF BERT dir) on GLUE tasks with
    the thesis's per-task recipes, and score their validation splits (one record per task)."""
    names = list(GLUE_TASKS) if "all" in task_names else [task_named(t).name for t in task_names]
    for name in dict.fromkeys(names):
        target = out
        if out and len(names) > 1:
            target = str(Path(out) / f"glue_{name}.json")
        click.echo(summary(run_glue(GlueOptions(student=student, task=name, out=target, **kw))))
